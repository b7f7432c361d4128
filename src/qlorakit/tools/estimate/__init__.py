"""How much memory a fine-tuning run needs, from the model's shape alone (no weights are loaded).

The model is a decoder transformer described by its `config.json` (Llama, Mistral, Qwen2, Gemma and
GPT-2 key names) or by a GGUF file's metadata (see `qlorakit.models.shape`). `memory.estimate_memory` returns a
breakdown of the peak resident set (RSS) of the PyTorch CPU process that trains it:

    weights           frozen or trainable parameters (4-bit packed linears for QLoRA)
    quant_constants   absmax per 64-block (8 bit + a nested fp32 per 256 blocks with double quantization)
    adapters          LoRA A/B matrices, fp32
    gradients         of the trainable parameters
    optimizer         AdamW m and v in fp32, plus fp32 master weights when training 16-bit parameters
    activations       tensors autograd saves per decoder layer (counted from the saved tensors of
                      transformers' Llama layer with SDPA attention)
    logits            the loss. qlorakit's fused head + cross-entropy (`qlorakit.loss`, for
                      the architectures it knows): a per-token logsumexp, the fp32 gradient of the last
                      hidden states and a few [1024, 4096] fp32 blocks of logits at a time. Otherwise
                      batch * seq * vocab * 16 B at the backward peak: the logits the loss holds, the fp32
                      log-probabilities cross-entropy saves, the gradient of those and of the logits. With
                      gradient checkpointing only what exceeds one recomputed layer counts: the loss's
                      backward is over before the first layer is recomputed
    allocator         freed memory the process keeps resident, by allocator mode (see below)
    kernels           the 16-bit matmul kernels oneDNN compiles, one set per batch shape
                      (`qlorakit.tools.estimate.kernel_cache`); none in fp32
    workspace         transient buffers: a dequantized 4-bit weight, AdamW step temporaries
    runtime           the process itself: Python + torch + transformers + qlorakit, measured

`training` is the sum of those (gradients stay allocated across micro-batches in a trainer that
accumulates them); `loading` is the peak while the checkpoint is read and converted; `peak` the larger
(the process's peak RSS); `required` leaves out clean checkpoint-file pages, the part that must fit.
`RunSettings.from_config` reads a training config as `qlorakit train` runs it on this machine (method,
rank, targets, batch, max_length, checkpointing, optimizer, the compute dtype `auto` resolves to, the
allocator mode); `qlorakit.tools.estimate.run_shapes` replays the batch shapes of its data.

Loading: QLoRA quantizes each linear as it reads it with plain file reads (`qlorakit.quant.loading`), so
it holds the 4-bit model, the unquantized rest and one layer's weight. 16-bit methods load with
transformers, which maps the safetensors file: stored in the compute dtype, the tensors are used in
place (file pages); in another dtype, the mapped file and the converted model coexist while loading.

The allocator: what the mode of `qlorakit.core.memory` (QLORAKIT_MALLOC_TUNING, asked the way the `qlorakit`
command asks it) keeps resident after PyTorch frees memory is modelled in `qlorakit.tools.estimate.allocator`.
Measured against real runs by benchmarks/bench_estimate.py and the slow test in tests/test_estimate.py.

Modules: `memory` (the components and `estimate_memory`), `advice` (`RunSettings`, `advise` within a budget),
`kernel_cache` (16-bit matmul kernels kept per shape), `allocator` (what the allocator mode keeps),
`run_shapes` (the batch shapes replayed from a run's data).
"""
