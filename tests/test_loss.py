"""The fused output head + cross-entropy: same loss and gradients as the full logits, without the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.tiny import make_tiny_llama
from qlorakit.config import LoRAConfig
from qlorakit.core.errors import DataError
from qlorakit.data.collate import collate, pack_examples
from qlorakit.data.render import Example
from qlorakit.lora.inject import inject_lora, prepare_for_kbit_training
from qlorakit.lora.modules_to_save import ModulesToSaveWrapper
from qlorakit.loss import (
    causal_lm_loss_sum,
    fused_output_head,
    linear_cross_entropy_sum,
    token_loss_sum,
)
from qlorakit.train.distributed import DistContext
from qlorakit.train.loop import accumulate_gradients, evaluate_loss

pytestmark = pytest.mark.dtype_sensitive

VOCAB = 320


def reference(hidden, weight, targets, bias=None):
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


def grads_of(loss_fn, *tensors):
    for t in tensors:
        t.grad = None
    loss = loss_fn()
    (2.5 * loss).backward()  # a non-unit incoming gradient, as the loop's 1/tokens scaling gives
    return loss.detach(), [t.grad.clone() for t in tensors]


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------
# The pure function


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [(7, 13), (1, 1000), (1000, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients_equal_cross_entropy(weight_dtype, chunks, with_bias):
    gen = torch.Generator().manual_seed(0)
    n, dim, vocab = 53, 24, 211  # chunk sizes above do not divide N or V
    hidden = leaf(torch.randn(n, dim, generator=gen))
    weight = leaf((torch.randn(vocab, dim, generator=gen) * 0.3).to(weight_dtype))
    bias = leaf(torch.randn(vocab, generator=gen).to(weight_dtype)) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::4] = -100
    params = [hidden, weight] + ([bias] if with_bias else [])
    ref, ref_grads = grads_of(lambda: reference(hidden, weight, targets, bias), *params)
    out, out_grads = grads_of(
        lambda: linear_cross_entropy_sum(
            hidden, weight, targets, bias, chunk_tokens=chunks[0], chunk_vocab=chunks[1]
        ),
        *params,
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for got, want, p in zip(out_grads, ref_grads, params, strict=True):
        assert got.dtype == p.dtype
        tol = dict(rtol=1e-5, atol=1e-5) if p.dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
        torch.testing.assert_close(got, want, **tol)
    assert (out_grads[0][::4] == 0).all()  # ignored rows get no gradient


def test_bf16_hidden_gets_bf16_gradient_of_the_fp32_loss():
    gen = torch.Generator().manual_seed(1)
    hidden = leaf(torch.randn(40, 16, generator=gen).to(torch.bfloat16))
    weight = torch.randn(100, 16, generator=gen).to(torch.bfloat16)  # frozen: no weight gradient
    targets = torch.randint(0, 100, (40,), generator=gen)
    ref, (ref_g,) = grads_of(lambda: reference(hidden, weight, targets), hidden)
    out, (out_g,) = grads_of(
        lambda: linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=9), hidden
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    assert out_g.dtype == torch.bfloat16
    torch.testing.assert_close(out_g, ref_g, rtol=1.6e-2, atol=1e-3)


def test_autocast_rounds_the_head_matmul_as_nn_linear_does():
    gen = torch.Generator().manual_seed(2)
    hidden = leaf(torch.randn(64, 32, generator=gen))
    weight = leaf(torch.randn(300, 32, generator=gen) * 0.5)
    targets = torch.randint(0, 300, (64,), generator=gen)

    def today():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def fused():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens=17, chunk_vocab=50)

    ref, ref_grads = grads_of(today, hidden, weight)
    out, out_grads = grads_of(fused, hidden, weight)
    exact = reference(hidden, weight, targets)
    assert (ref - exact).abs() > 1e-4  # the bf16 rounding is visible ...
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)  # ... and reproduced
    for got, want in zip(out_grads, ref_grads, strict=True):
        # bf16 products summed over vocab blocks round differently from one bf16 matmul: a few bf16 ulps
        # of the gradient's scale, the size of the rounding today's path itself carries.
        assert (got - want).abs().max() <= 4 * 2**-8 * want.abs().max()


@pytest.mark.parametrize("n", [0, 6])
def test_no_counted_token_gives_zero_with_a_working_backward(n):
    hidden = leaf(torch.randn(n, 8))
    weight = leaf(torch.randn(30, 8))
    loss = linear_cross_entropy_sum(hidden, weight, torch.full((n,), -100))
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert hidden.grad.shape == (n, 8) and (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_out_of_vocabulary_label_names_the_id():
    with pytest.raises(DataError, match="token id 30"):
        linear_cross_entropy_sum(torch.randn(4, 8), torch.randn(30, 8), torch.tensor([1, 30, -100, 2]))


# ---------------------------------------------------------------------------------------------------------
# On a real tiny Llama with qlorakit LoRA


def lora_llama(
    *, tie=False, modules_to_save=(), targets=("q_proj", "v_proj", "down_proj"), gc=False, bias=False
):
    model = make_tiny_llama(vocab_size=VOCAB, tie_word_embeddings=tie)
    if bias:
        head = nn.Linear(model.config.hidden_size, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0, 0.5)
        model.lm_head = head
    prepare_for_kbit_training(model, gradient_checkpointing=gc)
    cfg = LoRAConfig(
        r=4, alpha=8, dropout=0.0, target_modules=list(targets), modules_to_save=list(modules_to_save)
    )
    inject_lora(model, cfg, seed=0)
    with torch.no_grad():  # nonzero B so every LoRA factor gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    return model


def make_batch(packed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(5):
        size, prompt = int(torch.randint(6, 20, (1,), generator=gen)), 3 + i % 3
        ids = torch.randint(4, VOCAB, (size,), generator=gen).tolist()
        rows.append(Example(ids, [-100] * prompt + ids[prompt:], f"row{i}"))
    return collate(pack_examples(rows, 40) if packed else rows, pad_id=3)


def model_loss_and_grads(model, batch, fused, **chunks):
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if fused:
        loss = causal_lm_loss_sum(model, inputs, batch["labels"], **chunks)
    else:
        loss = token_loss_sum(model(**inputs, use_cache=False).logits, batch["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


CASES = {
    "plain": dict(),
    "gradient_checkpointing": dict(gc=True),
    "packed": dict(packed=True),
    "modules_to_save": dict(modules_to_save=["lm_head"]),
    "tied": dict(tie=True),
    "head_bias": dict(bias=True, modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_lora_loss_and_gradients_equal_the_full_logits_path(case):
    options = dict(CASES[case])
    batch = make_batch(packed=options.pop("packed", False))
    model = lora_llama(**options)
    head = fused_output_head(model)
    assert head is not None
    if "modules_to_save" in options:
        assert isinstance(model.lm_head, ModulesToSaveWrapper) and head is model.lm_head.active_module()
    ref, ref_grads = model_loss_and_grads(model, batch, fused=False)
    out, out_grads = model_loss_and_grads(model, batch, fused=True, chunk_tokens=7, chunk_vocab=100)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert set(out_grads) == set(ref_grads) and any("lora_A" in n for n in ref_grads)
    if "modules_to_save" in options:
        assert any("modules_to_save.default.weight" in n for n in ref_grads)
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name
        torch.testing.assert_close(out_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert isinstance(model.lm_head, nn.Linear | ModulesToSaveWrapper)  # the head is back in place


def test_llama_under_autocast_matches_the_full_logits_path_under_autocast():
    batch = make_batch(seed=3)
    model = lora_llama(modules_to_save=["lm_head"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = model_loss_and_grads(model, batch, fused=False)
        out, out_grads = model_loss_and_grads(model, batch, fused=True, chunk_tokens=16, chunk_vocab=100)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for name, want in ref_grads.items():  # bf16 rounding of blockwise products: a few ulps of the scale
        assert (out_grads[name] - want).abs().max() <= 4 * 2**-8 * want.abs().max(), name


def test_gpt2_with_tied_head_is_fused_and_exact():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    model = GPT2LMHeadModel(cfg)
    model.requires_grad_(False)
    model.transformer.wte.weight.requires_grad_(True)  # the tied head: its gradient sums both uses
    model.transformer.ln_f.requires_grad_(True)
    model.train()
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = make_batch()
    batch["attention_mask"] = batch["attention_mask"].float()
    assert fused_output_head(model) is model.lm_head
    ref, ref_grads = model_loss_and_grads(model, batch, fused=False)
    out, out_grads = model_loss_and_grads(model, batch, fused=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(out_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def tiny_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0,
    )  # fmt: skip
    return Gemma2ForCausalLM(cfg)


def softcapped_llama():
    model = make_tiny_llama(vocab_size=VOCAB)
    model.config.final_logit_softcapping = 30.0
    return model


@pytest.mark.parametrize(
    "build",
    [
        lambda: lora_llama(targets=["q_proj", "lm_head"]),  # LoRA on the head
        softcapped_llama,
        tiny_gemma2,  # softcapped logits, not on the known list
    ],
    ids=["lora_on_head", "softcap_config", "gemma2"],
)
def test_heads_it_cannot_fuse_fall_back_to_the_full_logits(build):
    model = build()
    model.train()
    assert fused_output_head(model) is None
    batch = make_batch()
    ref, ref_grads = model_loss_and_grads(model, batch, fused=False)
    with MaxNumel() as seen:
        out, out_grads = model_loss_and_grads(model, batch, fused=True)
    assert seen.largest >= batch["input_ids"].numel() * VOCAB  # the full logits were computed
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(out_grads[name], ref_grads[name], rtol=0, atol=0)


def test_a_failing_forward_puts_the_head_back():
    model = lora_llama()
    head = model.lm_head
    bad = {"input_ids": torch.tensor([[1, VOCAB + 5]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    with pytest.raises(IndexError):
        causal_lm_loss_sum(model, bad, torch.tensor([[1, 2]]))
    assert model.lm_head is head


def test_training_loop_steps_use_the_fused_loss():
    batches = [make_batch(seed=1), make_batch(packed=True, seed=2)]
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None)
    model = lora_llama()
    loss, tokens, _ = accumulate_gradients(model, batches, ctx, None)
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        ref, grads = model_loss_and_grads(model, batch, fused=False)
        total += float(ref)
        for name, g in grads.items():
            fused[name] -= g / tokens
    assert loss == pytest.approx(total / tokens, rel=1e-5)
    assert max(float(g.abs().max()) for g in fused.values()) < 1e-6
    val = evaluate_loss(
        model, [0], lambda _: batches[0], batch_size=1, max_batches=None, ctx=ctx, autocast_dtype=None
    )
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        plain = token_loss_sum(model(**inputs).logits, batches[0]["labels"])
    assert val == pytest.approx(float(plain) / int((batches[0]["labels"][:, 1:] != -100).sum()), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Memory


class MaxNumel(TorchDispatchMode):
    """The largest tensor any operation allocates while active (views of its inputs do not count; CPU
    forward and backward both run on this thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def saved_activation_bytes(model, run) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward during `run()`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


def test_fused_path_saves_and_creates_nothing_logits_sized():
    vocab = 4096
    model = make_tiny_llama(vocab_size=vocab)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=0)
    model.train()
    ids = torch.randint(4, vocab, (4, 48), generator=torch.Generator().manual_seed(0))
    inputs, labels = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()
    logits_bytes = ids.shape[0] * (ids.shape[1] - 1) * vocab * 4  # the shifted fp32 logits

    def plain():
        token_loss_sum(model(**inputs).logits, labels).backward()

    def fused():
        causal_lm_loss_sum(model, inputs, labels, chunk_tokens=64, chunk_vocab=512).backward()

    plain_saved, fused_saved = saved_activation_bytes(model, plain), saved_activation_bytes(model, fused)
    # The plain path keeps the fp32 log-probabilities [N, V] on top of the decoder's activations; the fused
    # path keeps instead at most the hidden states [N, H] fp32 and a few numbers per token.
    n, dim = ids.numel(), model.config.hidden_size
    assert plain_saved >= logits_bytes
    assert fused_saved <= plain_saved - logits_bytes + n * (dim * 4 + 4 + 8 + 8)
    with MaxNumel() as seen_plain:
        plain()
    with MaxNumel() as seen_fused:
        fused()
    assert seen_plain.largest >= ids.numel() * vocab
    assert seen_fused.largest < ids.numel() * vocab / 4
