"""The tokenizer part of a GGUF file: llama.cpp's `tokenizer.ggml.*` keys for a byte-level BPE tokenizer.

`tokenizer.ggml.pre` names the pre-tokenizer the way llama.cpp's convert_hf_to_gguf.py does (from the
tokenizer.json pre-tokenizer, not from a hash of its output); the token list pads ids the tokenizer lacks
with UNUSED `[PADi]` tokens, and added tokens are CONTROL (special) or USER_DEFINED.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlorakit.core.errors import FormatError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer_name(model_dir: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, from its pre-tokenizer."""
    path = model_dir / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(
            f"cannot read {path}: {exc}; GGUF export needs a fast (tokenizer.json) tokenizer"
        ) from exc
    model_type = (tok.get("model") or {}).get("type")
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if model_type != "BPE" or "ByteLevel" not in kinds:
        raise FormatError(
            f"{path}: tokenizer {model_type} with pre-tokenizer {kinds} is not byte-level BPE; "
            "GGUF export supports gpt2-style byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen2)"
        )
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        if regex == PRETOKENIZE_REGEX:
            return "qwen2"
    raise FormatError(f"{path}: pre-tokenizer {pre} has no llama.cpp equivalent known to qlorakit")


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in (
        "<pad>",
        "<mask>",
        "<unk>",
        "<s>",
        "</s>",
    )


def _vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types as llama.cpp's get_vocab_base: ids the tokenizer lacks become UNUSED `[PADi]`."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special or _looks_special(token)
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(token)
    return tokens, types


def add_tokenizer(writer: Any, model_dir: Path, n_vocab: int) -> None:
    import gguf

    pre = _pre_tokenizer_name(model_dir)
    tokens, types = _vocab(model_dir, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise FormatError(f"{model_dir / 'tokenizer.json'} has no BPE merges; cannot write a gpt2 tokenizer")
    special.add_to_gguf(writer, quiet=True)


__all__ = ["add_tokenizer"]
