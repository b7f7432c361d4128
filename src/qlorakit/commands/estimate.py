"""`qlorakit estimate MODEL_OR_CONFIG [options] [--section.key=value ...]`: the memory a fine-tuning run needs.

Given a training YAML it predicts that run, as `qlorakit train CONFIG` would do it on this machine: the
config's method (quant.enabled: QLoRA, else 16-bit LoRA), LoRA rank and targets, train.batch_size,
data.max_length, gradient checkpointing, optimizer and compute dtype (`auto` resolves as training
resolves it here: bf16 on CPUs with AVX512-BF16/AMX, else fp32), and the allocator mode of
QLORAKIT_MALLOC_TUNING. It also reads the run's data (tokenizer and rows, no weights) to replay the batch
shapes the run computes: batches are padded to their longest row, and in 16-bit compute every new shape
costs memory for the rest of the run. Given a model instead, it estimates `qlorakit train
--model.name=MODEL` with the default settings, every row max_length tokens.

Options given explicitly override the config's values, and so do `--section.key=value` overrides (as for
`qlorakit train`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from qlorakit.commands.options import add_override_command
from qlorakit.config import Config, config_from_dict, load_config
from qlorakit.core.dtypes import dtype_name, format_bytes, parse_size
from qlorakit.core.errors import ConfigError, ModelError
from qlorakit.models.shape import ModelShape, model_source
from qlorakit.tools.estimate.advice import Advice, RunSettings, advise
from qlorakit.tools.estimate.kernel_cache import RunShapes
from qlorakit.tools.estimate.memory import METHODS, MemoryEstimate
from qlorakit.tools.estimate.run_shapes import load_tokenizer, run_shapes
from qlorakit.train.samples import SAMPLE_BATCH

_ROWS = (
    ("weights", "Weights"),
    ("quant_constants", "Quantization constants"),
    ("adapters", "LoRA adapters"),
    ("gradients", "Gradients"),
    ("optimizer", "Optimizer states"),
    ("activations", "Activations"),
    ("logits", "Logits + loss"),
    ("allocator", "Allocator-held"),
    ("kernels", "Matmul kernels (16-bit)"),
    ("workspace", "Workspace"),
    ("runtime", "Runtime (Python + torch)"),
)
# LoRA settings the estimate does not model (it counts r on every targeted linear of every layer).
_UNMODELED = ("rank_pattern", "layers_to_transform", "exclude_modules", "modules_to_save", "use_dora")
# The positive-integer options and the config keys they override.
_INT_OPTIONS = (
    ("batch", "train.batch_size"),
    ("seq", "data.max_length"),
    ("r", "lora.r"),
    ("blocksize", "quant.blocksize"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_override_command(
        subparsers,
        "estimate",
        usage="qlorakit estimate [-h] [options] MODEL_OR_CONFIG [--section.key=value ...]",
        help="estimate the memory a fine-tuning run needs (no weights loaded)",
        description=__doc__,
        run=run,
    )
    p.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="a qlorakit training YAML (predicts that run), or a model folder, config.json, .gguf or "
        "smollm2-135m (with qlorakit train's default settings)",
    )
    p.add_argument(
        "--method",
        choices=("full", "lora", "qlora", "all"),
        default=None,
        help="default: the config's method for a YAML, all three for a model",
    )
    p.add_argument(
        "--batch", type=int, default=None, help="sequences per micro-batch (default: train.batch_size)"
    )
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: data.max_length)")
    p.add_argument("--r", type=int, default=None, help="LoRA rank (default: lora.r)")
    p.add_argument(
        "--targets",
        default=None,
        help="LoRA targets: all-linear or comma-separated module names (default: lora.target_modules)",
    )
    _add_switch(
        p, "--grad-checkpointing", "recompute layer activations (default: train.gradient_checkpointing)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="compute dtype: auto, bfloat16, float16 or float32 (default: quant.compute_dtype; auto is "
        "what training picks on this machine)",
    )
    p.add_argument(
        "--optimizer", choices=("adamw", "adamw_8bit", "sgd"), default=None, help="default: train.optim"
    )
    p.add_argument("--blocksize", type=int, default=None, help="4-bit block size (default: quant.blocksize)")
    _add_switch(p, "--double-quant", "nested absmax quantization (default: quant.double_quant)")
    p.add_argument(
        "--no-data",
        dest="data",
        action="store_false",
        help="do not read the config's data: assume every row is max_length tokens (one batch shape)",
    )
    p.add_argument(
        "--budget", default=None, help="memory budget such as 8GiB: advise the largest batch / seq that fit"
    )


def _add_switch(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    """`--flag` / `--no-flag`; given neither, None keeps the config's value."""
    p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)


