"""Records -> token ids and labels.

Templates: `chat` (the tokenizer's chat template), `alpaca` (the Stanford Alpaca prompt), `text` (continued
pre-training: every token trained), `auto` (chat when the tokenizer has a chat template, else alpaca). Text
records are always rendered as plain text, whatever the template.

How a rendering becomes (input_ids, labels):
1. Lay out the rendering as a string and the character spans that are trained (each assistant response).
   For chat templates the spans come from rendering growing prefixes of the conversation, so they are exact
   whatever the template adds around a turn. A response is trained up to and including the EOS token the
   template writes after it; a response the template does not close with EOS gets one appended (trained).
2. Tokenize the pieces between span boundaries separately and check that their concatenation equals the
   tokens of the whole rendering. If a tokenizer merges across a boundary, the whole rendering is tokenized
   instead and a token is trained when it overlaps a trained span (character offsets).
3. Exactly one BOS: a tokenizer's BOS token is put first unless the rendering already starts with it (chat
   templates often write it; ChatML-style tokenizers whose BOS is `<|im_start|>` already begin with it).
   Only position 0 is looked at: other occurrences of that token are turn markers.
4. Labels are -100 on prompt, system and user tokens (everything with `train_on_prompt`), and always at
   position 0, which nothing predicts. EOS labels are kept even when pad == eos: padding is masked by
   length in `collate`, never by comparing ids with the pad id.
Truncation (`truncation="truncate"`) keeps the first `max_length` tokens of a longer row: the cut response
loses its EOS, so the model is not taught to stop at an arbitrary cut. A row left with no trained token, or
any longer row under `truncation="drop"`, is dropped (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from qlorakit.core.errors import DataError
from qlorakit.data.formats import Message, Record

IGNORE_INDEX = -100
Template = Literal["auto", "chat", "alpaca", "text"]

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Example:
    """`input_ids` and `labels` of equal length (labels -100 where not trained). `position_ids` restart at 0
    at every segment of a packed row (None for an unpacked row)."""

    input_ids: list[int]
    labels: list[int]
    source: str
    position_ids: list[int] | None = None


@dataclass(frozen=True)
class RenderInfo:
    """How one rendering went, for statistics."""

    length: int
    """Tokens before any truncation."""
    retokenized: bool
    """The tokenizer merged across a prompt/response boundary; offsets were used (see module doc)."""


@dataclass(frozen=True)
class _Layout:
    text: str
    spans: list[tuple[int, int, bool]]
    """(start, end, append_eos) character spans to train."""


def resolve_template(template: str, tokenizer: Any) -> str:
    """`auto` -> `chat` when the tokenizer has a chat template, else `alpaca`; `chat` without one fails."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    if template == "chat" and not has_chat:
        raise DataError(
            "data.template is 'chat' but the tokenizer has no chat template; use data.template: alpaca "
            "(or auto), or a model whose tokenizer_config.json defines chat_template"
        )
    if template not in ("chat", "alpaca", "text"):
        raise DataError(f"data.template: unknown template {template!r}; use auto, chat, alpaca or text")
    return template


