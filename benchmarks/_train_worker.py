"""One bench_train worker: build one method's trainable model, time its steps, print one JSON line.

benchmarks/bench_train.py starts one process per (method, configuration), so the peak RSS each worker
reports (its own VmHWM) covers that method's loading and training and nothing else:

    python benchmarks/_train_worker.py '{"method": "qlorakit", "dtype": "bf16", "gc": false, ...}'

`dtype` reaches every method the same way: the weights that stay dense are loaded in it, the 4-bit layers
compute in it, and bf16 runs under CPU autocast (as qlorakit's training loop does; fp32 without). LoRA
weights are fp32 everywhere (PEFT's default and qlorakit's). Every step is the same: loss, backward,
clip to 0.3, AdamW (lr 2e-4, no weight decay), on one fixed batch; the first `warmup` steps are untimed.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

# qlorakit.core.memory needs only the standard library. qlorakit's model and training modules are imported
# where a qlorakit worker needs them, as the peers' libraries are: no worker carries another's modules.
from qlorakit.core.memory import allocator_mode, configure_allocator, peak_rss_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT, LR, CLIP = 16, 32, 0.05, 2e-4, 0.3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fixed_batch(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """The one batch every worker trains on: input_ids = labels [batch, seq], no padding."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # the frozen embeddings' output must require grad


def build_qlorakit(model_dir: Path, dtype: torch.dtype, gc: bool) -> nn.Module:
    from qlorakit.config import LoRAConfig, QuantConfig
    from qlorakit.lora.inject import inject_lora, prepare_for_kbit_training
    from qlorakit.quant.loading import load_quantizing

    # As `qlorakit train` builds it: models.load_model resolves this folder (no tokenizer) to
    # load_quantizing, each linear quantized (NF4, double quant) as it is read, the rest in `dtype`.
    model = load_quantizing(model_dir, QuantConfig().to_settings(dtype))
    prepare_for_kbit_training(model, gradient_checkpointing=gc)  # freezes the base, so before injecting
    inject_lora(model, LoRAConfig(r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS), seed=0)
    return model


def _peft_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def build_peft_bnb(model_dir: Path, dtype: torch.dtype, gc: bool) -> nn.Module:
    """PEFT's documented QLoRA recipe: bitsandbytes NF4 + double quant, prepare_model_for_kbit_training."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, dtype=dtype, device_map="cpu"
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    return _peft_lora(model)


def build_peft_lora(model_dir: Path, dtype: torch.dtype, gc: bool) -> nn.Module:
    """Plain LoRA on a dense base held in `dtype` (no quantization)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if gc:
        _checkpointing(model)
    model.config.use_cache = False
    return _peft_lora(model)


class NF4LoRA(nn.Module):
    """torchao's NF4 tensor as the frozen base weight plus a LoRA branch (torchtune's recipe, reduced)."""

    def __init__(self, base: nn.Linear) -> None:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        super().__init__()
        self.weight = nn.Parameter(to_nf4(base.weight.data), requires_grad=False)
        self.lora_a = nn.Linear(base.in_features, R, bias=False)
        self.lora_b = nn.Linear(R, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(DROPOUT)
        self.scaling = ALPHA / R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        out = linear_nf4(input=x, weight=self.weight)
        return out + self.scaling * self.lora_b(self.lora_a(self.dropout(x))).to(out.dtype)


def build_torchao(model_dir: Path, dtype: torch.dtype, gc: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.requires_grad_(False)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in TARGETS:
                setattr(module, child_name, NF4LoRA(child))
    if gc:
        _checkpointing(model)
    model.config.use_cache = False
    return model


BUILDERS = {
    "qlorakit": build_qlorakit,
    "peft_lora": build_peft_lora,
    "peft_bnb": build_peft_bnb,
    "torchao": build_torchao,
}
METHODS = tuple(BUILDERS)  # qlorakit first: the rest are the peers


def step_loss(model: nn.Module, batch: dict, autocast: torch.dtype | None, fused: bool) -> torch.Tensor:
    """Mean token loss: qlorakit's training-loop loss (fused head + cross-entropy) or the model's own."""
    if fused:
        from qlorakit.train.loop import batch_loss_sum, count_label_tokens

        return batch_loss_sum(model, batch, torch.device("cpu"), autocast) / count_label_tokens(batch)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        return model(**batch).loss


def run(job: dict) -> dict:
    """Build, train `warmup + steps` steps; step times (timed steps only), every loss, peak RSS."""
    # Like the `qlorakit` command line, before anything is allocated; QLORAKIT_MALLOC_TUNING (set by the
    # driver for every qlorakit worker) picks the mode. Peers get glibc's MALLOC_* variables instead.
    malloc_applied = None
    if job["method"] == "qlorakit":
        configure_allocator()
        malloc_applied = allocator_mode()
    torch.manual_seed(job["seed"])
    torch.set_num_threads(job["threads"])
    dtype = DTYPES[job["dtype"]]
    t0 = time.perf_counter()
    model = BUILDERS[job["method"]](Path(job["model"]), dtype, job["gc"])
    load_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    vocab = json.loads((Path(job["model"]) / "config.json").read_text())["vocab_size"]
    batch = fixed_batch(vocab, job["batch"], job["seq"])
    autocast = None if dtype == torch.float32 else dtype
    times, losses = [], []
    for step in range(job["warmup"] + job["steps"]):
        t = time.perf_counter()
        loss = step_loss(model, batch, autocast, fused=job["loss"] == "fused")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= job["warmup"]:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return {
        "times": times,
        "losses": losses,
        "peak_rss": peak_rss_bytes(),  # VmHWM: this process alone (ru_maxrss would include the driver's)
        "load_s": load_s,
        "trainable": sum(p.numel() for p in params),
        "malloc_applied": malloc_applied,
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
