"""Datasets: reading and validating rows, rendering them to token ids and labels, batching and packing."""

from qlorakit.data.build import DataBundle, DatasetStats, DataStats, build_datasets, check_datasets
from qlorakit.data.collate import block_causal_mask, collate, pack_examples
from qlorakit.data.formats import LoadResult, Message, Record, builtin_path, load_records, reference_answer
from qlorakit.data.render import IGNORE_INDEX, Example, prompt_ids, render_record, resolve_template

__all__ = [
    "IGNORE_INDEX",
    "DataBundle",
    "DataStats",
    "DatasetStats",
    "Example",
    "LoadResult",
    "Message",
    "Record",
    "block_causal_mask",
    "build_datasets",
    "builtin_path",
    "check_datasets",
    "collate",
    "load_records",
    "pack_examples",
    "prompt_ids",
    "reference_answer",
    "render_record",
    "resolve_template",
]
