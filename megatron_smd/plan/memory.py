"""The memory model of ``smd plan``: per-GPU bytes of the learner and of the rollout (:func:`plan`).

What is modelled, and where the formulas come from
--------------------------------------------------

Notation: ``D`` hidden size, ``F`` MLP intermediate size, ``H`` / ``H_kv`` query / KV heads, ``d``
head dim, ``L`` layers, ``V_p`` vocabulary padded to a multiple of ``128 * tp`` (Megatron's
``make_vocab_size_divisible_by``), ``t, p, c, n_dp`` = TP, PP, CP, DP, ``S`` the padded row length
(``model.max_seq_len`` rounded up to a multiple of ``lcm(2c, 8)``, :meth:`Learner.row_length`),
``b`` rows per micro-batch (``learner.micro_batch_size``, doubled when SMD's distillation puts the
shadow and the dense forward of each trajectory in the same micro-batch), ``a`` bytes per
activation element (the parameter dtype).

**Parameters per GPU** (exact, counted the way Megatron-Core's local GPT layer spec allocates them;
the test compares with a built model): per layer ``2D`` (two RMSNorm weights) ``+ (H + 2H_kv) d D / t``
(fused QKV; ``+ (H + 2H_kv) d / t`` bias for Qwen2) ``+ D H d / t`` (output projection) ``+ 3 F D / t``
(SwiGLU: fused gate/up ``[2F/t, D]`` and down ``[D, F/t]``); ``L / p`` layers per stage; the first
stage adds the embedding ``V_p D / t``; the last stage adds the final norm ``D`` and the output
layer ``V_p D / t`` (untied, or tied with ``p > 1``, where Megatron keeps a synchronized copy).

**Weights, gradients, optimizer** (bytes per parameter; Rajbhandari et al. 2020, *ZeRO*, arXiv
1910.02054, sec. 3.1; Megatron-LM ``docs/source/api-guide/dist_optimizer.md``): the learner today
trains in fp32 by default (the replay-exactness setting): 4 (weights) + 4 (gradients) + 8 (Adam's two fp32
moments; the fp32 weights are the master copy) = 16. With Megatron bf16 mixed precision
(``learner.precision: bf16``): 2 + 4 (fp32 gradient buffer, ``grad_reduce_in_fp32``) + 12 (fp32
master + two moments) = 18. A distributed optimizer (ZeRO-1) divides the optimizer term by ``n_dp``;
with ``learner.distributed_optimizer: true`` the plan counts it sharded, otherwise unsharded (and
reports the sharded figure too). A reference model (``algorithm.kl_coef > 0``) adds one more copy of the
weights.

**Activations** (Korthikanti et al. 2022, *Reducing Activation Recomputation in Large Transformer
Models*, arXiv 2205.05198, sec. 4): count the tensors each layer saves for backward. Their GPT
count, ``s b D (34 + 5 H s / D)`` bytes in 16-bit (``10 + 24/t + 5Hs/(Dt)`` under TP without
sequence parallelism), is redone for the layer this project builds (Megatron-Core local spec,
torch RMSNorm, GQA, SwiGLU, no dropout). Per token and layer, in elements of ``a`` bytes::

    replicated over TP (divided by t with sequence parallelism):
        6 D            per RMSNorm: its input and the normalized x; then the weighted output,
                       which the next linear (QKV, fc1) keeps as its input
    split over TP (cp = 1):
        (H + 2 H_kv) d / t   fused QKV output (V is a view of it, so attention keeps all of it)
        (H + H_kv) d / t     Q and K after RoPE
        H d / t              attention output (kept by the kernel and by the output projection)
        5 F / t              SwiGLU: fc1 output [gate | up] (2F), silu(gate), up + offset, and
                             their product (the fc2 input), F each
    plus fp32: two RMSNorm rstd (8 bytes), RoPE cos/sin for Q and K (16 d bytes),
    the attention log-sum-exp (4 H / t bytes).

With ``cp > 1`` attention keeps the local Q and the all-gathered K and V of the whole row
(``2 S H_kv d / t`` elements per row and layer, :mod:`megatron_smd.parallel.cp`) instead of the
fused QKV output and the local K. With ``attention_backend: sdpa`` the dense mask as SDPA keeps it,
``s S`` elements per row and layer (``H/t`` times that for per-head eviction); flex and TE keep no
``s x S`` tensor. Local tokens per rank are ``s = S / c``. Per micro-batch: the int32 ``evict`` mask
``[b, L, S]``, the int64 token ids (first stage), the final RMSNorm and output-layer input (``3 D``
per token, last stage). Full recomputation (``learner.megatron.recompute_granularity: full``) keeps
only each layer's input, ``D`` elements per token (Korthikanti sec. 4.1's ``2sbh`` per layer), and
re-creates one layer's activations during its backward (counted as transient). Selective
recomputation drops the attention-internal terms (mask, gathered K/V). The test checks these counts
against the bytes autograd actually saves (``torch.autograd.graph.saved_tensors_hooks``) on the tiny
model for TP=1, TP=2, CP=2 and full recomputation.

**Pipeline**: with 1F1B, stage ``k`` holds the activations of ``min(p - k, m)`` micro-batches,
``m`` the number of micro-batches per optimizer step on one DP rank (Narayanan et al. 2021,
*Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM*, arXiv 2104.04473,
sec. 2.2.1; Korthikanti sec. 4.2.3): the first stage holds ``p`` micro-batches of ``L / p`` layers,
i.e. as much as one micro-batch of the whole model.

**Output layer** (last stage): the vocab-parallel log-prob keeps ``exp(x - max)`` in fp32,
``4 V_p / t`` bytes per token (saved), and transiently the logits (``a V_p / t``) and their fp32 copy.

**Rollout KV cache** (Kwon et al. 2023, *PagedAttention*, arXiv 2309.06180): ``2 L H_kv d`` elements
per cached token; per GPU of an engine with TP ``t_r``, ``ceil(H_kv / t_r)`` KV heads (SGLang
replicates KV heads when ``t_r > H_kv``). Tokens a request holds per layer at its peak, for prompt
length ``P``, ``N`` new tokens, budget ``B`` (exactly what the reference engine holds: the
sampled last token is never written to the cache, eviction runs right after the step that
overflows)::

    r0 = min(P, B) if the policy compresses after prefill (P > B) else P
    none, snapkv:    r0 + N - 1              (snapkv compresses the prompt once)
    streaming, h2o:  min(r0 + N - 1, B + 1)  (evict every step once full)
    rkv:             min(r0 + N - 1, B + buffer)
    and at least P: the prompt is prefilled densely before it is compressed.

The plan takes the worst case the learner is sized for: ``N = rollout.max_new_tokens`` and
``P = model.max_seq_len - N``. :func:`batch_peak_tokens` is the same count for a whole reference-engine
batch (prompts prefilled one after another, ``group_size`` rows each, decoded in lock step); the
test compares both with ``RolloutStats.peak_kv_bytes_used`` for every policy, byte for byte.

The engine's pool is ``mem_fraction_static * gpu_memory - weights`` (SGLang's static reservation;
``sglang.mem_fraction_static``, default 0.85 here); colocated (``resources.rollout_nodes: 0``) the
learner's resident state (weights, gradients, optimizer) also stays on the GPU during rollout.
Concurrent requests that fit = pool // bytes per request, dense vs the configured policy. The
rollout is "queued", not failed, when the batch per engine exceeds that.

Status thresholds: ``fits`` below 90% of the GPU, ``tight`` up to 100% (allocator fragmentation,
the CUDA context and NCCL buffers live in the last 10%), ``does not fit`` above.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError
from ..kv_budget import kv_bytes_per_token, request_peak_tokens
from ..model.hf import ModelArch, expected_shapes
from ..policies import PolicyConfig
from .validate import VOCAB_DIVISOR, padded_seq_len, resolve_arch, validate_layout

GIB = 2**30
GB = 10**9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
DEFAULT_MEM_FRACTION_STATIC = 0.85
TIGHT = 0.90  # above this fraction of the GPU a plan is "tight"


# ------------------------------------------------------------------------------------ parameters
def hf_param_count(arch: ModelArch) -> int:
    """Parameters of the Hugging Face model (unpadded vocabulary, lm_head only when untied)."""
    return sum(math.prod(s) for s in expected_shapes(arch).values())


def padded_vocab(arch: ModelArch, tp: int, divisor: int = VOCAB_DIVISOR) -> int:
    m = divisor * tp
    return -(-arch.vocab_size // m) * m


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one GPU (one TP rank) of pipeline stage ``stage``."""

    stage: int
    layers: int
    per_layer: int
    embedding: int
    final_norm: int
    output_layer: int

    @property
    def total(self) -> int:
        return self.layers * self.per_layer + self.embedding + self.final_norm + self.output_layer


