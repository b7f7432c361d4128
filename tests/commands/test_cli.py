"""The command line's split of config overrides from options: `--section.key=value`, and the config's
top-level keys (`--method=...`) wherever the command has no option of that name."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from helpers.tiny import make_tiny_llama
from qlorakit.cli import TOP_LEVEL_KEYS, main
from qlorakit.config import Config


def test_top_level_keys_are_the_config_fields_outside_any_section():
    hints = typing.get_type_hints(Config)
    fields = dataclasses.fields(Config)
    assert tuple(f.name for f in fields if not dataclasses.is_dataclass(hints[f.name])) == TOP_LEVEL_KEYS


def test_method_reaches_the_config_of_train_and_stays_an_option_of_estimate(tmp_path, capsys):
    # both overrides reach the config, which names them before any model is loaded
    assert main(["train", "--method=no_such_method", "--train.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "method: must be one of 'lora', got 'no_such_method'" in err and "train.lr" in err
    with pytest.raises(SystemExit) as exc:  # not a config key: argparse's own error, as before
        main(["train", "--methodz=1"])
    assert exc.value.code == 2 and "unrecognized arguments: --methodz=1" in capsys.readouterr().err
    make_tiny_llama().save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path), "--method=qlora"]) == 0  # estimate's option, not the key
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Component"))
    assert header.split()[1:] == ["qlora"]