def _dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _apply_chat(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool, source: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            _dicts(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate", no system role)
        raise DataError(
            f"{source}: the tokenizer's chat template rejected this conversation ({exc}); "
            "fix the row or use data.template: alpaca"
        ) from exc


def _close_span(text: str, start: int, end: int, eos: str | None) -> tuple[int, int, bool]:
    """Train a response up to and including the first EOS the template wrote after it, else append one."""
    if eos:
        at = text.find(eos, start, end)
        if at >= 0:
            return start, at + len(eos), False
    return start, end, True


def _chat_layout(messages: Sequence[Message], tokenizer: Any, source: str) -> _Layout:
    """Render growing prefixes: the text added by assistant turn k is full(k) minus prompt(k)."""
    eos = tokenizer.eos_token
    full = _apply_chat(tokenizer, messages, False, source)
    spans: list[tuple[int, int, bool]] = []
    incremental = True
    for k, msg in enumerate(messages):
        if msg.role != "assistant":
            continue
        before = _apply_chat(tokenizer, messages[:k], True, source)
        upto = _apply_chat(tokenizer, messages[: k + 1], False, source)
        if not (upto.startswith(before) and full.startswith(upto)) or (spans and len(before) < spans[-1][1]):
            incremental = False
            break
        spans.append(_close_span(full, len(before), len(upto), eos))
    if incremental:
        return _Layout(full, spans)
    # The template rewrites earlier turns as the conversation grows: find each response in the final text.
    spans, cursor = [], 0
    for msg in messages:
        if msg.role != "assistant":
            continue
        at = full.find(msg.content, cursor)
        if at < 0:
            raise DataError(
                f"{source}: the chat template changes the assistant text, so its tokens cannot be located; "
                "use data.template: alpaca"
            )
        end = at + len(msg.content)
        gap = len(full[end:]) - len(full[end:].lstrip(" \n"))
        if eos and full.startswith(eos, end + gap):
            spans.append((at, end + gap + len(eos), False))
        else:
            spans.append((at, end, True))
        closing = spans[-1][1]
        cursor = closing
    return _Layout(full, spans)


def _alpaca_turns(record: Record) -> tuple[str, list[tuple[str, str]]]:
    """(preamble, [(prompt block, response)]) for the Alpaca template."""
    assert record.messages is not None
    system = record.messages[0].content if record.messages[0].role == "system" else None
    body = [m for m in record.messages if m.role != "system"]
    pairs = [(body[i].content, body[i + 1].content) for i in range(0, len(body), 2)]
    blocks = []
    for i, (user, response) in enumerate(pairs):
        instruction, inp = user, ""
        if i == 0 and record.instruction_input is not None:
            instruction, inp = record.instruction_input
        block = f"### Instruction:\n{instruction}\n\n"
        if inp:
            block += f"### Input:\n{inp}\n\n"
        blocks.append((block + "### Response:\n", response))
    has_input = bool(record.instruction_input and record.instruction_input[1])
    preamble = system if system is not None else (ALPACA_PREAMBLE_INPUT if has_input else ALPACA_PREAMBLE)
    return preamble, blocks


def _alpaca_layout(record: Record) -> _Layout:
    preamble, blocks = _alpaca_turns(record)
    text = preamble + "\n\n"
    spans = []
    for i, (prompt, response) in enumerate(blocks):
        text += ("\n\n" if i else "") + prompt
        spans.append((len(text), len(text) + len(response), True))
        text += response
    return _Layout(text, spans)


def _layout(record: Record, tokenizer: Any, template: str) -> _Layout:
    if record.text is not None:
        return _Layout(record.text, [(0, len(record.text), True)])
    if record.messages is None:
        raise DataError(f"{record.source}: a record needs messages or text")
    if template == "text":
        raise DataError(
            f"{record.source}: data.template 'text' needs text rows, but this row is a conversation; use "
            "data.template: alpaca or chat (with data.train_on_prompt: true to train on every token)"
        )
    if template == "chat":
        return _chat_layout(record.messages, tokenizer, record.source)
    return _alpaca_layout(record)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _by_offsets(tokenizer: Any, layout: _Layout) -> tuple[list[int], list[bool], list[int]]:
    """Whole-text tokens; a token is trained when it overlaps a trained span. Returns ids, trained flags and,
    per span, the index after which an EOS is inserted (-1: none)."""
    try:
        enc = tokenizer(layout.text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise DataError(
            "this tokenizer merges tokens across a prompt/response boundary and is not a fast tokenizer "
            "(no character offsets); load the fast tokenizer (tokenizer.json) or use data.template: alpaca"
        ) from exc
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    trained = [any(s < e and a < b for a, b, _ in layout.spans) for s, e in offsets]
    inserts = []
    for a, b, append in layout.spans:
        last = max((i for i, (s, e) in enumerate(offsets) if s < b and e > a), default=len(ids) - 1)
        inserts.append(last if append else -1)
    return ids, trained, inserts


def tokenize_layout(
    tokenizer: Any, layout: _Layout, train_on_prompt: bool
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, retokenized) with BOS and EOS rules applied (see the module doc)."""
    cuts = sorted({0, len(layout.text), *(x for a, b, _ in layout.spans for x in (a, b))})
    trained_at = {a for a, _, _ in layout.spans}
    eos_after = {b for _, b, append in layout.spans if append}
    ids: list[int] = []
    trained: list[bool] = []
    eos_index: list[int] = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        piece = _encode(tokenizer, layout.text[lo:hi])
        ids += piece
        trained += [lo in trained_at] * len(piece)
        if hi in eos_after:
            eos_index.append(len(ids) - 1)
    retokenized = ids != _encode(tokenizer, layout.text)
    if retokenized:
        ids, trained, inserts = _by_offsets(tokenizer, layout)
        eos_index = [i for i in inserts if i >= 0]
    eos_id = tokenizer.eos_token_id
    if eos_id is None and eos_index:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    for i in sorted(eos_index, reverse=True):  # insert from the right so earlier indices stay valid
        ids.insert(i + 1, eos_id)
        trained.insert(i + 1, True)
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids.insert(0, bos_id)
        trained.insert(0, False)
    labels = [t if (train_on_prompt or flag) else IGNORE_INDEX for t, flag in zip(ids, trained, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels, retokenized


def render_tokens(
    record: Record, tokenizer: Any, *, template: str = "auto", train_on_prompt: bool = False
) -> tuple[Example, RenderInfo]:
    """Untruncated rendering: (Example, RenderInfo)."""
    layout = _layout(record, tokenizer, resolve_template(template, tokenizer))
    ids, labels, retokenized = tokenize_layout(tokenizer, layout, train_on_prompt)
    return Example(ids, labels, record.source), RenderInfo(len(ids), retokenized)


def apply_length_policy(example: Example, max_length: int, truncation: str) -> Example | None:
    """Keep the first `max_length` tokens (`truncate`) or drop a longer row (`drop`); None when dropped or
    when no trained token is left."""
    if truncation not in ("truncate", "drop"):
        raise DataError(f"data.truncation: unknown policy {truncation!r}; use truncate or drop")
    if len(example.input_ids) > max_length:
        if truncation == "drop":
            return None
        example = Example(example.input_ids[:max_length], example.labels[:max_length], example.source)
    if all(label == IGNORE_INDEX for label in example.labels):
        return None
    return example


def render_record(
    record: Record,
    tokenizer: Any,
    *,
    template: str = "auto",
    max_length: int,
    train_on_prompt: bool = False,
    truncation: str = "truncate",
) -> Example | None:
    """One record -> Example (input_ids/labels of length <= max_length), or None when dropped."""
    example, _ = render_tokens(record, tokenizer, template=template, train_on_prompt=train_on_prompt)
    return apply_length_policy(example, max_length, truncation)


def _prompt_messages(messages_or_instruction: str | Record | Sequence[Message]) -> tuple[Record, str]:
    if isinstance(messages_or_instruction, str):
        return Record((Message("user", messages_or_instruction),), None, "prompt"), "messages"
    if isinstance(messages_or_instruction, Record):
        record = messages_or_instruction
        if record.text is not None:
            return record, "text"
        assert record.messages is not None
        messages = record.messages
        if messages[-1].role == "assistant":
            messages = messages[:-1]
        return Record(messages, None, record.source, record.instruction_input), "messages"
    return Record(tuple(messages_or_instruction), None, "prompt"), "messages"


def prompt_ids(
    messages_or_instruction: str | Record | Sequence[Message], tokenizer: Any, template: str
) -> list[int]:
    """Token ids to generate from: the conversation without its last answer, followed by the generation
    prompt (chat) or `### Response:\\n` (alpaca); a text record or string under `text` is used as is.
    For a record rendered without boundary merges this is a prefix of its rendered `input_ids`."""
    record, kind = _prompt_messages(messages_or_instruction)
    resolved = resolve_template(template, tokenizer)
    if kind == "text" or resolved == "text":
        text = (
            record.text if record.text is not None else "\n\n".join(m.content for m in record.messages or ())
        )
        layout = _Layout(text, [])
    else:
        # Lay out the conversation with a placeholder answer and cut where that answer starts; earlier
        # answers keep their spans so their EOS is placed exactly as in training.
        closed = Record(
            (*(record.messages or ()), Message("assistant", "x")),
            None,
            record.source,
            record.instruction_input,
        )
        full = _layout(closed, tokenizer, resolved)
        layout = _Layout(full.text[: full.spans[-1][0]], full.spans[:-1])
    ids, _, _ = tokenize_layout(tokenizer, layout, train_on_prompt=True)
    return ids