def layer_params(arch: ModelArch, tp: int) -> int:
    """One transformer layer's parameters on one TP rank (Megatron-Core local spec)."""
    D, F, d, H, Hkv = arch.hidden_size, arch.intermediate_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    qkv_rows = (H + 2 * Hkv) * d // tp
    n = 2 * D  # input_layernorm, pre_mlp_layernorm (replicated)
    n += qkv_rows * D + (qkv_rows if arch.qkv_bias else 0)
    n += D * (H * d // tp)  # linear_proj
    n += (2 * F // tp) * D + D * (F // tp)  # linear_fc1 (gate|up), linear_fc2
    if arch.arch == "qwen3":  # per-head RMSNorm on q and k (replicated)
        n += 2 * d
    return n


def stage_params(arch: ModelArch, tp: int, pp: int, vocab_divisor: int = VOCAB_DIVISOR) -> list[StageParams]:
    """Per-GPU parameter counts of every pipeline stage (TP ranks of a stage hold equal counts)."""
    per_layer = layer_params(arch, tp)
    emb = padded_vocab(arch, tp, vocab_divisor) // tp * arch.hidden_size
    out = []
    for k in range(pp):
        last = k == pp - 1
        has_output = last and (not arch.tie_word_embeddings or pp > 1)
        out.append(StageParams(stage=k, layers=arch.num_layers // pp, per_layer=per_layer,
                               embedding=emb if k == 0 else 0, final_norm=arch.hidden_size if last else 0,
                               output_layer=emb if has_output else 0))
    return out


# ------------------------------------------------------------------------------------ learner
def learner_precision(cfg) -> str:
    """``learner.precision``: ``fp32`` or ``bf16`` (bf16 parameters, fp32 main gradients and optimizer)."""
    return cfg.learner.precision


def recompute_mode(cfg) -> str | None:
    g = cfg.learner.megatron.get("recompute_granularity")
    if g not in (None, "full", "selective"):
        raise ConfigError(f"learner.megatron.recompute_granularity={g!r}: expected full, selective or unset")
    return g


def microbatches_per_step(cfg, dp: int) -> int:
    """Micro-batches one DP rank runs per optimizer step (the trainer's mini-batch split)."""
    n = cfg.rollout.num_prompts * cfg.rollout.group_size
    per_minibatch = math.ceil(n / cfg.algorithm.minibatches)
    mine = math.ceil(per_minibatch / dp)
    return max(1, math.ceil(mine / cfg.learner.micro_batch_size))


def rows_per_microbatch(cfg) -> int:
    """SMD with distillation puts the shadow and the dense copy of each trajectory in one micro-batch."""
    a = cfg.algorithm
    modes = 2 if a.correction == "smd" and a.distill.coef > 0 else 1
    return cfg.learner.micro_batch_size * modes


def layer_activation_bytes(arch: ModelArch, *, tp: int, cp: int, seq: int, rows: int, act_bytes: int,
                           backend: str, per_head_mask: bool = False, recompute: str | None = None,
                           sequence_parallel: bool = False) -> tuple[int, int]:
    """``(saved, full)`` bytes one layer keeps for backward for one micro-batch on one GPU.

    ``saved`` is what stays alive between forward and backward under ``recompute``; ``full`` is the
    same without recomputation (what a recomputed layer re-creates during its backward). The terms
    are listed in the module docstring.
    """
    D, F, d, H = arch.hidden_size, arch.intermediate_size, arch.head_dim, arch.num_heads
    Hkv_t = max(1, arch.num_kv_heads // tp)
    H_t = H // tp
    s = seq // cp  # local tokens per row
    tokens = rows * s
    sp = tp if sequence_parallel else 1
    replicated = 6 * D // sp
    if cp == 1:  # V is a view of the fused QKV output, so attention keeps all of it, plus Q and K after RoPE
        attn = ((H + 2 * arch.num_kv_heads) * d // tp) + (H_t + Hkv_t) * d
    else:  # attention keeps local Q and the all-gathered K, V (counted below); the fused output is freed
        attn = H_t * d
    split = attn + H_t * d + 5 * F // tp  # + attention output, + SwiGLU
    small = 2 * 4 + 4 * d * 4 + 4 * H_t  # two fp32 rstd, fp32 RoPE cos/sin for q and k, fp32 log-sum-exp
    dense = tokens * ((replicated + split) * act_bytes + small)
    internal = 0
    if cp > 1:
        internal += rows * seq * 2 * Hkv_t * d * act_bytes  # all-gathered K and V of the whole row
    if backend == "sdpa":
        internal += rows * s * seq * (H_t if per_head_mask else 1) * act_bytes  # dense mask, as SDPA keeps it
    full = dense + internal
    if recompute == "full":
        return tokens * D * act_bytes // sp, full  # the checkpointed layer input
    if recompute == "selective":
        return dense, full
    return full, full


def microbatch_activation_bytes(arch: ModelArch, *, stage: int, pp: int, tp: int, cp: int, seq: int, rows: int,
                                act_bytes: int, backend: str, per_head_mask: bool = False,
                                recompute: str | None = None, sequence_parallel: bool = False) -> tuple[int, int]:
    """``(saved, transient)`` bytes of one micro-batch on one GPU of pipeline stage ``stage``.

    ``saved``: ``L / pp`` layers (:func:`layer_activation_bytes`), the micro-batch's inputs (the
    int32 ``evict`` mask ``[b, L, (H_kv,) S]``, the token ids on the first stage), and on the last
    stage the final RMSNorm with the output layer's input (``3D`` per token) and the fp32
    ``exp(x - max)`` the vocab-parallel log-prob keeps (``4 V_p / t`` bytes per token).
    ``transient``: what exists only for a moment: one recomputed layer during its backward, or on
    the last stage the logits and their fp32 copy (``(a + 4) V_p / t`` per token), whichever is larger.
    """
    layers = arch.num_layers // pp
    saved, full = layer_activation_bytes(arch, tp=tp, cp=cp, seq=seq, rows=rows, act_bytes=act_bytes,
                                         backend=backend, per_head_mask=per_head_mask, recompute=recompute,
                                         sequence_parallel=sequence_parallel)
    tokens = rows * seq // cp
    total = layers * saved + rows * arch.num_layers * seq * 4 * (arch.num_kv_heads if per_head_mask else 1)
    transient = full - saved if recompute else 0
    if stage == 0:
        total += tokens * 8  # int64 token ids kept by the embedding
    if stage == pp - 1:
        Vp_t = padded_vocab(arch, tp) // tp
        total += tokens * (3 * arch.hidden_size * act_bytes // (tp if sequence_parallel else 1) + 4)
        total += tokens * 4 * Vp_t
        transient = max(transient, tokens * Vp_t * (act_bytes + 4))
    return total, transient


def learner_memory(cfg, arch: ModelArch) -> dict[str, Any]:
    r = cfg.resources
    tp, pp, cp, dp = r.tp, r.pp, r.cp, r.dp
    prec = learner_precision(cfg)
    pbytes = 4 if prec == "fp32" else 2
    opt_bytes = 8 if prec == "fp32" else 12
    recompute = recompute_mode(cfg)
    seq = padded_seq_len(cfg.model.max_seq_len, cp)
    rows = rows_per_microbatch(cfg)
    n_micro = microbatches_per_step(cfg, dp)
    sp = bool(cfg.learner.megatron.get("sequence_parallel", False))
    per_head = cfg.rollout.policy.granularity == "head" and cfg.algorithm.correction == "smd"
    kw = dict(tp=tp, cp=cp, seq=seq, rows=rows, act_bytes=pbytes, backend=cfg.learner.attention_backend,
              per_head_mask=per_head, recompute=recompute, sequence_parallel=sp)
    layer_saved, _ = layer_activation_bytes(arch, **kw)
    with_ref = cfg.algorithm.kl_coef > 0
    stages = []
    for sp_ in stage_params(arch, tp, pp):
        k = sp_.stage
        in_flight = min(pp - k, n_micro)
        mb_saved, transient = microbatch_activation_bytes(arch, stage=k, pp=pp, **kw)
        P = sp_.total
        weights, grads, optim = P * pbytes, P * 4, P * opt_bytes
        optim_resident = math.ceil(optim / dp) if cfg.learner.distributed_optimizer else optim
        acts = in_flight * mb_saved
        total = weights + grads + optim_resident + (weights if with_ref else 0) + acts + transient
        stages.append(dict(stage=k, layers=sp_.layers, params=P, weights_bytes=weights, grads_bytes=grads,
                           optimizer_bytes=optim_resident, optimizer_bytes_distributed=math.ceil(optim / dp),
                           ref_weights_bytes=weights if with_ref else 0, microbatches_in_flight=in_flight,
                           activations_bytes=acts, transient_bytes=transient, total_bytes=total))
    peak = max(stages, key=lambda st: st["total_bytes"])
    return dict(precision=prec, bytes_per_param=pbytes + 4 + opt_bytes, distributed_optimizer=cfg.learner.distributed_optimizer,
                recompute=recompute, attention_backend=cfg.learner.attention_backend, sequence_parallel=sp,
                seq_len=seq, rows_per_microbatch=rows, microbatches_per_step=n_micro,
                layer_activation_bytes=layer_saved, stages=stages, peak_stage=peak["stage"],
                per_gpu_bytes=peak["total_bytes"])


# ------------------------------------------------------------------------------------ rollout
def kv_dtype_bytes(cfg) -> int:
    """Bytes per K/V element in the rollout cache: ``rollout.kv_cache_dtype`` (FP8: one byte), else the
    model's dtype."""
    if cfg.rollout.kv_cache_dtype.startswith("fp8"):
        return 1
    return DTYPE_BYTES[cfg.model.dtype]


def rollout_memory(cfg, arch: ModelArch, learner_resident: int) -> dict[str, Any]:
    r = cfg.resources
    rt = r.rollout_tp
    gpu = int(r.gpu_memory_gb * GB)
    kvb = kv_dtype_bytes(cfg)
    per_tok = kv_bytes_per_token(arch, kvb, rt)
    weights = math.ceil(hf_param_count(arch) * DTYPE_BYTES[cfg.model.dtype] / rt)
    frac = float(cfg.sglang.get("mem_fraction_static", DEFAULT_MEM_FRACTION_STATIC))
    colocated = r.rollout_nodes == 0
    pool = int(frac * gpu) - weights - (learner_resident if colocated else 0)
    N = cfg.rollout.max_new_tokens
    P = cfg.model.max_seq_len - N
    pol = cfg.rollout.policy if cfg.algorithm.correction != "dense" else PolicyConfig()
    dense_tok = request_peak_tokens(PolicyConfig(), P, N)
    tok = request_peak_tokens(pol, P, N)
    engines = (r.rollout_nodes * r.gpus_per_node // rt) if not colocated else max(1, r.learner_world_size // rt)
    batch = cfg.rollout.num_prompts * cfg.rollout.group_size
    per_engine = math.ceil(batch / engines)
    conc_dense = max(0, pool) // (dense_tok * per_tok)
    conc = max(0, pool) // (tok * per_tok)
    used = weights + min(conc, per_engine) * tok * per_tok + (learner_resident if colocated else 0)
    if pool <= 0 or conc == 0:
        status = "does not fit"
    elif conc < per_engine:
        status = "queued"
    else:
        status = "fits"
    return dict(mode="colocated" if colocated else "disaggregated", engines=engines, engine_tp=rt,
                weights_bytes=weights, kv_dtype_bytes=kvb, kv_bytes_per_token=per_tok,
                mem_fraction_static=frac, kv_pool_bytes=pool, prompt_len=P, new_tokens=N,
                policy=pol.name, budget=pol.budget, tokens_per_request_dense=dense_tok,
                tokens_per_request=tok, bytes_per_request_dense=dense_tok * per_tok,
                bytes_per_request=tok * per_tok, concurrent_requests_dense=conc_dense,
                concurrent_requests=conc, batch_requests=batch, requests_per_engine=per_engine,
                per_gpu_bytes=used, status=status)


# ------------------------------------------------------------------------------------ the plan
def _status(used: int, gpu: int) -> str:
    if used > gpu:
        return "does not fit"
    return "tight" if used > TIGHT * gpu else "fits"


def plan(cfg) -> dict[str, Any]:
    """Memory plan of a resolved :class:`~megatron_smd.config.ExperimentConfig` (JSON-serializable).

    Raises ConfigError when the layout cannot work; a layout that does not fit is reported in
    ``learner.status`` / ``rollout.status`` and ``ok: false``.
    """
    arch, source = resolve_arch(cfg)
    validate_layout(cfg, arch)
    r = cfg.resources
    gpu = int(r.gpu_memory_gb * GB)
    learner = learner_memory(cfg, arch)
    learner["status"] = _status(learner["per_gpu_bytes"], gpu)
    peak = learner["stages"][learner["peak_stage"]]
    resident = peak["weights_bytes"] + peak["grads_bytes"] + peak["optimizer_bytes"] + peak["ref_weights_bytes"]
    rollout = rollout_memory(cfg, arch, resident)
    warnings = []
    if learner["status"] == "does not fit":
        warnings.append(f"learner needs {learner['per_gpu_bytes'] / GIB:.1f} GiB per GPU on stage "
                        f"{peak['stage']}, the GPU has {gpu / GIB:.1f} GiB: raise tp/pp/cp, enable "
                        f"learner.megatron.recompute_granularity=full, or lower learner.micro_batch_size")
    if rollout["status"] == "does not fit":
        warnings.append(f"rollout: not one request of {rollout['prompt_len']}+{rollout['new_tokens']} tokens fits "
                        f"in the KV pool ({rollout['kv_pool_bytes'] / GIB:.1f} GiB): raise rollout_tp, "
                        f"lower the policy budget or model.max_seq_len")
    elif rollout["status"] == "queued":
        warnings.append(f"rollout: {rollout['requests_per_engine']} requests per engine but "
                        f"{rollout['concurrent_requests']} fit at once; the rest queue")
    return dict(
        model=dict(source=source, path=cfg.model.path, arch=asdict(arch), hf_params=hf_param_count(arch)),
        layout=dict(tp=r.tp, pp=r.pp, cp=r.cp, dp=r.dp, learner_gpus=r.learner_world_size, nodes=r.nodes,
                    gpus_per_node=r.gpus_per_node, rollout_nodes=r.rollout_nodes, rollout_tp=r.rollout_tp,
                    gpu_memory_bytes=gpu, max_seq_len=cfg.model.max_seq_len),
        learner=learner, rollout=rollout, warnings=warnings,
        ok=learner["status"] != "does not fit" and rollout["status"] != "does not fit",
    )
