"""The eval pipeline: response-only loss, generation metrics, base vs adapted, JSON report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlorakit.config import LoRAConfig
from qlorakit.core.errors import ConfigError, DataError
from qlorakit.eval.evaluate import evaluate, response_loss
from qlorakit.loss import next_token_nll

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest
ROWS = [
    {"instruction": "Reverse the word.", "input": "hello", "output": "olleh"},
    {"instruction": "What is 2 + 3?", "input": "", "output": "It is 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello, how are you?"},
    {"instruction": "Reverse the word.", "input": "fox", "output": "xof"},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def train_adapter(model_dir, data_file, out, *, steps: int = 60):
    """A real adapter: a few AdamW steps of response-only LoRA training on the 4-bit base."""
    from qlorakit.config import DatasetSpec, QuantConfig
    from qlorakit.data import collate, load_records, render_record
    from qlorakit.lora import inject_lora, save_adapter
    from qlorakit.models.load import load_base

    model, tokenizer = load_base(model_dir, four_bit=True, quant=QuantConfig(compute_dtype="float32"))
    cfg = LoRAConfig(r=8, alpha=16.0, dropout=0.0)
    inject_lora(model, cfg, seed=0)
    records = load_records(DatasetSpec(path=str(data_file))).records
    batch = collate([render_record(r, tokenizer, max_length=64) for r in records], tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(model, out, cfg, base_model_name_or_path=str(model_dir))
    return out


def test_masked_nll_matches_transformers_loss(tiny_llama):
    ids = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100
    with torch.no_grad():
        out = tiny_llama(input_ids=ids, labels=labels)
    total, count = next_token_nll(out.logits, labels)
    assert count == 3 * 11 - 3 * 4 - 3
    assert float(total) / count == pytest.approx(float(out.loss), rel=1e-5)
    assert next_token_nll(out.logits, torch.full_like(labels, -100))[1] == 0


def test_response_loss_scores_only_responses(tiny_llama, tiny_tokenizer):
    from qlorakit.data import Record, render_record
    from qlorakit.data.formats import Message

    record = Record((Message("user", "Reverse the word."), Message("assistant", "olleh")), None, "t:1")
    example = render_record(record, tiny_tokenizer, max_length=64)
    loss, tokens = response_loss(tiny_llama, [example], tiny_tokenizer.pad_token_id)
    assert tokens == sum(1 for label in example.labels if label != -100) < len(example.input_ids)
    with torch.no_grad():
        ref = tiny_llama(
            input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])
        ).loss
    assert loss == pytest.approx(float(ref), rel=1e-5)


def test_eval_base_vs_adapter_and_report(tmp_path, tiny_model_dir, data_file):
    adapter = train_adapter(tiny_model_dir, data_file, tmp_path / "adapter")
    out = tmp_path / "results.json"
    report = evaluate(
        tiny_model_dir, data_file, adapter=adapter, compare_base=True, max_new_tokens=12, out=out
    )
    base, adapted = report.results
    assert (base.label, adapted.label) == ("base", "adapted")
    assert report.rows == 4 and base.tokens == adapted.tokens > 0 and base.generated == 4
    assert set(adapted.metrics) == {"exact_match", "bleu", "rouge_l"}
    # Training on these rows lowers their loss and improves the generations.
    assert adapted.loss < base.loss - 0.5
    assert adapted.perplexity == pytest.approx(math.exp(adapted.loss))
    assert adapted.metrics["rouge_l"] > base.metrics["rouge_l"]
    # The base pass (adapters disabled, no reload) equals evaluating the plain base model.
    plain = evaluate(tiny_model_dir, data_file, max_new_tokens=12).results[0]
    assert plain.loss == pytest.approx(base.loss, rel=1e-6) and plain.metrics == base.metrics
    saved = json.loads(out.read_text())
    assert saved["results"][1]["loss"] == pytest.approx(adapted.loss)
    assert saved["results"][1]["samples"][0]["reference"] == "olleh"
    table = report.table()
    assert "perplexity" in table and "rouge_l" in table and "adapted" in table


def test_limit_and_16bit(tiny_model_dir, data_file):
    report = evaluate(tiny_model_dir, data_file, limit=2, max_new_tokens=4, four_bit=False)
    assert report.rows == 2 and report.results[0].generated == 2
    assert [r.label for r in report.results] == ["base"]
    full = evaluate(tiny_model_dir, data_file, max_new_tokens=4, four_bit=False)
    assert full.rows == 4 and full.results[0].tokens > report.results[0].tokens


def test_bad_input_fails_before_loading(tmp_path, data_file):
    missing_model = tmp_path / "no-model"  # never reached: the data problems are found first
    with pytest.raises(DataError):
        evaluate(missing_model, tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="limit"):
        evaluate(missing_model, data_file, limit=0)
    with pytest.raises(ConfigError, match="compare-base"):
        evaluate(missing_model, data_file, compare_base=True)


def test_text_rows_have_loss_but_no_generation_metrics(tmp_path, tiny_model_dir):
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    result = evaluate(tiny_model_dir, path, four_bit=False).results[0]
    assert result.tokens > 5 and result.generated == 0 and result.metrics == {}
