"""LoRA on a 4-bit base: qlorakit vs PEFT on bitsandbytes, side by side in one process.

For each rank: forward+backward time of the bare 4-bit base and of base + LoRA (dropout 0.05, train
mode, the input requires grad as inside a model), medians over interleaved repeats, the LoRA overhead and
the qlorakit/PEFT ratios; the LoRA part's share of the layer time at r=16; what autograd keeps alive for
backward per LoRA layer (sum of saved tensors' bytes, via saved_tensors_hooks); adapter size vs base size
for the SmolLM2-135M shapes.

    python benchmarks/bench_lora.py            # 4096x4096 base, 1024 tokens, r = 8, 16, 64
    python benchmarks/bench_lora.py --quick    # small sizes, to check that it runs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import OrderedDict

import torch
from torch import nn

from qlorakit.lora import LoRALinear
from qlorakit.quant.linear import Linear4bit, default_compute_dtype

DROPOUT = 0.05


def bnb_linear4bit(dense: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes `Linear4bit` (NF4, double quant) holding the same weights, quantized by bitsandbytes."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        dense.in_features, dense.out_features, bias=False, compute_dtype=compute_dtype,
        compress_statistics=True, quant_type="nf4",
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        dense.weight.detach().clone(), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    return layer.to("cpu")


def peft_lora(base: nn.Module, r: int) -> nn.Module:
    """PEFT's LoRA layer around `base` (through get_peft_model on a one-layer model)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        nn.Sequential(OrderedDict(proj=base)),
        LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=DROPOUT, target_modules=["proj"]),
    )
    return model.base_model.model.proj.train()


def _randomise_b(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.01)


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    out = module(x)
    out.backward(grad)
    elapsed = time.perf_counter() - start
    x.grad = None
    for p in module.parameters():
        p.grad = None
    return elapsed


def interleaved_medians(
    modules: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Median seconds per module; the modules take turns so a noisy neighbour hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in modules}
    for m in modules.values():  # warm-up (allocator, first-call dispatch)
        fwd_bwd(m, x, grad)
    for _ in range(repeats):
        for k, m in modules.items():
            times[k].append(fwd_bwd(m, x, grad))
    return {k: statistics.median(v) for k, v in times.items()}


def saved_tensors(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors autograd saves for backward during one forward pass."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return saved


def saved_bytes(module: nn.Module, x: torch.Tensor) -> tuple[int, int, list[str]]:
    """(bytes of new activations saved, bytes of references to x/params/buffers, descriptions).

    Each storage counts once. References cost nothing extra: the parameters and 4-bit buffers exist
    anyway, and x is the layer input that the base layer and sibling adapters (q/k/v, gate/up) share.
    """
    shared = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers(), x)}
    seen: set[int] = set()
    new = ref = 0
    desc = []
    for t in saved_tensors(module, x):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        nbytes = t.untyped_storage().nbytes()
        is_ref = ptr in shared
        ref += nbytes if is_ref else 0
        new += 0 if is_ref else nbytes
        desc.append(f"{'ref ' if is_ref else ''}{list(t.shape)} {str(t.dtype).removeprefix('torch.')}")
    return new, ref, desc


def bench_speed(
    in_f: int, out_f: int, tokens: int, ranks: list[int], repeats: int
) -> dict[int, dict[str, float]]:
    compute = default_compute_dtype(torch.device("cpu"))
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        dense.weight.normal_(std=0.02)
    ours_base = Linear4bit.from_linear(dense, compute_dtype=compute)
    bnb_base = bnb_linear4bit(dense, compute)
    x = torch.randn(tokens, in_f, requires_grad=True)
    grad = torch.randn(tokens, out_f)
    print(f"\n## forward+backward, {out_f}x{in_f} 4-bit base (NF4 + double quant), {tokens} tokens, compute {compute}, "
          f"dropout {DROPOUT}, {torch.get_num_threads()} threads, median of {repeats}")  # fmt: skip
    print(f"{'r':>4} {'base q':>9} {'base bnb':>9} {'lora q':>9} {'lora peft':>10} {'ovh q':>8} {'ovh peft':>9} "
          f"{'total q/peft':>12} {'ovh q/peft':>10}")  # fmt: skip
    results = {}
    for r in ranks:
        ours = LoRALinear(ours_base, r=r, alpha=2 * r, dropout=DROPOUT, seed=0).train()
        theirs = peft_lora(copy.deepcopy(bnb_base), r)
        _randomise_b(ours)
        _randomise_b(theirs)
        m = interleaved_medians({"bq": ours_base, "bb": bnb_base, "lq": ours, "lp": theirs}, x, grad, repeats)
        ovh_q, ovh_p = m["lq"] - m["bq"], m["lp"] - m["bb"]
        results[r] = dict(m, ovh_q=ovh_q, ovh_p=ovh_p)
        print(f"{r:>4} {m['bq'] * 1e3:>7.1f}ms {m['bb'] * 1e3:>7.1f}ms {m['lq'] * 1e3:>7.1f}ms {m['lp'] * 1e3:>8.1f}ms "
              f"{ovh_q * 1e3:>6.1f}ms {ovh_p * 1e3:>7.1f}ms {m['lq'] / m['lp']:>12.2f} "
              f"{ovh_q / ovh_p if ovh_p > 0 else float('nan'):>10.2f}")  # fmt: skip
    if 16 in results:
        m = results[16]
        print(f"LoRA share of the layer time at r=16: qlorakit {100 * m['ovh_q'] / m['lq']:.1f}%, "
              f"PEFT {100 * m['ovh_p'] / m['lp']:.1f}%")  # fmt: skip
    return results


