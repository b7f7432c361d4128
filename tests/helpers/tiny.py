"""Tiny real transformers models, a real tokenizer and LoRA adapters for them, built on the fly (no hub), and
a reference path through bitsandbytes."""

from __future__ import annotations

from pathlib import Path

import torch

from qlorakit.config import LoRAConfig
from qlorakit.lora import inject_lora, lora_layers, save_adapter


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


def save_tiny_model(folder: Path, **llama: object) -> Path:
    """A Hugging Face folder at `folder`: a tiny Llama (`make_tiny_llama(**llama)`, vocabulary sized to the
    tokenizer) and the tiny tokenizer; returns `folder`."""
    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(vocab_size=len(tokenizer), **llama).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(
    model_dir: Path, out: Path, *, seed: int, strength: float = 0.3, r: int = 4, use_dora: bool = False
) -> Path:
    """A real adapter folder for the model in `model_dir`, made and saved by qlorakit, with random non-zero
    weights: B ~ N(0, strength^2) (0.3 visibly changes generations), DoRA magnitudes scaled by 1 + N(0, 0.2^2)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoRAConfig(r=r, alpha=8.0, dropout=0.0, use_dora=use_dora)
    inject_lora(model, cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * strength)
            if use_dora:
                m = layer.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=gen))
    save_adapter(model, out, cfg, base_model_name_or_path=str(model_dir))
    return out
