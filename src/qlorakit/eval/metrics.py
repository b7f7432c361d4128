"""Generation metrics on strings: exact match, corpus BLEU (sacrebleu), ROUGE-L F-measure (rouge-score).

`refs` is either one reference string per prediction, or a list of references per prediction (the same
number for every prediction). sacrebleu and rouge-score are optional and imported when first needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from qlorakit.core.errors import DataError, DependencyError

References = Sequence[str] | Sequence[Sequence[str]]
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Strip, collapse runs of whitespace to one space, and case-fold."""
    return _SPACES.sub(" ", text.strip()).casefold()


def _reference_lists(preds: Sequence[str], refs: References) -> list[list[str]]:
    """One list of references per prediction, after checking lengths and types."""
    if isinstance(preds, str) or isinstance(refs, str):
        raise DataError("preds and refs must be lists of strings, not a single string")
    if len(preds) != len(refs):
        raise DataError(
            f"{len(preds)} predictions but {len(refs)} references; give one reference (list) per prediction"
        )
    if not preds:
        raise DataError("no predictions to score")
    out = []
    for row, (pred, ref) in enumerate(zip(preds, refs, strict=True)):
        if not isinstance(pred, str):
            raise DataError(f"prediction {row} is {type(pred).__name__}, expected str")
        candidates = [ref] if isinstance(ref, str) else list(ref)
        if not candidates or not all(isinstance(c, str) for c in candidates):
            raise DataError(f"reference {row} must be a string or a non-empty list of strings")
        out.append(candidates)
    return out


def exact_match(preds: Sequence[str], refs: References, normalize: bool = True) -> float:
    """Fraction of predictions equal to (any of) their references, in [0, 1]."""
    ref_lists = _reference_lists(preds, refs)
    norm = normalize_text if normalize else (lambda s: s)
    hits = sum(norm(p) in {norm(r) for r in rs} for p, rs in zip(preds, ref_lists, strict=True))
    return hits / len(preds)


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(
            f"this metric needs the {package} package: pip install {package} (or pip install 'qlorakit[metrics]')"
        ) from exc


def bleu(preds: Sequence[str], refs: References) -> float:
    """Corpus BLEU in [0, 100] with sacrebleu's defaults (13a tokenization, exponential smoothing)."""
    ref_lists = _reference_lists(preds, refs)
    counts = {len(rs) for rs in ref_lists}
    if len(counts) != 1:
        raise DataError(
            f"every prediction needs the same number of references for BLEU (got {sorted(counts)})"
        )
    sacrebleu = _require("sacrebleu", "sacrebleu")
    streams = [
        list(stream) for stream in zip(*ref_lists, strict=True)
    ]  # sacrebleu wants one list per reference set
    return float(sacrebleu.corpus_bleu(list(preds), streams).score)


def rouge_l(preds: Sequence[str], refs: References) -> float:
    """Mean ROUGE-L F-measure in [0, 1] (longest common subsequence of tokens); with several references
    the best-scoring one counts."""
    ref_lists = _reference_lists(preds, refs)
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for pred, rs in zip(preds, ref_lists, strict=True):
        total += max(scorer.score(r, pred)["rougeL"].fmeasure for r in rs)
    return total / len(preds)


def generation_metrics(preds: Sequence[str], refs: References) -> dict[str, float]:
    """`{"exact_match", "bleu", "rouge_l", "count"}` for a batch of generations."""
    return {
        "exact_match": exact_match(preds, refs),
        "bleu": bleu(preds, refs),
        "rouge_l": rouge_l(preds, refs),
        "count": float(len(preds)),
    }
