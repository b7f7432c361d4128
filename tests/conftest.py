"""Shared fixtures: tiny real transformers models and a real tokenizer, built on the fly (no hub).

Also two rules for the whole suite:
- a fresh qlorakit cache (`QLORAKIT_CACHE` in a temporary folder, unless the caller sets one), so the
  first-use work a new user meets (the built-in GGUF converted to safetensors, the C++ kernels compiled)
  runs in every test session instead of hiding behind a developer's warm `~/.cache/qlorakit`;
- under CI (`CI=true`) a test skipped because bitsandbytes, PEFT, another test dependency or the C++
  kernels are missing is a failure: CI installs all of them, so such a skip means a broken install.
"""

from __future__ import annotations

import os
import re
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("QLORAKIT_CACHE"):
    # Set before qlorakit is imported anywhere; subprocesses started by tests inherit it.
    os.environ["QLORAKIT_CACHE"] = tempfile.mkdtemp(prefix="qlorakit-test-cache-")

import pytest
import torch

# Skip reasons that mean "something CI installs is missing" (importorskip says "could not import").
_MISSING_DEPENDENCY = re.compile(r"could not import|No module named|could not be built|not installed", re.I)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_dependency_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_dependency_skip(outcome.get_result())


def _fail_missing_dependency_skip(report) -> None:
    if not (_in_ci() and report.skipped):
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if _MISSING_DEPENDENCY.search(reason):
        report.outcome = "failed"
        report.longrepr = f"CI must not skip for a missing dependency (CI installs it): {reason}"


def bnb_reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a transformers + bitsandbytes 4-bit model through bitsandbytes' training path.

    That path dequantizes with bitsandbytes' own `dequantize_4bit` and runs one matmul in the layer's
    compute dtype, whatever the CPU. Its no-grad eval path does not: on CPUs with AVX512-BF16 it repacks the
    weight and runs a bf16-only fused kernel, so a reference taken there would depend on the machine.
    The path is chosen by the input requiring a gradient, so the embeddings go in as a leaf that does.
    """
    model.eval()  # no dropout; `training` is not what selects bitsandbytes' kernel, requires_grad is
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.enable_grad():
        return model(inputs_embeds=embeds).logits.detach()


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nReverse the word.\n\n### Input:\nhello\n\n### Response:\nolleh",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) , . ? !",
    "user assistant system Hello, how are you? I am fine, thank you. What is 2 + 3? It is 5.",
]


def make_tiny_tokenizer(vocab_size: int = 320):
    """A real byte-level BPE `PreTrainedTokenizerFast` with BOS/EOS/PAD and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(
    vocab_size: int = 320,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A real `LlamaForCausalLM` with random weights (std 0.02 like a trained init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A Hugging Face folder (config.json, model.safetensors, tokenizer files) of a tiny Llama."""
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out
