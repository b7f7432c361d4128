"""Shared fixtures and hooks (the helpers they build on live in tests/helpers/): tiny real transformers models
and a real tokenizer, one torch thread, a read-only folder and small disks.

Also two rules for the whole suite:
- a fresh qlorakit cache (`QLORAKIT_CACHE` in a temporary folder, unless the caller sets one), so the
  first-use work a new user meets (the built-in GGUF converted to safetensors, the C++ kernels compiled)
  runs in every test session instead of hiding behind a developer's warm `~/.cache/qlorakit`;
- under CI (`CI=true`) a test skipped because bitsandbytes, PEFT, another test dependency or the C++
  kernels are missing is a failure: CI installs all of them, so such a skip means a broken install.
"""

from __future__ import annotations

import os
import re
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("QLORAKIT_CACHE"):
    # Set before qlorakit is imported anywhere; subprocesses started by tests inherit it.
    os.environ["QLORAKIT_CACHE"] = tempfile.mkdtemp(prefix="qlorakit-test-cache-")

import pytest
import torch

from helpers import filesystems
from helpers.tiny import make_adapter, make_tiny_llama, make_tiny_tokenizer, save_tiny_model

# Skip reasons that mean "something CI installs is missing" (importorskip says "could not import").
_MISSING_DEPENDENCY = re.compile(r"could not import|No module named|could not be built|not installed", re.I)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_dependency_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_dependency_skip(outcome.get_result())


def _fail_missing_dependency_skip(report) -> None:
    if not (_in_ci() and report.skipped):
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if _MISSING_DEPENDENCY.search(reason):
        report.outcome = "failed"
        report.longrepr = f"CI must not skip for a missing dependency (CI installs it): {reason}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and far faster on a busy machine). A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; the count is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A Hugging Face folder (config.json, model.safetensors, tokenizer files) of a tiny Llama."""
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory):
    """A folder with `base/` (a tiny Llama and its tokenizer) and two adapters for it with strong random
    weights, `alpha/` and `beta/` (so generations visibly differ)."""
    root = tmp_path_factory.mktemp("adapters")
    save_tiny_model(root / "base")
    make_adapter(root / "base", root / "alpha", seed=1)
    make_adapter(root / "base", root / "beta", seed=2)
    return root


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A folder nobody can write in, even root (see `helpers.filesystems.read_only`)."""
    with filesystems.read_only(tmp_path_factory.mktemp("read-only")) as root:
        yield root


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(size)` mounts a tmpfs of `size` bytes and returns its folder (root only)."""
    with filesystems.small_disks(tmp_path) as make:
        yield make
