import pytest

from helpers.tiny import make_tiny_llama, make_tiny_tokenizer
from qlorakit.cli import main


def test_cli_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "usage: qlorakit" in capsys.readouterr().out


def test_tiny_fixtures_are_consistent():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    ids = tok("hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tok)