def bench_memory(in_f: int, out_f: int, tokens: int, r: int) -> None:
    compute = default_compute_dtype(torch.device("cpu"))
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False)
    ours_base = Linear4bit.from_linear(dense, compute_dtype=compute)
    bnb_base = bnb_linear4bit(dense, compute)
    x = torch.randn(tokens, in_f, requires_grad=True)
    print(f"\n## saved for backward per LoRA layer (r={r}, {tokens} tokens, {out_f}x{in_f}; dense weight would be "
          f"{in_f * out_f * 4 / 2**20:.1f} MiB fp32)")  # fmt: skip
    for p in (0.0, DROPOUT):
        rows = {
            "qlorakit": (ours_base, LoRALinear(ours_base, r=r, alpha=2 * r, dropout=p, seed=0).train()),
            "peft+bnb": (
                bnb_base,
                peft_lora(copy.deepcopy(bnb_base), r) if p else _peft_no_dropout(bnb_base, r),
            ),
        }
        for name, (base, layer) in rows.items():
            base_new, _, _ = saved_bytes(base, x)
            new, ref, desc = saved_bytes(layer, x)
            dense_kept = [d for d in desc if d.removeprefix("ref ").startswith(f"[{out_f}, {in_f}]")]
            print(f"dropout={p:<5} {name:>9}: new tensors kept for backward {new / 2**20:7.2f} MiB (base alone "
                  f"{base_new / 2**20:.2f} MiB) + refs to x/params/buffers {ref / 2**20:.2f} MiB; "
                  f"dense [out,in] kept: {dense_kept or 'none'}")  # fmt: skip
            print(f"{'':>26}saved: {', '.join(desc)}")


def _peft_no_dropout(base: nn.Module, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        nn.Sequential(OrderedDict(proj=copy.deepcopy(base))),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]),
    )
    return model.base_model.model.proj.train()


def adapter_vs_base_sizes(r: int = 16) -> None:
    """Bytes of an all-linear adapter vs the base, for the SmolLM2-135M shapes (computed, nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    linear = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    lin_params = sum(m.weight.numel() for m in linear)
    total = sum(p.numel() for p in model.parameters())
    adapter = sum(r * (m.in_features + m.out_features) for m in linear) * 4  # fp32 A and B
    bf16 = total * 2
    q4 = (total - lin_params) * 2 + lin_params * (4 + 0.127) / 8
    print(f"\n## sizes, SmolLM2-135M shapes, r={r} on all {len(linear)} linear layers")
    print(f"adapter {adapter / 2**20:.1f} MiB | base bf16 {bf16 / 2**20:.1f} MiB ({100 * adapter / bf16:.1f}%) | "
          f"base NF4+DQ {q4 / 2**20:.1f} MiB ({100 * adapter / q4:.1f}%)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that the script runs")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        size, tokens, ranks, repeats = 512, 128, [8, 16], args.repeats or 3
    else:
        size, tokens, ranks, repeats = 4096, 1024, [8, 16, 64], args.repeats or 10
    bench_speed(size, size, tokens, ranks, repeats)
    bench_memory(size, size, tokens, 16)
    adapter_vs_base_sizes()


if __name__ == "__main__":
    main()
