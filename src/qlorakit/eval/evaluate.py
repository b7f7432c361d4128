"""Evaluate a model (with or without an adapter) on a dataset: loss, perplexity, generation metrics.

Loss is computed as in training: each row is rendered with the same template and masking, and only the
response tokens (labels != -100) are scored; perplexity is exp(token-weighted mean loss). For rows that
end with an assistant answer, the prompt (conversation without that answer) is completed greedily and
compared with the answer (exact match, BLEU, ROUGE-L). `compare_base` scores the same rows with the
adapters disabled (same model in memory, no reload).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qlorakit.config import DatasetSpec, QuantConfig
from qlorakit.core.errors import ConfigError, DataError
from qlorakit.core.outputs import OutputPlan, check_output, json_signature, output_file
from qlorakit.data import Example, Record, collate, load_records, prompt_ids, reference_answer, render_record
from qlorakit.eval.generation import GenerationSettings, generate_ids
from qlorakit.eval.metrics import generation_metrics
from qlorakit.loss import next_token_nll
from qlorakit.methods import base_only, load_adapter
from qlorakit.models.decode import pad_token_id
from qlorakit.models.load import adapter_quant_config, load_base

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# ---------------------------------------------------------------------------------------------------------
# One evaluation pass


@dataclass
class EvalResult:
    """Scores of one model variant (`adapted` or `base`) on the evaluated rows."""

    label: str
    loss: float
    perplexity: float
    tokens: int
    """Response tokens scored for the loss."""
    generated: int
    """Rows with a reference answer that were completed for the generation metrics."""
    metrics: dict[str, float] = field(default_factory=dict)
    """exact_match, bleu, rouge_l (empty when no row has a reference answer)."""
    samples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def response_loss(
    model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 4
) -> tuple[float, int]:
    """(mean NLL per response token, tokens) of rendered `Example`s under `model`."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for first in range(0, len(examples), batch_size):
        batch = collate(list(examples[first : first + batch_size]), pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        nll, n = next_token_nll(logits, batch["labels"].to(device))
        total += nll
        count += n
    if count == 0:
        raise DataError("no response tokens to score: every row is masked (or empty) after rendering")
    return float(total / count), count


def predict(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    template: str,
    settings: GenerationSettings,
) -> list[str]:
    """Greedy completions of each record's prompt (its conversation without the final answer)."""
    out = []
    for record in records:
        new = generate_ids(model, tokenizer, prompt_ids(record, tokenizer, template), settings)
        out.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return out


def evaluate_pass(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    records: Sequence[Record],
    *,
    label: str,
    template: str,
    settings: GenerationSettings,
    samples: int = 3,
) -> EvalResult:
    """Loss/perplexity over `examples` and generation metrics over the `records` that have answers."""
    start = time.perf_counter()
    loss, tokens = response_loss(model, examples, pad_token_id(tokenizer))
    answered = [r for r in records if reference_answer(r) is not None]
    references = [reference_answer(r) for r in answered]
    predictions = predict(model, tokenizer, answered, template, settings) if answered else []
    scores = generation_metrics(predictions, references) if answered else {}
    metrics = {k: v for k, v in scores.items() if k != "count"}  # `generated` already says how many
    shown = [
        {"source": r.source, "reference": ref, "prediction": pred}
        for r, ref, pred in list(zip(answered, references, predictions, strict=True))[:samples]
    ]
    ppl = math.exp(loss) if loss < 700 else math.inf
    return EvalResult(label, loss, ppl, tokens, len(answered), metrics, shown, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class EvalReport:
    model: str
    adapter: str | None
    data: str
    rows: int
    skipped: int
    """Rows left out by rendering (truncation="drop") or invalid rows skipped while reading."""
    results: list[EvalResult]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Metrics as rows, one column per evaluated variant."""
        names = ["loss", "perplexity", "tokens", "generated"]
        names += sorted({k for r in self.results for k in r.metrics})
        header = f"{'metric':<14}" + "".join(f"{r.label:>14}" for r in self.results)
        lines = [header, "-" * len(header)]
        for name in names:
            cells = []
            for r in self.results:
                value = getattr(r, name) if name in ("loss", "perplexity", "tokens", "generated") else None
                value = r.metrics.get(name) if value is None else value
                cells.append(f"{'-':>14}" if value is None else f"{_fmt(value):>14}")
            lines.append(f"{name:<14}" + "".join(cells))
        return "\n".join(lines)


def _fmt(value: float | int) -> str:
    return f"{value:d}" if isinstance(value, int) else f"{value:.4f}"


def load_eval_records(
    data: str | Path, *, fmt: str = "auto", limit: int | None = None
) -> tuple[list[Record], int]:
    """The dataset's records (the first `limit`) and how many invalid rows were skipped."""
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of rows, got {limit}")
    loaded = load_records(DatasetSpec(path=str(data), format=fmt))
    records = loaded.records[:limit] if limit is not None else loaded.records
    if not records:
        raise DataError(f"{data}: no rows to evaluate")
    return list(records), loaded.skipped


def evaluate(
    model_spec: str | Path,
    data: str | Path,
    *,
    adapter: str | Path | None = None,
    max_new_tokens: int = 64,
    limit: int | None = None,
    compare_base: bool = False,
    four_bit: bool = True,
    template: str = "auto",
    max_length: int = 512,
    data_format: str = "auto",
    out: str | Path | None = None,
    quant: QuantConfig | None = None,
    overwrite: bool = False,
) -> EvalReport:
    """Evaluate `model_spec` (+ `adapter`) on `data`; write the report as JSON to `out` (atomically).

    The 4-bit base is built with `quant`, by default the settings saved with the adapter by training.
    `out` follows the output rule of `qlorakit.core.outputs`, checked before the model is loaded: it replaces
    only a report eval wrote, or any file with `overwrite`; never an input.
    """
    if compare_base and adapter is None:
        raise ConfigError("--compare-base needs an --adapter to compare the base with")
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    records, skipped = load_eval_records(data, fmt=data_format, limit=limit)  # fail before loading a model
    plan = check_report_path(out, [model_spec, adapter, data], overwrite)
    quant = quant or (adapter_quant_config(adapter) if adapter is not None else None)
    model, tokenizer = load_base(model_spec, four_bit=four_bit, quant=quant)
    if adapter is not None:
        load_adapter(model, Path(adapter))
        model.eval()
    rendered = [
        render_record(r, tokenizer, template=template, max_length=max_length, truncation="truncate")
        for r in records
    ]
    kept = [(r, ex) for r, ex in zip(records, rendered, strict=True) if ex is not None]
    if not kept:
        raise DataError(f"{data}: no row could be rendered within max_length={max_length} tokens")
    passes = ("base", "adapted") if compare_base else ("adapted" if adapter else "base",)
    results = _evaluate_passes(model, tokenizer, kept, passes, template=template, settings=settings)
    report = EvalReport(
        str(model_spec),
        None if adapter is None else str(adapter),
        str(data),
        len(kept),
        skipped + len(records) - len(kept),
        results,
    )
    if plan is not None:
        write_report(report, plan)
    return report


def _evaluate_passes(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    kept: list[tuple[Record, Example]],
    labels: Sequence[str],
    *,
    template: str,
    settings: GenerationSettings,
) -> list[EvalResult]:
    """One `evaluate_pass` per label: `base` with the adapters off (no reload), `adapted` as loaded."""
    records, examples = [r for r, _ in kept], [ex for _, ex in kept]
    results = []
    for label in labels:
        with base_only(model) if label == "base" and "adapted" in labels else contextlib.nullcontext():
            results.append(
                evaluate_pass(
                    model, tokenizer, examples, records, label=label, template=template, settings=settings
                )
            )
    return results


def check_report_path(
    out: str | Path | None, inputs: list[str | Path | None], overwrite: bool
) -> OutputPlan | None:
    """`out` under the output rule of `qlorakit.core.outputs` (None without one), before any model is loaded."""
    if out is None:
        return None
    return check_output(out, command="eval", kind="file", inputs=inputs, overwrite=overwrite, suffix=".json")


def write_report(report: EvalReport, plan: OutputPlan) -> None:
    """The report as JSON at the checked path, signed as eval's own so a later run may replace it."""
    text = json.dumps({**json_signature("eval"), **report.to_dict()}, indent=2) + "\n"
    with output_file(plan) as fh:
        fh.write(text.encode("utf-8"))
