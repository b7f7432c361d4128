"""Where qlorakit keeps what it can rebuild: `$QLORAKIT_CACHE`, else `~/.cache/qlorakit`."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "QLORAKIT_CACHE"


def cache_root() -> Path:
    """The cache folder (converted GGUF models, compiled kernels): `$QLORAKIT_CACHE` with `~` expanded, else
    `~/.cache/qlorakit`. Not created here."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "qlorakit"
