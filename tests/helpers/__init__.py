"""Shared test helpers, one module per concern (fixtures live in tests/conftest.py):

- `helpers.tiny`: tiny real Llama models and a real tokenizer made on the fly, a bitsandbytes reference path;
- `helpers.filesystems`: read-only and small-disk mounts, byte snapshots of a folder, leftover temporaries;
- `helpers.cli`: a tiny project on disk (model folder, data, train.yaml) and running the real CLI in
  subprocesses;
- `helpers.tinytrain`: the training loop on a tiny LoRA model, without the CLI;
- `helpers.configs`: published model configs (Llama-2-7B, Llama-3-70B) for shape-only tests;
- `helpers.compare`: run folders for `qlorakit compare` (synthetic, or a tiny project to train).
"""
