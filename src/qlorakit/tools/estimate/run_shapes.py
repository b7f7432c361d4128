"""The batch shapes a training run computes, from its config and data alone (no model is loaded).

Batches are padded to their longest row, so a run over rows of varying length computes many different
matmul shapes, and on the CPU every new 16-bit matmul shape costs memory for the rest of the process (see
`qlorakit.tools.estimate.memory`, the kernel cache). `run_shapes` replays what `qlorakit train` feeds the model: the
training micro-batches in the sampler's seeded order (`qlorakit.train.sampler`), the validation batches
of every evaluation, and the batched greedy generations of the held-out samples. It needs the tokenizer
(read from the model folder, or from a GGUF file's metadata) and the data, tokenized as training does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qlorakit.config import Config
from qlorakit.core.errors import ModelError
from qlorakit.data import IGNORE_INDEX, build_datasets, prompt_ids, reference_answer
from qlorakit.data.render import Example
from qlorakit.models.resolve import BUILTIN_MODELS, convert_gguf, gguf_conversion_cached, resolve_model_path
from qlorakit.tools.estimate.kernel_cache import BatchShape, RunShapes
from qlorakit.train.optim import total_steps
from qlorakit.train.sampler import BatchOrder


def _batch_shape(examples: list[Example]) -> BatchShape:
    length = max(len(e.input_ids) for e in examples)
    # the loss predicts label t + 1 at position t: the first label of each row is never a target
    labels = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)
    return BatchShape(len(examples), length, labels)


def _train_shapes(train: list[Example], cfg: Config) -> set[BatchShape]:
    """The micro-batches of a single-process run, in the order `qlorakit.train.loop` reads them."""
    t = cfg.train
    order, position, shapes = BatchOrder(len(train), t.seed), 0, set()
    for _ in range(total_steps(t, len(train), world_size=1) * t.grad_accum):
        shapes.add(_batch_shape([train[i] for i in order.micro_batch(position, t.batch_size)]))
        position += t.batch_size
    return shapes


def _eval_shapes(val: list[Example], cfg: Config) -> set[BatchShape]:
    starts = list(range(0, len(val), cfg.train.batch_size))[: cfg.train.eval_batches]
    return {_batch_shape(val[s : s + cfg.train.batch_size]) for s in starts}


def _generation_shapes(
    val_records: list[Any], tokenizer: Any, cfg: Config, batch: int
) -> set[tuple[int, int]]:
    """(rows, prompt width) of each `generate` call over the held-out samples (left-padded prompts)."""
    records = [r for r in val_records if reference_answer(r) is not None][: cfg.output.samples]
    widths = [len(prompt_ids(r, tokenizer, cfg.data.template)) for r in records]
    return {(len(widths[k : k + batch]), max(widths[k : k + batch])) for k in range(0, len(widths), batch)}


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model spec without its weights: from the folder (or the cached conversion of a
    GGUF file), else from the GGUF file's own metadata."""
    import transformers

    path = resolve_model_path(name)
    builtin = name if name in BUILTIN_MODELS else None
    try:
        if path.is_file() and not gguf_conversion_cached(path, builtin):
            return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        folder = convert_gguf(path, name=builtin) if path.is_file() else Path(path)
        return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        raise ModelError(f"cannot load the tokenizer of {os.fspath(name)}: {exc}") from exc


def run_shapes(cfg: Config, tokenizer: Any, sample_batch: int) -> RunShapes:
    """The shapes `qlorakit train` computes for `cfg` on one process (`sample_batch`: prompts per
    generation call). Raises DataError as training would for unreadable data."""
    data = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    evaluate = _eval_shapes(data.val, cfg)
    generate = _generation_shapes(data.val_records, tokenizer, cfg, sample_batch) if data.val else set()
    return RunShapes(
        frozenset(_train_shapes(data.train, cfg)), frozenset(evaluate), frozenset(generate), "data"
    )


__all__ = ["load_tokenizer", "run_shapes"]
