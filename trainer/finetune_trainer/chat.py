"""Prompt/completion and chat rows -> token ids and per-token labels, loss only where the model speaks.

`spec.data.format: promptCompletion | messages` rows are rendered with a chat template (the
tokenizer's own for `chatTemplate: auto`, or one from the spec) through transformers'
`apply_chat_template`, which renders in jinja2's `ImmutableSandboxedEnvironment`: a template
from a manifest is untrusted and never runs anywhere else. A prompt/completion row is the
two-turn conversation [user: prompt, assistant: completion].

Which tokens are trained: transformers can return an assistant-token mask, but only for
templates with `{% generation %}` markers, which most (SmolLM2's among them) lack. So the spans
are found the way TRL and LLaMA-Factory do, by rendering prefixes, written by hand here since no
library exposes it for unmarked templates: for each assistant turn i, the conversation before it
with the generation prompt (`messages[:i]`, what the model sees at inference) and the
conversation through it (`messages[:i+1]`) must both be prefixes of the whole rendering; the
text between the two (the reply and the template's end-of-turn, e.g. `<|im_end|>`, up to and
including EOS where the reply has it) is trained.
A template for which that does not hold is refused naming `spec.data.chatTemplate`.
The text is tokenized piecewise at those cuts (as LLaMA-Factory does), so every prompt is
tokenized exactly as it is at inference and no token straddles a trained/untrained border.

The mask is a per-token label array (IGNORE_INDEX where untrained), the form packing carries.
No torch here: `finetune preview` and the driver-side checks use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .spec import DataSpec

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value torch's cross-entropy skips (data.IGNORE_INDEX is the same)
ROLES = ("system", "user", "assistant")
Conversation = list[dict[str, str]]


class ChatDataError(ValueError):
    """A row or template that cannot be rendered; the message starts with the spec field to fix."""


def template_for(data: DataSpec, tokenizer: Any, *, warn: bool = True) -> str | None:
    """The Jinja template rows are rendered with, or None for plain prompt/completion joining;
    `warn`: say when a model with a chat template is trained on plain joined text."""
    choice = data.resolved_chat_template()
    fmt = data.resolved_format()
    own = _own_template(tokenizer)
    if choice == "none":
        if warn and own and fmt == "promptCompletion":
            log.warning(
                "spec.data.chatTemplate is none: prompt and completion are joined as plain text, but the model "
                "has a chat template; set chatTemplate: auto to train in the format the model is prompted with"
            )
        return None
    if choice == "auto":
        if not own:
            other = ("set chatTemplate: none to join prompt and completion as plain text, or give a Jinja template"
                     if fmt == "promptCompletion" else "give a Jinja chat template in spec.data.chatTemplate, or use a model that ships one")  # fmt: skip
            raise ChatDataError(
                f"spec.data.chatTemplate: auto, but the model's tokenizer has no chat template (no chat_template in "
                f"tokenizer_config.json, no chat_template.jinja); {other}"
            )
        return own
    return choice


def _own_template(tokenizer: Any) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one renders conversations
        own = own.get("default")
    return own if isinstance(own, str) and own else None


def check_messages(values: pd.Series, where: str, column: str, *, numbered: bool = True) -> list[Conversation | None]:
    """Each cell as a list of {role, content} dicts (None where the cell is empty); raises
    ChatDataError naming spec.data.messagesField, the row (1-based, file order; with `numbered`
    False, for rows whose place in the file is not known, the cell's start instead) and what is
    wrong. A CSV cell may hold the conversation as JSON text."""
    out: list[Conversation | None] = []
    for row, cell in enumerate(values.tolist(), start=1):
        if cell is None or (isinstance(cell, float) and np.isnan(cell)):
            out.append(None)  # an empty cell: data_checks counts and drops it
            continue
        problem, conversation = _conversation(cell)
        if problem:
            at = f"row {row} of {where}" if numbered else f"a row of {where} (cell starting {str(cell)[:60]!r})"
            raise ChatDataError(f"spec.data.messagesField: {at}, column {column!r}: {problem}")
        out.append(conversation)
    return out


def _conversation(cell: Any) -> tuple[str | None, Conversation]:
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except ValueError:
            return "is text, not a list of {role, content} messages (nor JSON of one)", []
    if isinstance(cell, np.ndarray):  # parquet lists
        cell = cell.tolist()
    if not isinstance(cell, (list, tuple)):
        return f"is a {type(cell).__name__}, not a list of {{role, content}} messages", []
    conversation: Conversation = []
    for i, message in enumerate(cell, start=1):
        if not isinstance(message, dict):
            return f"message {i} is a {type(message).__name__}, not a {{role, content}} object", []
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            shown = repr(role)[:40] if role is not None else "no role"
            return f"message {i} has {shown}; roles are {', '.join(ROLES)}", []
        if not isinstance(content, str):
            what = "no content" if content is None else f"content of type {type(content).__name__}"
            return f"message {i} ({role}) has {what}; content must be text", []
        conversation.append({"role": role, "content": content})
    return None, conversation


def encode(
    rows: Sequence[Conversation] | tuple[Sequence[str], Sequence[str]], tokenizer: Any, template: str | None,
    limit: int, split: str, *, warn: bool = False, whole_split: bool = True,
) -> tuple[list[list[int]], list[list[int]], int]:  # fmt: skip
    """Token ids and labels of each example cut to `limit` tokens, and how many rows were dropped
    because no trained token was left (a prompt that fills the window; a conversation with no
    assistant turn). `rows`: conversations, or (prompts, completions). `warn`: say when no reply
    ends with EOS (once, for the train split's sample). `whole_split`: `rows` are the whole split,
    so none left is refused here; a batch of the ingest's is one part, which the ingest counts."""
    ids, labels, dropped = _encode(rows, tokenizer, template, limit, split, warn)
    if not ids and dropped and whole_split:
        raise ChatDataError(no_trained_token(dropped, split, limit))
    return ids, labels, dropped


def no_trained_token(rows: int, split: str, limit: int) -> str:
    """The refusal when not one of a split's `rows` keeps a trained token."""
    return (f"spec.data.maxSeqLength: none of the {rows} {split} rows has a trained token within {limit} tokens "
            "(the prompt, or all before the first assistant reply, fills the window; or no row has an assistant turn); "
            "raise maxSeqLength")


def _encode(
    rows: Sequence[Conversation] | tuple[Sequence[str], Sequence[str]], tokenizer: Any, template: str | None,
    limit: int, split: str, warn: bool,
) -> tuple[list[list[int]], list[list[int]], int]:  # fmt: skip
    if isinstance(rows, tuple):
        prompts, completions = rows
        if template is None:
            return _plain(prompts, completions, tokenizer, limit)
        rows = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                for p, c in zip(prompts, completions, strict=True)]  # fmt: skip
    elif template is None:
        raise ChatDataError("spec.data.chatTemplate: conversations need a chat template: auto or a Jinja template")
    pieces = [split_rendered(conv, tokenizer, template, split) for conv in rows]
    eos = tokenizer.eos_token
    replies = [text for row in pieces for text, trained in row if trained]
    if warn and isinstance(eos, str) and replies and not any(r.endswith(eos) for r in replies):
        log.warning(
            "spec.data.chatTemplate: no assistant reply ends with the tokenizer's EOS (%s): the model will not "
            "learn to stop; end the template's assistant turn with it", eos,
        )
    flat = [text for row in pieces for text, _ in row]
    tokens = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter([])
    examples = _Examples(limit)
    for row in pieces:
        seq: list[int] = []
        target: list[int] = []
        for _, trained in row:
            part = next(tokens)
            seq += part
            target += part if trained else [IGNORE_INDEX] * len(part)
        examples.add(seq, target)
    return examples.ids, examples.labels, examples.dropped


class _Examples:
    """Examples cut to `limit` tokens. One with no trained token left (a prompt that fills the whole
    window) teaches nothing and, alone in a batch, would make a NaN loss: dropped and counted."""

    def __init__(self, limit: int):
        self.limit = limit
        self.ids: list[list[int]] = []
        self.labels: list[list[int]] = []
        self.dropped = 0

    def add(self, seq: list[int], target: list[int]) -> None:
        seq, target = seq[: self.limit], target[: self.limit]
        if any(t != IGNORE_INDEX for t in target):
            self.ids.append(seq)
            self.labels.append(target)
        else:
            self.dropped += 1


def split_rendered(conversation: Conversation, tokenizer: Any, template: str, split: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces; trained = an assistant reply."""
    full = _render(conversation, tokenizer, template, split, generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = _render(conversation[:i], tokenizer, template, split, generation_prompt=True)
        through = _render(conversation[: i + 1], tokenizer, template, split, generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= pos):
            raise ChatDataError(
                f"spec.data.chatTemplate: the template is not prefix-stable: the {split} conversation rendered up to "
                f"message {i + 1} (an assistant turn), with or without the generation prompt, is not the start of the "
                "whole conversation's text, so the trained reply cannot be told apart; use a template whose turns "
                "render the same whatever follows them"
            )
        reply = through[len(before) :]
        # The reply is trained up to and including its end-of-turn token (EOS, where the reply
        # has it): the separator the template writes after it (SmolLM2's "\n") is never
        # generated, since generation stops at EOS.
        eos = tokenizer.eos_token
        end = reply.rfind(eos) + len(eos) if isinstance(eos, str) and eos and eos in reply else len(reply)
        pieces += [(full[pos : len(before)], False), (reply[:end], True)]
        pos = len(before) + end
    pieces.append((full[pos:], False))
    return pieces


def render_prompt(conversation: Conversation, tokenizer: Any, template: str) -> str:
    """The text a model is prompted with to write the next assistant turn (generation)."""
    return _render(conversation, tokenizer, template, "prompt", generation_prompt=True)


def _render(conversation: Conversation, tokenizer: Any, template: str, split: str, *, generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as err:
        # A template's own raise_exception, the sandbox's SecurityError, a syntax error, or a
        # template that indexes what a conversation does not have: one line, the field named.
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        raise ChatDataError(f"spec.data.chatTemplate: cannot render a {split} conversation with it: {reason}") from None
    if not isinstance(text, str):
        raise ChatDataError(f"spec.data.chatTemplate: rendering gave a {type(text).__name__}, not text")
    return text


def _plain(
    prompts: Sequence[str], completions: Sequence[str], tokenizer: Any, limit: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """chatTemplate none: the prompt's tokens (with the tokenizer's leading specials such as BOS,
    without a trailing EOS/SEP), the completion's tokens directly after, then EOS; no separator."""
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    examples = _Examples(limit)
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        if eos is not None and prompt and prompt[-1] == eos:
            prompt = prompt[:-1]
        end = [eos] if eos is not None and (not completion or completion[-1] != eos) else []
        seq = prompt + completion + end
        examples.add(seq, [IGNORE_INDEX] * len(prompt) + seq[len(prompt) :])
    return examples.ids, examples.labels, examples.dropped
