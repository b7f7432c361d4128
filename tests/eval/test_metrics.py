"""Generation metrics against hand-computed values."""

from __future__ import annotations

import math
import sys

import pytest

from qlorakit.core.errors import DataError, DependencyError
from qlorakit.eval.metrics import bleu, exact_match, generation_metrics, normalize_text, rouge_l


def test_exact_match_normalizes_whitespace_and_case():
    preds = ["  The Answer\tis 5 ", "Paris", "blue"]
    refs = ["the answer is 5", "paris", "red"]
    assert normalize_text("  A\n\nB  c ") == "a b c"
    assert exact_match(preds, refs) == pytest.approx(2 / 3)
    assert exact_match(preds, refs, normalize=False) == 0.0
    assert exact_match(["x"], [["y", " X "]]) == 1.0  # any reference counts


def test_identical_strings_score_perfectly():
    texts = ["the quick brown fox jumps over the lazy dog", "hello world again and again"]
    assert bleu(texts, texts) == pytest.approx(100.0)
    assert rouge_l(texts, texts) == pytest.approx(1.0)
    assert exact_match(texts, texts) == 1.0


def test_bleu_matches_the_formula_by_hand():
    # 1..4-gram matches 4/5, 3/4, 2/3, 1/2; hypothesis 5 words vs reference 6: brevity penalty e^(1 - 6/5)
    pred, ref = "the quick brown fox jumps", "the quick brown fox leaps high"
    expected = 100 * math.exp(1 - 6 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu([pred], [ref]) == pytest.approx(expected, rel=1e-6)
    # with a second reference equal to the prediction the score is perfect
    assert bleu([pred], [[ref, pred]]) == pytest.approx(100.0)


def test_rouge_l_is_the_lcs_f_measure():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 tokens each way
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # LCS 2 ("a c"), precision 2/2, recall 2/4: F = 2PR / (P + R) = 2/3
    assert rouge_l(["a c"], ["a b c d"]) == pytest.approx(2 / 3)
    # averaged over the corpus
    assert rouge_l(["a c", "x y"], ["a b c d", "x y"]) == pytest.approx((2 / 3 + 1) / 2)


def test_generation_metrics_bundle():
    out = generation_metrics(["a c", "Paris"], ["a b c d", "paris"])
    assert set(out) == {"exact_match", "bleu", "rouge_l", "count"}
    assert out["exact_match"] == 0.5 and out["count"] == 2
    assert out["rouge_l"] == pytest.approx((2 / 3 + 1) / 2)
    assert 0 <= out["bleu"] <= 100


def test_bad_inputs_raise_data_errors():
    with pytest.raises(DataError, match="2 predictions but 1"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no predictions"):
        bleu([], [])
    with pytest.raises(DataError, match="same number of references"):
        bleu(["a", "b"], [["a"], ["b", "c"]])
    with pytest.raises(DataError, match="single string"):
        rouge_l("abc", "abc")


def test_missing_optional_library_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` fail
    with pytest.raises(DependencyError, match="pip install sacrebleu"):
        bleu(["a"], ["a"])
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    with pytest.raises(DependencyError, match="pip install rouge-score"):
        rouge_l(["a"], ["a"])
