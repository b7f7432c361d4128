"""QLoRA training step: qlorakit against PEFT LoRA, bitsandbytes + PEFT QLoRA and torchao NF4 + LoRA.

Workload: a random ~168M-parameter Llama (hidden 1024, intermediate 2816, 8 layers, 16 heads, vocab 32000,
untied head, saved in bf16), one fixed batch of 4 x 256 tokens, LoRA r=16, alpha=32, dropout 0.05 on all 7
projections, AdamW lr 2e-4, gradient clipping 0.3. Each (method, configuration) runs in its own process
(benchmarks/_train_worker.py), loading included, and reports its own peak RSS (VmHWM).

Configurations, each with and without gradient checkpointing, in fp32 and in bf16 (`--dtype` pins one;
`auto` is what qlorakit picks on this CPU, `QLORAKIT_CPU_BF16=0|1` forces that detection):
- qlorakit with its fused output head + cross-entropy (the training loop's loss) in every allocator mode
  qlorakit.core.memory offers (QLORAKIT_MALLOC_TUNING=<mode>, always set explicitly: `off` is glibc's default,
  `mmap` a fixed 1 MiB mmap threshold, `cache` qlorakit's block cache for tensors), and with
  the model's own full-logits loss (`model(**batch).loss`) in qlorakit's default mode, so the fused head's
  gain shows on its own. The default mode is asked of qlorakit.core.memory at run time and marked `*`;
- each peer with glibc's default allocator (`off`) and with the fixed threshold through glibc's environment
  (`mmap`: MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_). peft_lora: a dense base in the dtype;
  peft_bnb: NF4 + double quant with that compute dtype; torchao: NF4Tensor base + LoRA.
Every round runs every configuration once, in an order shuffled by a seeded RNG; rows are medians over
rounds. The projection weights are chosen so that every method holds exactly the same weights (see
PROJ_WEIGHT), hence step-1 losses (before any update) must agree across methods within a tolerance set by
the dtype; if they do not, the run stops after that round and exits with status 1. A last run per
(method, dtype) trains `--loss-steps` steps on the batch to compare learning.

    python benchmarks/bench_train.py                         # the full matrix, 5 rounds (hours on 2 cores)
    python benchmarks/bench_train.py --dtype auto --json out.json
    python benchmarks/bench_train.py --methods qlorakit peft_bnb --ckpt on --rounds 3
    python benchmarks/bench_train.py --quick --rounds 1      # tiny model: checks that everything runs

Output: the machine (CPU model and flags, library versions), one line per worker as it finishes, then the
table of all rows, the headline (qlorakit's default against the fastest and the leanest peer
configuration, per checkpointing setting), the learning curves and the step-1 loss check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import environment, print_environment
from _train_report import check_first_losses, print_curves, print_headline, print_table, summarize
from _train_worker import METHODS, TARGETS
from qlorakit.core import memory
from qlorakit.core.memory import DEFAULT_MMAP_THRESHOLD
from qlorakit.quant.linear import default_compute_dtype

# The projections (TARGETS, the layers every method quantizes) are random signs times 2^-6 (std 0.016,
# near the random init's 0.02), so that every method holds the very same weights: a power of two is exact
# in bf16; every 64-block's absmax is 2^-6, so NF4 stores codes of exactly +-1; all absmax being equal,
# their mean is exact and double quantization (the offset + 8-bit code of bitsandbytes and qlorakit,
# torchao's int8 scalers) reconstructs them exactly (checked for all three, fp32 and bf16). The step-1
# losses then differ only by rounding, which the loss check bounds by the dtype. A step's time does not
# depend on the values; only quantizing them at load reads them.
PROJ_WEIGHT = 2**-6
WORKER = Path(__file__).with_name("_train_worker.py")
# The allocator settings a peer can get from the environment alone (qlorakit's mode names).
PEER_MALLOC = ("off", "mmap")
# Environment that changes malloc; removed from every worker's environment, then set per configuration.
MALLOC_VARS = ("QLORAKIT_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@dataclass(frozen=True)
class Config:
    """One row of the table: a method and everything a user could choose for it here."""

    method: str
    dtype: str  # "fp32" | "bf16": compute dtype (and dtype of the weights left dense)
    gc: bool  # gradient checkpointing
    malloc: str  # allocator mode: "off" (glibc's default), "mmap" (fixed threshold), "cache" (qlorakit's)
    loss: str  # "fused" (qlorakit's training-loop loss) | "full" (model(**batch).loss)


def model_config(quick: bool) -> dict[str, int]:
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
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # bf16 on disk: fp32 loads are exact upcasts
    signs = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.removesuffix(".weight").rsplit(".", 1)[-1] in TARGETS:
            p.data.copy_((torch.randint(0, 2, p.shape, generator=signs) * 2 - 1) * PROJ_WEIGHT)
    out = root / "model"
    model.save_pretrained(out)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {out}")
    return out


def auto_dtype() -> str:
    """What qlorakit's `compute_dtype: auto` resolves to on this CPU (QLORAKIT_CPU_BF16 forces it)."""
    import torch

    return "bf16" if default_compute_dtype("cpu") == torch.bfloat16 else "fp32"


