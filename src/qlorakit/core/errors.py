"""The exceptions qlorakit raises at its boundaries.

Every message names the offending file, key, row or tensor, and says how to fix it.
"""


class QLoraKitError(Exception):
    """Base class of every error qlorakit raises on bad input."""


class ConfigError(QLoraKitError):
    """A configuration value (YAML, CLI override or API argument) is unknown, mistyped or impossible."""


class DataError(QLoraKitError):
    """A dataset file or row is missing, unreadable or malformed."""


class QuantizationError(QLoraKitError):
    """A tensor cannot be quantized or dequantized as asked (dtype, shape, blocksize, non-finite values)."""


class CheckpointError(QLoraKitError):
    """A checkpoint or saved model folder is missing, corrupt or inconsistent."""


class FormatError(QLoraKitError):
    """An on-disk format (adapter, 4-bit folder, GGUF) does not match what qlorakit reads or writes."""


class ModelError(QLoraKitError):
    """A model spec cannot be resolved, or a model does not contain what was asked of it."""


class DependencyError(QLoraKitError):
    """An optional package needed for the requested feature is not installed (the message gives the pip command)."""


class TrainingDivergedError(QLoraKitError):
    """The loss or the gradient norm became NaN/Inf; training stopped before the weights were touched."""
