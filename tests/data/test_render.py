"""Rendering records to input_ids/labels: templates, BOS/EOS rules, label masks, boundary merges, truncation."""

from __future__ import annotations

import copy

import pytest

from qlorakit.core.errors import DataError
from qlorakit.data import IGNORE_INDEX, Message, Record, prompt_ids, render_record, resolve_template
from qlorakit.data.render import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT, render_tokens


def conv(*turns: str, system: str | None = None) -> Record:
    roles = ["user", "assistant"] * len(turns)
    messages = [Message(r, t) for r, t in zip(roles, turns, strict=False)]
    if system is not None:
        messages.insert(0, Message("system", system))
    return Record(tuple(messages), None, "test:1")


def alpaca(instruction: str, inp: str, output: str) -> Record:
    user = f"{instruction}\n\n{inp}" if inp else instruction
    return Record((Message("user", user), Message("assistant", output)), None, "test:1", (instruction, inp))


def trained(ex, tok) -> list[int]:
    return [t for t in ex.labels if t != IGNORE_INDEX]


def variant(tok, **attrs):
    out = copy.deepcopy(tok)
    for key, value in attrs.items():
        setattr(out, key, value)
    return out


@pytest.fixture(scope="module")
def no_chat(tiny_tokenizer):
    return variant(tiny_tokenizer, chat_template=None)


@pytest.fixture(scope="module")
def pad_is_eos(tiny_tokenizer):
    return variant(tiny_tokenizer, pad_token=tiny_tokenizer.eos_token)


def test_chat_rendering_matches_the_template_with_one_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = conv("Reverse the word.\n\nhello", "olleh", system="Be brief.")
    ex = render_record(rec, tok, template="chat", max_length=512)
    text = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in rec.messages], tokenize=False
    )
    assert tok.decode(ex.input_ids) == text
    assert ex.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    # ChatML: the BOS is <|im_start|>; the rendering starts with it, so none is added.
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[1] != tok.bos_token_id
    assert tok.decode(trained(ex, tok)) == "olleh<|im_end|>"
    assert ex.labels[-1] == IGNORE_INDEX  # the newline after <|im_end|> belongs to the next turn's framing
    assert len(ex.labels) == len(ex.input_ids)


def test_every_assistant_turn_is_trained(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = render_record(conv("What is 2 + 3?", "5", "And 2 + 2?", "4"), tok, template="chat", max_length=512)
    eos = tok.eos_token_id
    spans, current = [], []
    for tid, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tid
            current.append(tid)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["5<|im_end|>", "4<|im_end|>"]
    assert ex.input_ids.count(eos) == 4 and sum(1 for t in trained(ex, tok) if t == eos) == 2


def test_train_on_prompt_trains_everything_but_position_zero(tiny_tokenizer):
    ex = render_record(
        conv("hi", "there"), tiny_tokenizer, template="chat", max_length=512, train_on_prompt=True
    )
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]


def test_auto_template_resolution(tiny_tokenizer, no_chat):
    assert resolve_template("auto", tiny_tokenizer) == "chat"
    assert resolve_template("auto", no_chat) == "alpaca"
    with pytest.raises(DataError, match="no chat template; use data.template: alpaca"):
        render_record(conv("q", "a"), no_chat, template="chat", max_length=64)
    a = render_record(alpaca("Say", "x", "y"), no_chat, template="auto", max_length=512)
    b = render_record(alpaca("Say", "x", "y"), no_chat, template="alpaca", max_length=512)
    assert a == b


@pytest.mark.parametrize("inp", ["", "hello"])
def test_alpaca_prompt_is_stanford_with_bos_and_trained_eos(no_chat, inp):
    tok = no_chat
    ex = render_record(alpaca("Reverse the word.", inp, "olleh"), tok, template="alpaca", max_length=512)
    if inp:
        prompt = f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\nReverse the word.\n\n### Input:\nhello\n\n### Response:\n"
    else:
        prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\nReverse the word.\n\n### Response:\n"
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
    assert tok.decode(ex.input_ids[1:]) == prompt + "olleh" + tok.eos_token
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id
    assert tok.decode(trained(ex, tok)) == "olleh" + tok.eos_token
    p = prompt_ids(alpaca("Reverse the word.", inp, "olleh"), tok, "alpaca")
    assert tok.decode(p[1:]) == prompt and ex.input_ids[: len(p)] == p


def test_eos_is_trained_when_pad_equals_eos(pad_is_eos):
    tok = pad_is_eos
    assert tok.pad_token_id == tok.eos_token_id
    for template in ("chat", "alpaca"):
        ex = render_record(conv("q", "a"), tok, template=template, max_length=512)
        assert tok.eos_token_id in trained(ex, tok)


def test_bos_written_by_the_template_is_not_doubled(tiny_tokenizer):
    # A template that writes {{ bos_token }} itself, with a BOS distinct from the turn marker.
    tok = variant(tiny_tokenizer, bos_token="<|endoftext|>")
    tok.chat_template = "{{ bos_token }}" + tiny_tokenizer.chat_template
    ex = render_record(conv("q", "a"), tok, template="chat", max_length=512)
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
    # The same BOS with a template that does not write it: added once.
    plain = variant(tiny_tokenizer, bos_token="<|endoftext|>")
    ex2 = render_record(conv("q", "a"), plain, template="chat", max_length=512)
    assert ex2.input_ids[0] == plain.bos_token_id and ex2.input_ids.count(plain.bos_token_id) == 1
    assert ex2.input_ids[1:] == ex.input_ids[1:]
    assert ex2.labels[0] == IGNORE_INDEX