_DEFAULT_MALLOC_PROBE = (
    "from qlorakit.core import memory, native; memory.configure_allocator(); "
    "import qlorakit.lora, qlorakit.quant; [native.available(s) for s in native.registered()]; print(memory.allocator_mode())"
)


def qlorakit_default_malloc() -> str:
    """The allocator mode a plain `qlorakit` run gets, asked of qlorakit.core.memory at run time.

    The command line calls `configure_allocator()` at start-up; what that applies with
    QLORAKIT_MALLOC_TUNING unset is the default (including its fallbacks: off glibc nothing, without the
    compiled kernels no block cache). Asked in a fresh process because it changes the caller's allocator;
    it also builds the native kernels (each package's library), so no worker's load time includes a compile.
    """
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS}
    out = subprocess.run(
        [sys.executable, "-c", _DEFAULT_MALLOC_PROBE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def configs(methods: list[str], dtypes: list[str], gcs: list[bool], default_malloc: str) -> list[Config]:
    out = []
    for dtype in dtypes:
        for gc in gcs:
            for method in methods:
                if method == "qlorakit":
                    out += [Config(method, dtype, gc, m, "fused") for m in memory.MODES]
                    out.append(Config(method, dtype, gc, default_malloc, "full"))
                else:
                    out += [Config(method, dtype, gc, m, "full") for m in PEER_MALLOC]
    return out


def worker_env(cfg: Config) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if cfg.method == "qlorakit":
        env["QLORAKIT_MALLOC_TUNING"] = cfg.malloc
    elif cfg.malloc == "mmap":
        # glibc reads these at start-up: the same settings configure_allocator makes with mallopt (a fixed
        # mmap threshold, which also stops glibc's dynamic raising of it, and twice that as trim threshold).
        env["MALLOC_MMAP_THRESHOLD_"] = str(DEFAULT_MMAP_THRESHOLD)
        env["MALLOC_TRIM_THRESHOLD_"] = str(2 * DEFAULT_MMAP_THRESHOLD)
    return env


def run_worker(cfg: Config, common: dict, steps: int, warmup: int) -> dict:
    job = {**asdict(cfg), **common, "steps": steps, "warmup": warmup}
    proc = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(job)], capture_output=True, text=True, env=worker_env(cfg)
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(cfg: Config) -> str:
    return f"{cfg.method} {cfg.dtype} ckpt={'on' if cfg.gc else 'off'} malloc={cfg.malloc} loss={cfg.loss}"


def run_rounds(
    cfgs: list[Config], common: dict, a: argparse.Namespace
) -> tuple[dict[Config, list[dict]], bool]:
    """Every configuration once per round, shuffled; stops after a round whose step-1 losses disagree.

    Returns (results per configuration, whether the loss check still passes).
    """
    rng = random.Random(a.seed)
    results: dict[Config, list[dict]] = {c: [] for c in cfgs}
    for rnd in range(a.rounds):
        order = list(cfgs)
        rng.shuffle(order)
        for i, cfg in enumerate(order, 1):
            r = run_worker(cfg, common, a.steps, a.warmup)
            results[cfg].append(r)
            shown = r["error"] if "error" in r else (
                f"{min(r['times']):.3f}-{max(r['times']):.3f} s/step, peak {r['peak_rss'] / 2**30:.2f} GiB, "
                f"step-1 loss {r['losses'][0]:.5f}"
                + (f" (allocator mode {r['malloc_applied']}!)" if r["malloc_applied"] not in (None, cfg.malloc) else "")
            )  # fmt: skip
            print(f"round {rnd + 1}/{a.rounds} [{i}/{len(order)}] {label(cfg)}: {shown}", flush=True)
        if not check_first_losses(results, quiet=True):
            print(f"step-1 losses disagree after round {rnd + 1}: stopping early", flush=True)
            return results, False
    return results, True


def run_curves(cfgs: list[Config], common: dict, steps: int, default_malloc: str) -> dict[Config, list[dict]]:
    """Same learning: per (method, dtype), the configuration a user gets by default (without checkpointing
    if it was run) trains `steps` steps on the fixed batch."""
    picked: dict[tuple[str, str], Config] = {}
    for c in sorted(cfgs, key=lambda c: c.gc):
        ours = c.method == "qlorakit"
        if c.loss == ("fused" if ours else "full") and c.malloc == (default_malloc if ours else "off"):
            picked.setdefault((c.method, c.dtype), c)
    return {c: [run_worker(c, common, steps, 0)] for c in picked.values()}


POSITIVE = ("rounds", "steps", "batch", "seq", "threads")
NON_NEGATIVE = ("warmup", "loss_steps")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, seq 64, 2 rounds, 2 steps: a smoke run")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), help="pin one dtype (default: fp32 and bf16)")
    p.add_argument("--ckpt", choices=("both", "off", "on"), default="both", help="gradient checkpointing")
    p.add_argument("--rounds", type=int, help="rounds over all configurations (default 5; --quick 2)")
    p.add_argument("--steps", type=int, help="timed steps per worker (default 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--loss-steps", type=int, help="steps of the learning-curve runs (default 20; 0 skips)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, help="tokens per row (default 256; --quick 64)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0, help="seeds the order of each round and the workers")
    p.add_argument("--json", type=Path, help="write every raw result here")
    a = p.parse_args(argv)
    quick = a.quick
    for key, full, small in (("rounds", 5, 2), ("steps", 3, 2), ("seq", 256, 64), ("loss_steps", 20, 5)):
        if getattr(a, key) is None:
            setattr(a, key, small if quick else full)
    bad = [f"--{k.replace('_', '-')} {v} (must be 1 or more)" for k in POSITIVE if (v := getattr(a, k)) < 1]
    bad += [
        f"--{k.replace('_', '-')} {v} (must be 0 or more)" for k in NON_NEGATIVE if (v := getattr(a, k)) < 0
    ]
    if bad:
        p.error("; ".join(bad))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    env = environment()
    print_environment(env)
    auto, default_malloc = auto_dtype(), qlorakit_default_malloc()
    dtypes = ["fp32", "bf16"] if a.dtype is None else [auto if a.dtype == "auto" else a.dtype]
    gcs = {"both": [False, True], "off": [False], "on": [True]}[a.ckpt]
    default = {"dtype": auto if auto in dtypes else dtypes[0], "malloc": default_malloc, "loss": "fused"}
    print(
        f"qlorakit default: dtype auto -> {auto} on this CPU (QLORAKIT_CPU_BF16="
        f"{os.environ.get('QLORAKIT_CPU_BF16', 'unset')}), allocator mode {default_malloc} of "
        f"{'/'.join(memory.MODES)} (qlorakit.core.memory with QLORAKIT_MALLOC_TUNING unset), fused loss"
    )
    cfgs = configs(a.methods, dtypes, gcs, default_malloc)
    print(f"{len(cfgs)} configurations x {a.rounds} rounds, {a.threads} threads, batch {a.batch} x {a.seq}")
    common = {"batch": a.batch, "seq": a.seq, "threads": a.threads, "seed": a.seed}
    with tempfile.TemporaryDirectory() as tmp:
        common["model"] = str(make_model_dir(Path(tmp), a.quick))
        results, agree = run_rounds(cfgs, common, a)
        curves = run_curves(cfgs, common, a.loss_steps, default_malloc) if agree and a.loss_steps > 0 else {}
    rows = summarize(results, a.batch * a.seq)
    print_table(rows, default)
    print_headline(rows, default, auto)
    print_curves(curves)
    print()
    every = {c: results.get(c, []) + curves.get(c, []) for c in {**results, **curves}}
    agree = check_first_losses(every, quiet=False)
    failed = [(c, r["error"]) for c, rs in every.items() for r in rs if "error" in r]
    for cfg, err in failed:
        print(f"FAILED {label(cfg)}: {err}")
    if not agree:
        print("FAILED: the step-1 losses disagree beyond the dtype's tolerance (listed above)")
    if a.json:
        write_json(a.json, env, a, default, results, curves)
    return 0 if agree and not failed else 1


def write_json(
    path: Path, env: dict, a: argparse.Namespace, default: dict, results: dict, curves: dict
) -> None:
    """Every worker's raw result (step times, losses, peak RSS, load time) with its configuration."""
    doc = {
        "environment": env,
        "args": {k: str(v) for k, v in vars(a).items()},
        "qlorakit_default": default,
        "runs": [{**asdict(c), "round": i, **r} for c, rs in results.items() for i, r in enumerate(rs)],
        "curves": [{**asdict(c), **rs[0]} for c, rs in curves.items()],
    }
    path.write_text(json.dumps(doc, indent=1))
    print(f"raw results -> {path}")


if __name__ == "__main__":
    sys.exit(main())
