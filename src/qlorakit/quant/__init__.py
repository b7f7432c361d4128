"""4-bit quantization (NF4 / FP4 + double quantization), bit-compatible with bitsandbytes."""

from qlorakit.quant.blockwise import bits_per_parameter, dequantize_4bit, quantize_4bit
from qlorakit.quant.codes import FP4_CODE, NF4_CODE, dynamic_map, get_code
from qlorakit.quant.state import NestedState, QuantState, state_from_tensors, state_to_tensors

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "NestedState",
    "QuantState",
    "bits_per_parameter",
    "dequantize_4bit",
    "dynamic_map",
    "get_code",
    "quantize_4bit",
    "state_from_tensors",
    "state_to_tensors",
]
