"""The memory estimate (`qlorakit estimate`) against the measured peak RSS of real `qlorakit train` runs.

For each model and method (16-bit LoRA, QLoRA) one `python -m qlorakit train` process runs a few optimizer
steps on rows that all fill `--seq` tokens (so every batch is exactly batch x seq). Measured:
- peak RSS of that child alone: the `peak_rss_mib` its summary.json records (its own VmHWM; the
  ru_maxrss `os.wait4` reports would include this driver's peak, which a child inherits at fork + exec);
- a psutil RSS sampling of the child (every 20 ms), split at the line the pipeline prints once the model is
  built and the data loaded: the loading peak and the training peak separately.
Predicted: the run's config as `qlorakit estimate CONFIG` predicts it (`RunSettings.from_config` on this
machine, over the batch shapes its data gives: `loading`, `training`, `peak`). Printed: both and the error
of the peak in %. Target: within 15%. The compute dtype (`--dtype auto`: QLORAKIT_CPU_BF16 or the CPU) and
the allocator mode (QLORAKIT_MALLOC_TUNING) are the environment's, for the runs and the estimate alike.

    python benchmarks/bench_estimate.py --quick      # a tiny random model only, to check that it runs
    python benchmarks/bench_estimate.py              # smollm2-135m (built in) + a ~48M random Llama
    python benchmarks/bench_estimate.py --large      # also a ~337M random Llama (slow on a shared CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# name -> LlamaConfig sizes of a random-init model (the vocabulary is SmolLM2's, so its tokenizer fits)
SIZES = {
    "llama-tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "llama-48m": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
    ),
    "llama-337m": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
}
METHODS = (("lora", False), ("qlora", True))
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
]


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from qlorakit.models.resolve import builtin_model_path, convert_gguf

    return AutoTokenizer.from_pretrained(
        str(convert_gguf(builtin_model_path("smollm2-135m"), name="smollm2-135m"))
    )


def make_model_dir(root: Path, name: str, tokenizer) -> Path:
    """A random-init Llama folder (fp32 safetensors, untied head) with the SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        **SIZES[name],
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out = root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {out}", flush=True)
    return out


def write_data(path: Path, rows: int, words_per_row: int) -> Path:
    """JSONL text rows long enough to be cut at max_length: every batch is exactly batch x seq tokens."""
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words_per_row))}) + "\n")
    return path


def train_overrides(args: argparse.Namespace, model: str, data: Path, out: Path, quant: bool) -> list[str]:
    return [
        f"--model.name={model}",
        f"--quant.enabled={'true' if quant else 'false'}",
        f"--quant.compute_dtype={args.dtype}",
        f"--lora.r={args.r}",
        "--lora.dropout=0.05",
        f"--data.datasets=[{{path: '{data}', format: text}}]",
        "--data.template=text",
        f"--data.max_length={args.seq}",
        "--data.truncation=truncate",
        "--data.val_ratio=0.1",
        f"--train.max_steps={args.steps}",
        f"--train.batch_size={args.batch}",
        f"--train.eval_every={args.steps}",
        f"--train.save_every={args.steps}",
        "--train.eval_batches=1",
        f"--train.num_threads={args.threads}",
        f"--output.dir={out}",
        "--output.samples=0",
        "--output.tensorboard=false",
        "--output.plot=false",
    ]


def measure(command: list[str], env: dict[str, str], out: Path) -> dict[str, float]:
    """Run `command`; its peak RSS (MiB) from the run's summary.json in `out`, and sampled loading /
    training peaks."""
    import psutil

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    phase = {"loaded": False}
    peaks = {"load": 0, "train": 0}
    lines: list[str] = []

    def read_output() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("model: "):  # printed once the model is built and the data loaded
                phase["loaded"] = True

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            while True:
                rss = p.memory_info().rss
                key = "train" if phase["loaded"] else "load"
                peaks[key] = max(peaks[key], rss)
                time.sleep(0.02)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return

    threads = [
        threading.Thread(target=read_output, daemon=True),
        threading.Thread(target=sample, daemon=True),
    ]
    for t in threads:
        t.start()
    started = time.perf_counter()
    proc.wait()
    seconds = time.perf_counter() - started
    for t in threads:
        t.join(timeout=5)
    if proc.returncode != 0:
        sys.stderr.write("".join(lines[-40:]))
        raise SystemExit(f"training failed ({proc.returncode}): {' '.join(command)}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {
        "peak": float(summary["peak_rss_mib"]),
        "load_sampled": peaks["load"] / 2**20,
        "train_sampled": peaks["train"] / 2**20,
        "seconds": seconds,
    }


