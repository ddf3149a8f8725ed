"""Conversations -> token ids and a loss mask, through the student tokenizer's chat template.

A record is `{"messages": [{"role", "content"}, ...], "tools": [...]?}` (the OpenAI / Hugging Face
format) or a `{"prompt", "completion"}` pair (one user turn, one assistant turn). The template
is the tokenizer's own (`apply_chat_template`) or a Jinja file (`prepare.chat_template`).

Which tokens are the assistant's comes from the template itself:
  * a template with `{% generation %}` blocks marks them (`return_assistant_tokens_mask`);
  * otherwise from rendering prefixes: the text of the conversation up to assistant turn k with
    the generation prompt, and up to and including turn k, must both be prefixes of the whole
    conversation's text; the characters between them are turn k (its content and its end-of-turn
    marker; trailing whitespace left out). A template for which they are not prefixes is refused.
The mask of token j says whether token j is a loss target (predicted from token j - 1).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers.utils.chat_template_utils import render_jinja_template

from ddk.errors import DDKError

ROLES = ("system", "user", "assistant", "tool")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def is_chat_record(record: object) -> bool:
    """Whether a record reads as a conversation (`messages`, or a prompt/completion pair)."""
    return isinstance(record, dict) and (
        "messages" in record or ("prompt" in record and "completion" in record)
    )


def record_messages(record: object, where: str) -> tuple[list[dict], list | None]:
    """(messages, tools) of a chat record, checked; a one-line DDKError naming `where`."""
    if not isinstance(record, dict):
        raise DDKError(f"{where}: expected a JSON object with a 'messages' list")
    if "messages" not in record:
        if "prompt" in record and "completion" in record:
            record = {
                "messages": [
                    {"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]},
                ]
            }
        else:
            raise DDKError(
                f"{where}: record has no 'messages' (nor a 'prompt'/'completion' pair); chat data "
                "needs a list of {role, content} messages"
            )
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DDKError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise DDKError(
                f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}"
            )
        calls = m["role"] == "assistant" and m.get("tool_calls")  # content may then be null
        if not isinstance(m.get("content"), str) and not calls:
            raise DDKError(f"{where}: message {i} ({m['role']}) has no text 'content'")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DDKError(f"{where}: 'tools' must be a list of tool schemas")
    return messages, tools


def load_template(tokenizer, path: str | None, tokenizer_name: str) -> str:
    """The Jinja chat template: the file at `path`, else the tokenizer's own."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DDKError(f"prepare.chat_template '{path}' is not a file")
        return file.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise DDKError(
            f"tokenizer '{tokenizer_name}' has no chat template; give one with "
            "prepare.chat_template (a Jinja file)"
        )
    return template


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


@dataclass
class Rendered:
    ids: np.ndarray  # int64 [n]
    mask: np.ndarray  # uint8 [n]: 1 where the token is a loss target
    text: str


class ChatRenderer:
    """Renders conversations with one template and marks their trained tokens."""

    def __init__(self, tokenizer, template: str, train_on: str = "assistant"):
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.uses_generation = bool(_GENERATION.search(template))

    def _text(self, messages, tools, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def render(self, messages: list[dict], tools: list | None = None) -> Rendered:
        text = self._text(messages, tools)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if self.train_on == "all":
            mask = np.ones(len(ids), dtype=np.uint8)
        else:
            spans = self.assistant_spans(messages, tools, text)
            if self.train_on == "last_turn":
                spans = spans[-1:]
            mask = tokens_in_spans(enc["offset_mapping"], spans)
        if len(mask):
            mask[0] = 0  # the first token has nothing to be predicted from
        return Rendered(ids, mask, text)

    def assistant_spans(self, messages, tools, text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of each assistant turn in `text`."""
        if self.uses_generation:
            return self._generation_spans(messages, tools, text)
        return self._prefix_spans(messages, tools, text)

    def _generation_spans(self, messages, tools, text: str) -> list[tuple[int, int]]:
        """The template's own `{% generation %}` marks, as character spans of `text`."""
        rendered, spans = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=self.template,
            return_assistant_tokens_mask=True,
            **self.tokenizer.special_tokens_map,
        )
        if rendered[0] != text:
            raise DDKError("the chat template renders differently with generation marks")
        return [tuple(s) for s in spans[0]]

    def _prefix_spans(self, messages, tools, text: str) -> list[tuple[int, int]]:
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                before = self._text(messages[:k], tools, add_generation_prompt=True)
                through = self._text(messages[: k + 1], tools)
            except Exception as e:  # a template may refuse a prefix (jinja raise_exception)
                raise _no_spans(k, f"rendering the prefix failed: {e}") from None
            if not text.startswith(before) or not text.startswith(through):
                raise _no_spans(k, "its prefix renders differently from the whole conversation")
            end = len(through.rstrip())
            if end <= len(before):
                raise _no_spans(k, "the turn renders as no text")
            spans.append((len(before), end))
        return spans


def _no_spans(turn: int, why: str) -> DDKError:
    return DDKError(
        f"cannot find the assistant tokens of this chat template (assistant message {turn}: "
        f"{why}); give a template with {{% generation %}} blocks in prepare.chat_template"
    )


def tokens_in_spans(offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8 [len(offsets)]: 1 for each token whose characters overlap a span (spans sorted)."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    s = 0
    for j, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0] and end > start:
            mask[j] = 1
    return mask
