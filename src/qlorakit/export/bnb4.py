"""`export --format bnb4`: a pre-quantized 4-bit folder that transformers + bitsandbytes load as stored.

The model is loaded quantizing as it is read (NF4 + double quantization, the `quant` defaults), or taken
as stored when it already is a 4-bit folder, and written by `qlorakit.quant.convert.save_quantized`.
"""

from __future__ import annotations

from pathlib import Path

from qlorakit.core.outputs import check_output
from qlorakit.models.load import load_base
from qlorakit.models.shape import estimated_bytes
from qlorakit.quant.convert import save_quantized


def export_bnb4(model: str, out: Path, overwrite: bool = False) -> None:
    """Quantize (or re-save) a model as a 4-bit folder; the output is checked before the model is read."""
    need = estimated_bytes(model, 0.5)
    plan = check_output(out, command="export bnb4", inputs=[model], overwrite=overwrite, need_bytes=need)
    quantized, tokenizer = load_base(model, four_bit=True)
    save_quantized(quantized, tokenizer, out, plan=plan)


__all__ = ["export_bnb4"]