def predict(model: str, overrides: list[str], tokenizer):
    """The estimate of the run these `qlorakit train` overrides describe, as `qlorakit estimate` makes it:
    the config's settings on this machine (compute dtype, allocator mode) over the batch shapes its data
    gives."""
    from qlorakit.config import load_config
    from qlorakit.models.shape import ModelShape
    from qlorakit.tools.estimate.advice import RunSettings
    from qlorakit.tools.estimate.run_shapes import run_shapes
    from qlorakit.train.samples import SAMPLE_BATCH

    cfg = load_config(None, overrides)
    shape = ModelShape.from_config(model)
    settings = RunSettings.from_config(cfg).with_shapes(run_shapes(cfg, tokenizer, SAMPLE_BATCH))
    return shape, settings.estimate(shape)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny random model, seq 64: checks that it runs"
    )
    parser.add_argument("--large", action="store_true", help="also a ~337M-parameter random Llama")
    parser.add_argument(
        "--models", default=None, help="comma-separated: smollm2-135m and/or " + ", ".join(SIZES)
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (the box is shared)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="quant.compute_dtype for the runs (auto: what the pipeline picks here)",
    )
    args = parser.parse_args()
    if args.quick:
        args.seq, args.steps = min(args.seq, 64), 1
    return args


def main() -> None:
    args = parse_args()
    names = (
        args.models.split(",")
        if args.models
        else ["llama-tiny"]
        if args.quick
        else ["smollm2-135m", "llama-48m"] + (["llama-337m"] if args.large else [])
    )

    import torch

    from qlorakit.core.memory import requested_mode
    from qlorakit.quant.linear import default_compute_dtype

    dtype_name = (
        str(default_compute_dtype("cpu")).removeprefix("torch.") if args.dtype == "auto" else args.dtype
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(args.threads),
    )
    print(
        f"torch {torch.__version__}, compute dtype {dtype_name}, batch {args.batch} x seq {args.seq}, "
        f"r={args.r}, {args.steps} steps, {args.threads} thread(s), allocator mode {requested_mode()}; load "
        f"average {os.getloadavg()[0]:.1f}"
    )
    print_table(run_all(args, names, env))


def run_all(args: argparse.Namespace, names: list[str], env: dict[str, str]) -> list:
    """Train each model with each method in a child process; rows of (name, params, method, est, got, err)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        root = Path(tmp)
        tokenizer = smollm2_tokenizer()
        data = write_data(root / "data.jsonl", rows=max(40, 10 * args.batch), words_per_row=args.seq * 2)
        for name in names:
            model = name if name == "smollm2-135m" else str(make_model_dir(root, name, tokenizer))
            for method, quant in METHODS:
                out = root / f"run-{name}-{method}"
                command = [
                    sys.executable,
                    "-m",
                    "qlorakit",
                    "train",
                    *train_overrides(args, model, data, out, quant),
                ]
                shape, est = predict(model, train_overrides(args, model, data, out, quant), tokenizer)
                got = measure(command, env, out)
                err = (est.peak / 2**20 - got["peak"]) / got["peak"] * 100
                rows.append((name, shape.num_params() / 1e6, method, est, got, err))
                print(
                    f"  {name:13s} {method:5s} predicted {est.peak / 2**20:7.0f} MiB  measured {got['peak']:7.0f} "
                    f"MiB  error {err:+6.1f}%  ({got['seconds']:.0f} s)",
                    flush=True,
                )
    return rows


def print_table(rows: list) -> None:
    print(
        "\nMiB; predicted load / train / peak RSS vs measured (sampled load / sampled train / summary peak)"
    )
    header = f"{'model':13s} {'params':>7s} {'method':6s} {'p.load':>7s} {'p.train':>7s} {'p.peak':>7s} "
    header += f"{'m.load':>7s} {'m.train':>7s} {'m.peak':>7s} {'error':>7s}"
    print(header)
    print("-" * len(header))
    for name, params, method, est, got, err in rows:
        print(
            f"{name:13s} {params:6.1f}M {method:6s} {est.loading / 2**20:7.0f} {est.training / 2**20:7.0f} "
            f"{est.peak / 2**20:7.0f} {got['load_sampled']:7.0f} {got['train_sampled']:7.0f} {got['peak']:7.0f} "
            f"{err:+6.1f}%"
        )
    worst = max(abs(r[-1]) for r in rows)
    print(f"\nworst |error| {worst:.1f}% (target: within 15%)")
    print(
        "components of the last estimate:", {k: f"{v / 2**20:.0f}" for k, v in rows[-1][3].components.items()}
    )


if __name__ == "__main__":
    main()