def _check_options(args: argparse.Namespace) -> tuple[int | None, list[str]]:
    """(the budget in bytes, the explicit options as config overrides, applied last so they win);
    one ConfigError naming every bad option."""
    budget = None
    errors = []
    if args.budget is not None:
        try:
            budget = parse_size(args.budget, "memory size")
        except ConfigError as exc:
            errors.append(f"--budget: {exc}")
    out = []
    for flag, key in _INT_OPTIONS:
        value = getattr(args, flag)
        if value is None:
            continue
        if value < 1:
            errors.append(f"--{flag} must be a positive integer, got {value}")
        out.append(f"--{key}={value}")
    if args.targets is not None:
        names = [t.strip() for t in args.targets.split(",") if t.strip()]
        if not names:
            errors.append("--targets is empty; use all-linear or names such as q_proj,v_proj")
        value = "all-linear" if names == ["all-linear"] else "[" + ", ".join(names) + "]"
        out.append(f"--lora.target_modules={value}")
    if args.dtype is not None:
        try:
            out.append(f"--quant.compute_dtype={'auto' if args.dtype == 'auto' else dtype_name(args.dtype)}")
        except ConfigError:
            errors.append(f"--dtype {args.dtype!r}: use auto, bfloat16, float16 or float32")
    for key, value in (
        ("train.gradient_checkpointing", args.grad_checkpointing),
        ("quant.double_quant", args.double_quant),
    ):
        if value is not None:
            out.append(f"--{key}={'true' if value else 'false'}")
    if errors:
        raise ConfigError("; ".join(errors))
    return budget, out


def _load(args: argparse.Namespace, overrides: list[str]) -> tuple[Config, ModelShape, bool]:
    """(the run's config with every override, the model's shape, whether a YAML was given)."""
    if Path(args.model).suffix in (".yaml", ".yml"):
        cfg = load_config(args.model, overrides)
        return cfg, ModelShape.from_config(model_source(cfg.model.name, args.model)), True
    cfg = config_from_dict({"model": {"name": args.model}}, overrides, source="estimate settings")
    return cfg, ModelShape.from_config(cfg.model.name), False


def _shapes(cfg: Config, source: str, notes: list[str]) -> RunShapes | None:
    """The run's batch shapes replayed from its data; None (with a note) when the tokenizer is missing."""
    try:
        tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    except ModelError as exc:
        notes.append(f"no tokenizer to read the data with ({exc}); assumed every row max_length tokens")
        return None
    return run_shapes(cfg, tokenizer, SAMPLE_BATCH)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _describe(cfg: Config, s: RunSettings, shapes: RunShapes | None) -> str:
    auto = " (auto on this CPU)" if cfg.quant.compute_dtype == "auto" else ""
    targets = s.targets if isinstance(s.targets, str) else ",".join(s.targets)
    seq = f"seq {s.seq}"
    if shapes is not None and s.seq != cfg.data.max_length:
        seq += f" (the longest batch of this run; data.max_length {cfg.data.max_length})"
    text = (
        f"batch {s.batch} x {seq}, {s.compute_dtype} compute{auto}, r={s.r} on {targets}, {s.optimizer}, "
        f"gradient checkpointing {'on' if s.grad_checkpointing else 'off'}, grad_accum "
        f"{cfg.train.grad_accum} (no extra memory), allocator mode {s.allocator} (QLORAKIT_MALLOC_TUNING)"
    )
    if shapes is None:
        return text + "\nbatch shapes: one (every row max_length tokens)"
    gen = len(shapes.generate)
    return text + (
        f"\nbatch shapes replayed from the data: {len(shapes.train)} training, {len(shapes.evaluate)} "
        f"evaluation, {gen} generation (each new shape compiles 16-bit matmul kernels)"
    )


