"""QLoRA training step: qlorakit vs bitsandbytes+PEFT, PEFT 16-bit LoRA, and torchao NF4 + LoRA.

Workload: a ~168M-parameter Llama (hidden 1024, intermediate 2816, 8 layers, 16 heads, vocab 32000, untied
head), batch 4 x 256 tokens, LoRA r=16, alpha=32, dropout 0.05 on all 7 projections, AdamW lr 2e-4.
Each (method, checkpointing) pair runs in its own process (so peak RSS includes loading), interleaved over
rounds; the table reports medians and ratios. A separate run per method trains 20 steps on one fixed batch
to compare the loss curves (same learning). qlorakit's step computes the loss as its training loop does
(`qlorakit.train.loop.batch_loss_sum`: the fused output head + cross-entropy, no full logits); the peers
use `model(**batch).loss`.

    python benchmarks/bench_train.py            # full
    python benchmarks/bench_train.py --quick    # tiny model, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["qlorakit", "peft_bnb", "peft_bf16", "torchao"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(quick: bool) -> dict:
    if quick:
        return dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
        )
    return dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    )


def make_model_dir(root: Path, quick: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**model_config(quick), max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = root / "model"
    model.save_pretrained(out)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {out}")
    return out


def fixed_batch(vocab: int, batch: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# --- building each method's trainable model (worker side) ----------------------------------------------


def build_qlorakit(model_dir: Path, gc: bool):
    import torch

    from qlorakit.config import LoRAConfig, QuantConfig
    from qlorakit.lora.inject import inject_lora, prepare_for_kbit_training
    from qlorakit.memory import configure_allocator
    from qlorakit.quant.linear import default_compute_dtype
    from qlorakit.quant.loading import load_quantizing

    # As `qlorakit train` does: the command line fixes malloc's mmap threshold at start-up, the recipe
    # loads through qlorakit.models.load_model, which for this folder (no tokenizer here) is
    # load_quantizing: each linear quantized as it is read, the rest in the compute dtype (fp32 on CPUs
    # without native bf16).
    configure_allocator()
    compute = default_compute_dtype(torch.device("cpu"))
    model = load_quantizing(model_dir, QuantConfig(), compute)
    prepare_for_kbit_training(model, gradient_checkpointing=gc)  # freezes the base, so before injecting
    inject_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=TARGETS), seed=0)
    return model, None if compute == torch.float32 else compute


def build_peft_bnb(model_dir: Path, gc: bool):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, dtype=torch.bfloat16, device_map="cpu"
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    return model, torch.bfloat16


def build_peft_bf16(model_dir: Path, gc: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    return model, torch.bfloat16


def build_torchao(model_dir: Path, gc: bool):
    """torchao's NF4 tensor as the frozen base plus a hand-written LoRA (torchtune's recipe, reduced)."""
    import math

    import torch
    from torch import nn
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    from transformers import AutoModelForCausalLM

    class NF4LoRA(nn.Module):
        def __init__(self, base: nn.Linear, r=16, alpha=32, dropout=0.05):
            super().__init__()
            self.weight = nn.Parameter(to_nf4(base.weight.data.to(torch.bfloat16)), requires_grad=False)
            self.lora_a = nn.Linear(base.in_features, r, bias=False)
            self.lora_b = nn.Linear(r, base.out_features, bias=False)
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b.weight)
            self.dropout = nn.Dropout(dropout)
            self.scaling = alpha / r

        def forward(self, x):
            out = linear_nf4(input=x, weight=self.weight)
            return out + self.scaling * self.lora_b(self.lora_a(self.dropout(x))).to(out.dtype)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in TARGETS:
                setattr(module, child_name, NF4LoRA(child))
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model, torch.bfloat16


BUILDERS = {
    "qlorakit": build_qlorakit,
    "peft_bnb": build_peft_bnb,
    "peft_bf16": build_peft_bf16,
    "torchao": build_torchao,
}


def qlorakit_loss(model, batch: dict, autocast):
    """The mean token loss exactly as qlorakit's training loop computes it (fused head + cross-entropy
    where the model allows it, under the same autocast), equal to `model(**batch).loss`."""
    import torch

    from qlorakit.train.loop import batch_loss_sum, count_label_tokens

    return batch_loss_sum(model, batch, torch.device("cpu"), autocast) / count_label_tokens(batch)


def worker(args: argparse.Namespace) -> None:
    import contextlib

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, autocast = BUILDERS[args.worker](Path(args.model), args.gc)
    load_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    batch = fixed_batch(cfg["vocab_size"], args.batch, args.seq)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        if args.worker == "qlorakit":
            loss = qlorakit_loss(model, batch, autocast)
        else:
            ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
            with ctx:
                loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    from qlorakit.memory import peak_rss_bytes  # no torch import: adds nothing to the peers' memory

    peak = peak_rss_bytes()  # this worker's own peak (ru_maxrss would include the parent's at fork)
    print(
        json.dumps(
            {
                "times": times,
                "losses": losses,
                "peak_rss": peak,
                "load_s": load_s,
                "trainable": sum(p.numel() for p in params),
            }
        )
    )


def run_worker(
    method: str, gc: bool, model_dir: Path, a: argparse.Namespace, steps: int, warmup: int
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--model",
        str(model_dir),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--batch",
        str(a.batch),
        "--seq",
        str(a.seq),
        "--threads",
        str(a.threads),
    ]
    if gc:
        cmd.append("--gc")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", choices=METHODS)
    p.add_argument("--model")
    p.add_argument("--gc", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loss-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    if a.quick:
        a.seq, a.rounds, a.loss_steps, a.steps = 64, 1, 5, 2
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp), a.quick)
        results: dict[tuple[str, bool], list[dict]] = {}
        for rnd in range(a.rounds):
            for gc in (False, True):
                for method in a.methods:
                    r = run_worker(method, gc, model_dir, a, a.steps, a.warmup)
                    results.setdefault((method, gc), []).append(r)
                    print(
                        f"round {rnd} {method:10s} gc={int(gc)}: "
                        + (
                            r["error"]
                            if "error" in r
                            else f"{statistics.median(r['times']):.2f} s/step, "
                            f"peak {r['peak_rss'] / 2**30:.2f} GiB"
                        ),
                        flush=True,
                    )
        curves = {m: run_worker(m, False, model_dir, a, 0, a.loss_steps) for m in a.methods}
    report(results, curves, a)


def report(results: dict, curves: dict, a: argparse.Namespace) -> None:
    tokens = a.batch * a.seq
    print(
        f"\nbatch {a.batch} x {a.seq} tokens, {a.threads} threads, medians over {a.rounds} rounds x {a.steps} steps"
    )
    print(
        f"{'method':10s} {'ckpt':>4s} {'s/step':>8s} {'tok/s':>8s} {'peak GiB':>9s} {'vs peft_bnb':>12s} "
        f"{'vs peft_bf16':>13s} {'RSS vs torchao':>15s}"
    )
    med = {}
    for (method, gc), runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if ok:
            med[(method, gc)] = (
                statistics.median(t for r in ok for t in r["times"]),
                statistics.median(r["peak_rss"] for r in ok),
            )
    for (method, gc), (t, rss) in sorted(med.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):

        def ratio(other: str, idx: int, cur: float, gc: bool = gc) -> str:
            ref = med.get((other, gc))
            return f"{ref[idx] / cur:.2f}x" if ref else "-"

        rss_ratio = f"{rss / med[('torchao', gc)][1]:.2f}" if ("torchao", gc) in med else "-"
        print(
            f"{method:10s} {int(gc):>4d} {t:8.2f} {tokens / t:8.0f} {rss / 2**30:9.2f} "
            f"{ratio('peft_bnb', 0, t):>12s} {ratio('peft_bf16', 0, t):>13s} {rss_ratio:>15s}"
        )
    for (method, gc), runs in results.items():
        for r in runs:
            if "error" in r:
                print(f"{method} gc={int(gc)} failed: {r['error']}")
    print(
        f"\nloss on one fixed batch, steps 1..{a.loss_steps} (speed ratios above are peer time / qlorakit time)"
    )
    for method, r in curves.items():
        if "error" in r:
            print(f"{method:10s} failed: {r['error']}")
        else:
            ls = r["losses"]
            print(
                f"{method:10s} first {ls[0]:.4f} last {ls[-1]:.4f}  "
                + " ".join(f"{x:.3f}" for x in ls[:: max(1, len(ls) // 10)])
            )


if __name__ == "__main__":
    main()
