"""Cluster names (ddk.data.naming): code by its language, other scripts by their name, never a
bare index."""

import pytest

from ddk.data.naming import code_language, describe, dominant_script, name_clusters

SNIPPETS = {
    "python": """import os
from pathlib import Path


class Loader:
    def __init__(self, root):
        self.root = Path(root)

    def files(self):
        for name in os.listdir(self.root):
            if name.endswith(".txt"):
                yield self.root / name
""",
    "c": """#include <stdio.h>
#define MAX_ITEMS 64

typedef struct node {
    int value;
    struct node *next;
} node_t;

static int count(const node_t *head) {
    int n = 0;
    while (head) {
        n++;
        head = head->next;
    }
    return n;
}
""",
    "tcl": """proc ::util::join_paths {base args} {
    set result $base
    foreach part $args {
        set result [file join $result $part]
    }
    return $result
}

namespace eval ::util {
    variable count 0
    lappend paths [join_paths /tmp a b]
}
""",
    "lua": """local M = {}

local function helper(x)
  if x == nil then
    return 0
  end
  return x + 1
end

function M.run(t)
  for i, v in ipairs(t) do
    print(helper(v))
  end
end

return M
""",
    "shell": """#!/bin/sh
set -e
if [ -z "$1" ]; then
  echo "usage: $0 file"
  exit 1
fi
for f in "$@"; do
  cp "$f" "${f}.bak"
done
""",
    "javascript": """const fs = require("fs");

function main(args) {
  let doubled = args.map(v => v * 2);
  console.log(doubled);
}

module.exports = main;
""",
}

NOT_CODE = {
    "prose": "The module reads each file in turn. When a line is too long, it is wrapped at\n"
    "the last space before the limit, and the rest goes on the next line, so that\n"
    "nothing is lost; local variables are kept for the end of the run.",
    "math": "Q: A shop sells 12 pens at 3 dollars each. How much do the pens cost?\n"
    "A: 12 * 3 = 36. The answer is 36.",
    "json": '{"id": "P00012", "first_name": "Ava", "city": "Lyon", "active": true}',
    "csv": "date,account,amount\n2021-03-04,ACC-12345,-12.50\n2021-03-05,ACC-12345,100.00",
}


@pytest.mark.parametrize("lang", sorted(SNIPPETS))
def test_code_language_from_keywords_and_layout(lang):
    assert code_language([SNIPPETS[lang]]) == lang


@pytest.mark.parametrize("kind", sorted(NOT_CODE))
def test_prose_numbers_and_records_are_not_code(kind):
    assert code_language([NOT_CODE[kind]]) is None


def test_scripts_are_named_when_letters_are_mostly_not_latin():
    assert dominant_script(["猔葰锠鏖梬荪缒梘簮题。"]) == "han"
    assert dominant_script(["Привет, мир: как дела? ok"]) == "cyrillic"
    assert dominant_script(["مرحبا بالعالم"]) == "arabic"
    assert dominant_script(["こんにちは"]) == "kana"
    assert dominant_script(["hello wörld, ça va"]) is None
    assert dominant_script(["12345, 678"]) is None


def test_every_cluster_gets_a_name_after_its_index():
    clusters = [
        [NOT_CODE["math"]],
        ["猔葰锠鏖梬荪缒梘簮题。"],
        [SNIPPETS["tcl"]],
        ["1, 2, 3\n4, 5, 6"],
        [SNIPPETS["python"]],
        [SNIPPETS["python"].replace("Loader", "Saver")],
    ]
    terms = [["answer", "dollars"], ["猔葰"], ["set", "proc"], [], ["self", "root"], ["saver"]]
    names, basis = name_clusters(clusters, terms)
    assert names == [
        "c0_answer_dollars",
        "c1_han",  # terms without an ASCII form leave the script, not a bare "c1"
        "c2_code_tcl",
        "c3_numbers",
        "c4_code_python_self_root",  # two Python clusters: their words tell them apart
        "c5_code_python_saver",
    ]
    assert basis[1] == {"script": "han"} and basis[2] == {"code": "tcl"}
    assert describe(["!!! ??? ..."], []) == ("symbols", {"characters": "symbols"})
