"""Loading a base model for adapters: adapter specs given on the command line."""

from __future__ import annotations

import pytest

from qlorakit.core.errors import ConfigError
from qlorakit.models.load import parse_adapter_specs


def test_parse_adapter_specs(tiny_adapters):
    specs = parse_adapter_specs([str(tiny_adapters / "alpha"), f"b={tiny_adapters / 'beta'}"])
    assert specs == {"alpha": tiny_adapters / "alpha", "b": tiny_adapters / "beta"}
    with pytest.raises(ConfigError, match="given twice"):
        parse_adapter_specs([str(tiny_adapters / "alpha"), f"alpha={tiny_adapters / 'beta'}"])
    with pytest.raises(ConfigError, match="adapter_config.json"):
        parse_adapter_specs([str(tiny_adapters / "missing")])