def _advice_lines(advice: Advice, seq: int) -> list[str]:
    lines = [f"\nWithin {format_bytes(advice.budget_bytes)}:"]
    for m in advice.methods:
        if not m.fits:
            lines.append(
                f"  {m.method:5s}  does not fit batch 1 x seq {seq}, even with gradient checkpointing"
            )
            continue
        gc = "with" if m.grad_checkpointing else "without"
        lines.append(
            f"  {m.method:5s}  batch up to {m.max_batch} at seq {seq}; seq up to {m.max_seq} at batch 1 "
            f"({gc} gradient checkpointing; needs {format_bytes(m.peak_bytes)} at batch {m.max_batch})"
        )
    best = advice.recommended
    lines.append(
        f"  -> {'use ' + best.method if best else 'nothing fits: lower --seq or use a smaller model'}"
    )
    return lines


def _unmodeled(cfg: Config) -> list[str]:
    """Settings of the config that change memory in ways the estimate does not count."""
    out = [f"lora.{k}" for k in _UNMODELED if getattr(cfg.lora, k) not in (None, False, [], {})]
    if cfg.quant.skip != ["lm_head"]:
        out.append("quant.skip")
    if cfg.data.packing:
        out.append("data.packing (its [batch, 1, seq, seq] attention mask)")
    return [f"not modelled: {', '.join(out)}"] if out else []


def _component_table(estimates: list[MemoryEstimate], methods: tuple[str, ...]) -> str:
    rows = [[label, *(format_bytes(e.components[key]) for e in estimates)] for key, label in _ROWS]
    rows.append(["Trainable parameters", *(f"{e.trainable_params / 1e6:,.2f}M" for e in estimates)])
    for label, value in (("Training total", "training"), ("Loading peak", "loading"),
                         ("Peak RSS (estimate)", "peak"), ("Must fit in RAM", "required")):  # fmt: skip
        rows.append([label, *(format_bytes(getattr(e, value)) for e in estimates)])
    return _table(["Component", *methods], rows)


def run(args: argparse.Namespace) -> int:
    # everything is read and checked before the first line is printed
    budget, flag_overrides = _check_options(args)
    cfg, shape, from_yaml = _load(args, [*args.overrides, *flag_overrides])
    settings = RunSettings.from_config(cfg)
    if args.optimizer is not None:
        settings = dataclasses.replace(settings, optimizer=args.optimizer)
    notes = _unmodeled(cfg)
    shapes = None
    if from_yaml and args.data:
        shapes = _shapes(cfg, model_source(cfg.model.name, args.model), notes)
    if shapes is not None:
        settings = settings.with_shapes(shapes)
    method = args.method or (settings.method if from_yaml else "all")
    methods = METHODS if method == "all" else (method,)
    estimates = [dataclasses.replace(settings, method=m).estimate(shape) for m in methods]
    advice = None
    if budget is not None:
        keys = (
            "r",
            "targets",
            "compute_dtype",
            "optimizer",
            "blocksize",
            "double_quant",
            "lora_dropout",
            "allocator",
        )
        common = {k: getattr(settings, k) for k in keys}
        advice = advise(shape, budget, seq=settings.seq, methods=methods, **common)

    print(
        f"{args.model}: {shape.num_params() / 1e6:,.1f}M parameters ({shape.model_type}, {shape.num_layers} "
        f"layers, hidden {shape.hidden_size}, vocab {shape.vocab_size})"
    )
    print(_describe(cfg, settings, shapes) + "\n")
    print(_component_table(estimates, methods))
    print(
        "\n(Peak RSS counts clean pages of the mapped checkpoint file; the kernel can drop those, so only "
        "'Must fit in RAM' has to fit.)"
    )
    for note in notes:
        print(f"note: {note}")
    if advice is not None:
        print("\n".join(_advice_lines(advice, settings.seq)))
    return 0
