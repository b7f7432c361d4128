import pytest

from qlorakit.config import Config, DatasetSpec, config_from_dict, config_to_dict, load_config
from qlorakit.core.errors import ConfigError


def test_defaults_are_qlora_reference_like():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.quant.enabled and cfg.quant.quant_type == "nf4" and cfg.quant.double_quant
    assert cfg.quant.blocksize == 64 and cfg.train.max_grad_norm == 0.3
    assert cfg.lora.target_modules == "all-linear"


def test_yaml_and_overrides_fill_the_tree(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  name: some/folder\nlora:\n  r: 8\n  target_modules: [q_proj, v_proj]\n"
        "data:\n  datasets:\n    - {path: a.json, weight: 2}\n    - {path: b.jsonl}\n"
    )
    cfg = load_config(
        path, ["--train.lr=1e-4", "--lora.r=32", "--train.max-grad-norm=null", "quant.enabled=false"]
    )
    assert cfg.model.name == "some/folder"
    assert cfg.lora.r == 32 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == 1e-4 and cfg.train.max_grad_norm is None
    assert cfg.quant.enabled is False
    assert cfg.data.datasets == [DatasetSpec(path="a.json", weight=2.0), DatasetSpec(path="b.jsonl")]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_all_errors_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rank: 8\n  r: eight\ntrain:\n  lr: -1\n  optim: sgd\nfoo: {}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["--quant.blocksize=100"])
    msg = str(exc.value)
    assert str(path) in msg
    for needle in (
        "lora.rank: unknown key",
        "lora.r: expected an integer",
        "train.optim: must be one of",
        "foo: unknown key",
    ):
        assert needle in msg, msg


def test_range_rules_are_all_reported():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"quant": {"blocksize": 100}, "lora": {"r": 0, "dropout": 1.5}, "train": {"lr": 0}})
    msg = str(exc.value)
    assert "4 problem(s)" in msg
    assert "quant.blocksize" in msg and "lora.r" in msg and "lora.dropout" in msg and "train.lr" in msg


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(None, ["--train.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