def test_no_bos_token_means_no_bos(tiny_tokenizer):
    tok = variant(tiny_tokenizer, chat_template=None, bos_token=None)
    assert tok.bos_token_id is None
    ex = render_record(alpaca("Say", "", "y"), tok, template="alpaca", max_length=512)
    assert tok.decode(ex.input_ids).startswith(ALPACA_PREAMBLE)


def _merging_case(tok):
    """A vocabulary token that the tokenizer produces whole but that splits at a prompt/response boundary."""
    vocab = tok.get_vocab()
    for token in sorted(vocab, key=vocab.get):
        if (
            token.isalpha()
            and len(token) >= 4
            and tok(token, add_special_tokens=False)["input_ids"] == [vocab[token]]
        ):
            return token[:2], token[2:]
    raise AssertionError("the test tokenizer has no multi-letter token")


def test_boundary_merge_falls_back_to_offsets(tiny_tokenizer):
    # A template that glues turns together, so the user's last letters and the answer's first letters
    # form one token when tokenized as a whole.
    tok = variant(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    head, tail = _merging_case(tok)
    whole = tok(head + tail, add_special_tokens=False)["input_ids"]
    assert len(whole) == 1  # the merge really happens
    ex, info = render_tokens(conv(head, tail), tok, template="chat")
    assert info.retokenized
    # The whole text keeps its canonical tokens; the merged token is trained (it carries answer letters),
    # then the EOS the template does not write is appended and trained.
    assert ex.input_ids == [tok.bos_token_id, *whole, tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX, *whole, tok.eos_token_id]


def test_template_that_rewrites_earlier_turns_still_labels_each_answer(tiny_tokenizer):
    # The header depends on the number of messages, so shorter prefixes are not prefixes of the full text.
    tok = variant(tiny_tokenizer)
    tok.chat_template = (
        "[{{ messages|length }}]{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    ex, info = render_tokens(conv("hi", "Hello you", "thanks", "fine"), tok, template="chat")
    assert not info.retokenized
    pieces, current = [], []
    for tid, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE_INDEX:
            current.append(tid)
        elif current:
            pieces.append(tok.decode(current))
            current = []
    pieces.append(tok.decode(current)) if current else None
    assert pieces == ["Hello you<|im_end|>", "fine<|im_end|>"]


def test_text_records_train_every_token(tiny_tokenizer):
    rec = Record(None, "The quick brown fox.", "doc.txt:1")
    for template in ("text", "chat", "alpaca"):
        ex = render_record(rec, tiny_tokenizer, template=template, max_length=512)
        assert tiny_tokenizer.decode(ex.input_ids) == "<|im_start|>The quick brown fox.<|im_end|>"
        assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]
    with pytest.raises(DataError, match="template 'text' needs text rows"):
        render_record(conv("q", "a"), tiny_tokenizer, template="text", max_length=512)


def test_truncation_keeps_the_first_tokens_and_drop_drops(tiny_tokenizer):
    rec = conv("Reverse the word.", "The quick brown fox jumps over the lazy dog.")
    full = render_record(rec, tiny_tokenizer, template="chat", max_length=4096)
    n_prompt = full.labels.index(next(t for t in full.labels if t != IGNORE_INDEX))
    cut = n_prompt + 3
    short = render_record(rec, tiny_tokenizer, template="chat", max_length=cut)
    assert short.input_ids == full.input_ids[:cut] and short.labels == full.labels[:cut]
    assert tiny_tokenizer.eos_token_id not in trained(short, tiny_tokenizer)  # the cut answer has no EOS
    assert render_record(rec, tiny_tokenizer, template="chat", max_length=cut, truncation="drop") is None
    same = render_record(
        rec, tiny_tokenizer, template="chat", max_length=len(full.input_ids), truncation="drop"
    )
    assert same == full
    # Nothing left to train after the cut: dropped even under truncate.
    assert render_record(rec, tiny_tokenizer, template="chat", max_length=n_prompt) is None


def test_prompt_ids_is_a_prefix_of_the_rendering(tiny_tokenizer):
    rec = conv("Reverse.", "olleh", "Again.", "hello", system="Be brief.")
    ex = render_record(rec, tiny_tokenizer, template="chat", max_length=512)
    p = prompt_ids(rec, tiny_tokenizer, "auto")
    assert ex.input_ids[: len(p)] == p
    assert tiny_tokenizer.decode(p).endswith("Again.<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(ex.input_ids[len(p) :]) == "hello<|im_end|>\n"
    from_str = prompt_ids("Reverse.", tiny_tokenizer, "chat")
    assert tiny_tokenizer.decode(from_str) == "<|im_start|>user\nReverse.<|im_end|>\n<|im_start|>assistant\n"
    messages = prompt_ids([Message("user", "Reverse.")], tiny_tokenizer, "chat")
    assert messages == from_str
