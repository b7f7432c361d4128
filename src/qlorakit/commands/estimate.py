"""`qlorakit estimate MODEL_OR_CONFIG`: a hardware-requirements table from the model's shape alone."""

from __future__ import annotations

import argparse

from qlorakit.errors import ConfigError

_ROWS = (
    ("weights", "Weights"),
    ("quant_constants", "Quantization constants"),
    ("adapters", "LoRA adapters"),
    ("gradients", "Gradients"),
    ("optimizer", "Optimizer states"),
    ("activations", "Activations"),
    ("logits", "Logits + loss"),
    ("allocator", "Allocator-held (glibc)"),
    ("workspace", "Workspace"),
    ("runtime", "Runtime (Python + torch)"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="estimate the memory a fine-tuning run needs (no weights loaded)",
        description="Print the memory a full / LoRA / QLoRA fine-tune needs, per component, and what fits a budget.",
    )
    p.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="model folder, config.json, .gguf, qlorakit YAML, or smollm2-135m",
    )
    p.add_argument("--method", choices=("full", "lora", "qlora", "all"), default="all")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--r", type=int, default=64, help="LoRA rank (default 64)")
    p.add_argument(
        "--targets", default="all-linear", help="LoRA targets: all-linear or comma-separated module names"
    )
    p.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute layer activations",
    )
    p.add_argument(
        "--dtype", default="bfloat16", help="compute dtype: bfloat16, float16 or float32 (default bfloat16)"
    )
    p.add_argument("--optimizer", choices=("adamw", "adamw_8bit", "sgd"), default="adamw")
    p.add_argument("--blocksize", type=int, default=64, help="4-bit quantization block size (default 64)")
    p.add_argument(
        "--no-double-quant", dest="double_quant", action="store_false", help="no nested absmax quantization"
    )
    p.add_argument(
        "--budget", default=None, help="memory budget such as 8GiB: advise the largest batch / seq that fit"
    )
    p.set_defaults(func=run)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def run(args: argparse.Namespace) -> int:
    from qlorakit.estimate import METHODS, ModelShape, advise, estimate_memory, format_bytes, parse_size

    budget = None if args.budget is None else parse_size(args.budget)  # every argument before any output
    shape = ModelShape.from_config(args.model)
    methods = METHODS if args.method == "all" else (args.method,)
    targets = (
        "all-linear"
        if args.targets == "all-linear"
        else [t.strip() for t in args.targets.split(",") if t.strip()]
    )
    if not targets:
        raise ConfigError("--targets is empty; use all-linear or names such as q_proj,v_proj")
    common = {
        "r": args.r,
        "targets": targets,
        "compute_dtype": args.dtype,
        "optimizer": args.optimizer,
        "blocksize": args.blocksize,
        "double_quant": args.double_quant,
    }
    estimates = [
        estimate_memory(
            shape,
            method=m,
            batch=args.batch,
            seq=args.seq,
            grad_checkpointing=args.grad_checkpointing,
            **common,
        )
        for m in methods
    ]
    print(
        f"{args.model}: {shape.num_params() / 1e6:,.1f}M parameters ({shape.model_type}, {shape.num_layers} layers, "
        f"hidden {shape.hidden_size}, vocab {shape.vocab_size})"
    )
    print(
        f"batch {args.batch} x seq {args.seq}, {args.dtype} compute, r={args.r}, {args.optimizer}, gradient "
        f"checkpointing {'on' if args.grad_checkpointing else 'off'}\n"
    )
    rows = [[label, *(format_bytes(e.components[key]) for e in estimates)] for key, label in _ROWS]
    rows.append(["Trainable parameters", *(f"{e.trainable_params / 1e6:,.2f}M" for e in estimates)])
    rows.append(["Training total", *(format_bytes(e.training) for e in estimates)])
    rows.append(["Loading peak", *(format_bytes(e.loading) for e in estimates)])
    rows.append(["Peak RSS (estimate)", *(format_bytes(e.peak) for e in estimates)])
    rows.append(["Must fit in RAM", *(format_bytes(e.required) for e in estimates)])
    print(_table(["Component", *methods], rows))
    print(
        "\n(Peak RSS counts clean pages of the mapped checkpoint file; the kernel can drop those, so only "
        "'Must fit in RAM' has to fit.)"
    )
    if budget is not None:
        advice = advise(shape, budget, seq=args.seq, methods=methods, **common)
        print(f"\nWithin {format_bytes(budget)}:")
        for m in advice.methods:
            if not m.fits:
                print(
                    f"  {m.method:5s}  does not fit batch 1 x seq {args.seq}, even with gradient checkpointing"
                )
                continue
            gc = "with" if m.grad_checkpointing else "without"
            print(
                f"  {m.method:5s}  batch up to {m.max_batch} at seq {args.seq}; seq up to {m.max_seq} at batch 1 "
                f"({gc} gradient checkpointing; needs {format_bytes(m.peak_bytes)} at batch {m.max_batch})"
            )
        best = advice.recommended
        print(f"  -> {'use ' + best.method if best else 'nothing fits: lower --seq or use a smaller model'}")
    return 0
