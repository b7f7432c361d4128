"""qlorakit: QLoRA fine-tuning on small hardware."""

__version__ = "0.1.0"
