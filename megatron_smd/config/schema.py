"""The typed schema: one strict pydantic model per section of an experiment file, and
:class:`ExperimentConfig`, the whole resolved configuration of one command. Every field's
docstring is its documentation (``use_attribute_docstrings``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..policies import PolicyConfig
from ..tasks import TaskConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class TinyInitConfig(_Strict):
    """How to create the model directory when ``model.path`` does not exist (tiny presets only)."""

    arch: Literal["qwen2", "llama"] = "qwen2"
    """Architecture family written to config.json."""
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 176
    tie_word_embeddings: bool | None = None
    """None: Qwen2 ties input/output embeddings, Llama does not."""
    seed: int = 0
    """Seed of the random initialisation (the same seed always gives the same weights)."""


class ModelArchConfig(_Strict):
    """A model's architecture, copied from its public config.json: lets `smd plan` and the launch
    scripts size a job for a model whose weights are not on this machine.

    Every field is planning/launch only: a run always takes the architecture from the model
    directory's config.json, and refuses to start when a field given here disagrees with it
    (:func:`check_runnable`; `smd plan` checks the same)."""

    arch: Literal["qwen2", "llama"]
    """Planning/launch only (checked against config.json's model_type when the directory exists)."""
    vocab_size: int = Field(ge=1)
    """Planning/launch only (checked against config.json when the directory exists)."""
    hidden_size: int = Field(ge=1)
    """Planning/launch only (checked against config.json when the directory exists)."""
    intermediate_size: int = Field(ge=1)
    """Planning/launch only (checked against config.json when the directory exists)."""
    num_layers: int = Field(ge=1)
    """Planning/launch only (checked against config.json when the directory exists)."""
    num_heads: int = Field(ge=1)
    """Planning/launch only (checked against config.json when the directory exists)."""
    num_kv_heads: int = Field(ge=1)
    """Planning/launch only (checked against config.json when the directory exists)."""
    head_dim: int | None = None
    """Planning/launch only (checked against config.json when the directory exists). Default:
    hidden_size // num_heads."""
    rope_theta: float = 10000.0
    """Planning/launch only (checked against config.json when the directory exists)."""
    rms_norm_eps: float = 1e-6
    """Planning/launch only (checked against config.json when the directory exists)."""
    tie_word_embeddings: bool = False
    """Planning/launch only (checked against config.json when the directory exists)."""
    max_position_embeddings: int = 32768
    """Planning/launch only (checked against config.json when the directory exists)."""

    def to_model_arch(self):
        from ..model.hf import ModelArch

        return ModelArch(arch=self.arch, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                         intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                         num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                         head_dim=self.head_dim or self.hidden_size // self.num_heads, rope_theta=self.rope_theta,
                         rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
                         max_position_embeddings=self.max_position_embeddings)


class ModelConfig(_Strict):
    path: str
    """Hugging Face model directory (config.json, model.safetensors, tokenizer.json). Relative paths
    are resolved against the working directory."""
    init: TinyInitConfig | None = None
    """If set and ``path`` does not exist, create a tiny random model there (``smd init-model``)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the reference engine (and of replay); `smd plan` sizes the rollout's weights
    and KV cache with it. Exactness claims are stated for float32."""
    arch: ModelArchConfig | None = None
    """Architecture for planning/launching when ``path`` is not on this machine (real-model presets);
    planning/launch only, checked against the directory's config.json by every run."""
    max_seq_len: int = Field(4096, ge=1)
    """Longest prompt + completion a run may produce: `smd train`, `smd sft` and `smd rollout`
    refuse to start when the task's prompts plus ``rollout.max_new_tokens`` (SFT: plus the
    answer) could exceed it; `smd plan` sizes the learner and the rollout for it."""


class FaultConfig(_Strict):
    """How a run survives rollout-server faults (``rollout.backend: sglang``).

    A failed generate request (unreachable, reset, timed out, HTTP error) or weight sync makes the
    trainer wait for healthy servers, re-send its current weights in full, check them with the probe
    trajectory, and redo the step's rollout from the same prompts; servers that do not come back are
    left out and the others carry on (a server back later is re-admitted before a sync). The
    ``server_*`` fields are launch settings: the launchers' supervisor restarts servers that exit or
    hang (``python -m sglang_patch.supervise``)."""

    request_timeout_s: float = Field(600.0, gt=0)
    """HTTP timeout of one generate request; a server that does not answer in time counts as failed."""
    max_attempts: int = Field(4, ge=1)
    """Tries of one step's rollout, and of one weight sync, before the run stops naming the server."""
    wait_healthy_s: float = Field(900.0, gt=0, le=1500)
    """After a failure, how long to wait for at least one server's ``/health`` (a restarted server
    loads the model again first). At most 1500 s: the other learner ranks wait in a collective
    meanwhile, whose timeout is 30 minutes."""
    mask_retries: int = Field(2, ge=0)
    """Re-requests of a prompt whose returned mask fails validation (counted and logged; a sample
    with an invalid mask is never trained on)."""
    probe_atol: float | None = Field(None, gt=0)
    """Largest |log-prob difference| of the post-sync probe trajectory (server vs learner under the
    shadow mask); above it the sync counts as failed. None: 1e-4 for a float32 ``model.dtype``,
    0.25 otherwise."""
    server_max_restarts: int = Field(5, ge=0)
    """Launch only: supervisor restarts of one server within an hour before it gives up."""
    server_hang_timeout_s: float = Field(120.0, gt=0)
    """Launch only: a healthy server that answers no ``/health`` for this long is killed and restarted."""


class RolloutConfig(_Strict):
    backend: Literal["reference", "sglang"] = "reference"
    """Rollout engine. ``reference``: the pure-torch engine in this package (CPU default);
    ``sglang``: patched SGLang servers (``python -m sglang_patch.launch_server``) at ``sglang_urls``."""
    sglang_urls: list[str] = Field(default_factory=list)
    """Base URLs of the SGLang servers (or one sglang-router) for ``backend: sglang``."""
    num_prompts: int = Field(8, ge=1)
    """Prompts per rollout batch."""
    group_size: int = Field(4, ge=1)
    """Samples per prompt (GRPO group); they share one prefill of the prompt."""
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    """0 = greedy. Sampler log-probs are of the temperature-scaled distribution."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """0 = off."""
    stop_at_eos: bool = True
    """Stop a sample at the tokenizer's <eos> (which is kept as the last action)."""
    seed: int = 0
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """KV eviction policy and budget (see megatron_smd.policies)."""
    kv_growth: int = Field(16, ge=1)
    """Tokens by which a layer's cache tensors grow when full (and the slack kept after compaction)."""
    faults: FaultConfig = Field(default_factory=FaultConfig)
    """Rollout-server fault handling (``backend: sglang``)."""
    kv_cache_dtype: Literal["auto", "fp8_e4m3", "fp8_e5m2"] = "auto"
    """KV cache storage of the rollout engine. ``auto``: the model's dtype (``model.dtype``, no
    quantisation). ``fp8_e4m3`` / ``fp8_e5m2``: K and V stored in FP8 with per-layer scales, as
    SGLang's ``--kv-cache-dtype`` stores them (half the KV bytes of bf16); the rollout records the
    format and scales (``meta.json: kv_cache``) and the learner's shadow forward rounds K and V the
    same way (``algorithm.correction: smd`` then covers eviction and quantisation together). Also
    the compressed periodic eval. ``algorithm.correction: dense`` samples without it (the
    uncompressed baseline, like the eviction policy). With ``backend: sglang`` (``fp8_e5m2`` on
    CPU ``torch_native`` servers only: e4m3 and the Triton backend are refused, with the reason) the
    servers are launched with ``--kv-cache-dtype`` / ``--smd-kv-scales`` from these settings
    (``smd plan``), and the trainer refuses servers that report another cache."""
    kv_scales: str | None = None
    """FP8 only: a ``kv_scales.json`` from `smd calibrate-kv` (per-layer K and V scales and the
    fingerprint of the weights they were calibrated on, which must be the weights the run starts
    from: ``sft.out`` when ``sft.enabled``, else ``model.path``). None: scale 1.0 for every layer."""

    @model_validator(mode="after")
    def _kv_cache(self) -> RolloutConfig:
        if self.kv_cache_dtype == "auto" and self.kv_scales is not None:
            raise ValueError("kv_scales is set but kv_cache_dtype is 'auto' (no FP8 cache to scale): set "
                             "rollout.kv_cache_dtype to fp8_e4m3 / fp8_e5m2 or remove rollout.kv_scales")
        if self.kv_cache_dtype == "fp8_e4m3" and self.backend == "sglang":
            raise ValueError("kv_cache_dtype=fp8_e4m3 with backend=sglang: the patched SGLang servers serve an FP8 "
                             "cache as fp8_e5m2 on CPU (torch_native) only; SGLang 0.5.23 builds an e4m3 CPU cache "
                             "only for Intel AMX kernels, and FP8 on its Triton backend rounds the query and the "
                             "softmax weights too, which the learner does not replay. Use fp8_e5m2 or the reference "
                             "engine")
        return self


class ResourcesConfig(_Strict):
    """Where things run (kept apart from the algorithm, STYLE.md practice 6).

    The learner's world is ``tp * pp * cp * dp`` ranks; ``dp`` is derived from the number of
    learner processes. On CPU every rank is a gloo process; on GPU one rank per GPU.
    """

    tp: int = Field(1, ge=1)
    """Tensor-parallel degree of the learner."""
    pp: int = Field(1, ge=1)
    """Pipeline-parallel degree of the learner (layers must divide evenly)."""
    cp: int = Field(1, ge=1)
    """Context-parallel degree (sequence split in 2*cp chunks; lengths are padded to a multiple of 2*cp)."""
    dp: int = Field(1, ge=1)
    """Data-parallel degree of the learner."""
    nodes: int = Field(1, ge=1)
    """Planning/launch only: learner nodes (Slurm; the run itself sees only its torchrun world)."""
    gpus_per_node: int = Field(8, ge=0)
    """Planning/launch only: GPUs per node; ``launch/slurm/submit.sh`` asks Slurm for them (``--gpus-per-node``). 0 = a CPU
    cluster: no GPU is requested, the learner ranks are gloo processes spread evenly over
    ``nodes`` (``tp*pp*cp*dp`` must be a multiple of it); the rollout runs in-process, or with
    ``rollout.backend: sglang`` on patched SGLang CPU servers (``rollout_nodes`` of them, or one
    colocated on the first learner node when 0). One machine (``launch/local.sh``, ``smd train``)
    ignores it."""
    rollout_nodes: int = Field(0, ge=0)
    """Planning/launch only: nodes that run SGLang rollout servers (0 = colocated with the learner: the in-process reference
    engine, or with ``rollout.backend: sglang`` one server on the first learner node). With rollout
    nodes the launchers run `smd train` against those servers, which needs ``rollout.backend:
    sglang`` and ``sync.transport: sglang`` (`smd plan` refuses anything else)."""
    rollout_tp: int = Field(1, ge=1)
    """Planning/launch only: tensor-parallel degree of each rollout engine (SGLang ``--tp-size``).
    Must be 1: the patched SGLang server (``sglang_patch.launch_server``) refuses TP > 1 (each TP
    rank would score only its own heads; the cross-rank reduction of eviction scores is not
    built). Use more engines (one per GPU) instead."""
    gpu_memory_gb: float = Field(80.0, gt=0)
    """Planning/launch only: memory of one accelerator, for `smd plan` (80 GB H100 by default)."""
    cpu_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per process (None: torch's default), set by `smd train`, `smd sft`
    and `smd rollout`. Tiny CPU models run fastest with 1: per-op threading overhead dominates
    their small matrices. Results depend on it at fp32 rounding."""

    @field_validator("rollout_tp")
    @classmethod
    def _rollout_tp_one(cls, v: int) -> int:
        if v != 1:
            raise ValueError(
                f"{v} is not supported: the patched SGLang server refuses --tp-size > 1 (each TP rank "
                f"would score only its own KV heads; a cross-rank reduction of the eviction scores is not "
                f"built). Use resources.rollout_tp: 1 (one engine per GPU, gpus_per_node engines per node)")
        return v

    @property
    def learner_world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


class SparseRLConfig(_Strict):
    """Thresholds of Sparse-RL's correction (megatron_smd.losses.sparse_rl_filter)."""

    reject_min: float = Field(1e-3, gt=0)
    """Reject a sequence if any token's consistency ratio pi_dense_old/pi_sampler is below this."""
    reject_mean: float = Field(2.0, ge=1.0)
    """Reject a sequence if the geometric mean of its ratios leaves [1/reject_mean, reject_mean]."""
    weight_min: float = Field(0.0, ge=0)
    weight_max: float = Field(2.0, gt=0)
    """Token weights are the ratios clipped to [weight_min, weight_max]."""


class DistillConfig(_Strict):
    """SMD's distillation term between the shadow-masked and the dense policy.

    Defaults: ``sparse_to_dense`` with the ``k1`` estimator at coefficient 0.1. The RL gradient
    already moves the shadow (sampling) policy; distilling it into the dense forward keeps the
    shipped dense model consistent without pulling the RL policy back.

    Why ``k1`` and not ``k3`` for the gradient: on tokens sampled from the shadow policy, the
    gradient of ``k1 = log p_shadow - log p_dense`` with respect to the dense student is
    ``-grad log p_dense(token)``, an unbiased estimate of ``grad KL(shadow || dense)`` with no
    importance weight (it is SFT of the dense view on the sampled tokens). ``k3``'s gradient,
    ``(r - 1) grad log p_dense`` with ``r = p_dense / p_shadow``, has the same expectation but an
    unbounded weight ``r``. (Measured on the CPU comparison: SMD's gradient-norm variance 2.77 with
    k3, 2.31 with k1. Most of it is a transient either way: the distillation KL starts at ~4 nats,
    the dense view being far from the shadow policy, and falls to ~0 within the run; the early
    gradient norms reach ~15 before clipping.) ``k3`` stays available: it is the better estimator
    of the KL *value* (the mismatch metrics log both ``kl_k1`` and ``kl_k3``).
    """

    coef: float = Field(0.1, ge=0)
    """Weight of the distillation term (0 = off: SMD then trains only the shadow policy)."""
    direction: Literal["sparse_to_dense", "dense_to_sparse", "both"] = "sparse_to_dense"
    estimator: Literal["k1", "k3", "full"] = "k1"
    """``k1`` / ``k3``: per-token estimates on the sampled tokens; ``full``: the exact KL over the whole
    vocabulary from both forwards' logits, computed vocabulary-parallel under TP (each rank its columns)."""


class AlgorithmConfig(_Strict):
    """GRPO / PPO-clip and the correction mode for sparse rollouts (megatron_smd.losses)."""

    correction: Literal["dense", "naive", "tis", "sparse_rl", "smd"] = "smd"
    """How the learner treats the compressed rollout. ``dense`` turns compression off for the rollout."""
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.2, ge=0)
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    normalize_adv_std: bool = True
    """GRPO's std normalisation of group advantages (False = Dr. GRPO)."""
    epochs: int = Field(1, ge=1)
    """PPO epochs over each rollout batch."""
    minibatches: int = Field(1, ge=1)
    """Optimizer steps per epoch (the rollout batch is split into this many mini-batches)."""
    kl_coef: float = Field(0.0, ge=0)
    """KL penalty to the reference (initial) model; 0 = off (no reference forward)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    tis_cap: float = Field(2.0, gt=0)
    """C in min(pi_dense_old / pi_sampler, C) for ``tis``."""
    sparse_rl: SparseRLConfig = Field(default_factory=SparseRLConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


class LearnerConfig(_Strict):
    """Megatron-Core learner settings we own; anything else goes through ``megatron:`` untouched."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip (0 = off)."""
    micro_batch_size: int = Field(4, ge=1)
    attention_backend: Literal["sdpa", "flex", "te"] = "sdpa"
    """sdpa: dense mask per layer (CPU, reference); flex: FlexAttention mask_mod (GPU); te: Transformer Engine (GPU)."""
    seed: int = 1234
    precision: Literal["fp32", "bf16"] = "fp32"
    """``fp32``: the exactness setting. ``bf16``: bf16 parameters and activations, fp32 main gradients
    and fp32 optimizer state (main parameters, Adam moments); replay is exact only to bf16's floor, so
    sample in bf16 too (``model.dtype: bfloat16``)."""
    distributed_optimizer: bool = False
    """Megatron's DistributedOptimizer: fp32 main parameters and Adam state sharded over the DP ranks."""
    megatron: dict[str, Any] = Field(default_factory=dict)
    """Extra TransformerConfig fields passed through unchanged (e.g. recompute_granularity)."""


class TrainConfig(_Strict):
    steps: int = Field(20, ge=1)
    """RL steps (one rollout batch + its updates each)."""
    eval_every: int = Field(5, ge=0)
    """Greedy eval (dense and compressed) every N steps; 0 = only at the end."""
    eval_prompts: int = Field(16, ge=1)
    save_every: int = Field(10, ge=0)
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)


class SFTConfig(_Strict):
    """Supervised warm start on the task (RL on a random model has no signal)."""

    enabled: bool = True
    """Run SFT (and cache it at ``out``) when no checkpoint exists there."""
    out: str = "runs/models/tiny-qwen2-sft"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    target_reward: float = Field(1.01, ge=0)
    """Stop early once greedy eval reward reaches this (1.01 = never)."""
    eval_every: int = Field(100, ge=1)


class SyncConfig(_Strict):
    """Weight sync learner -> rollout engine (megatron_smd.sync)."""

    transport: Literal["inprocess", "broadcast", "sglang", "disk"] = "inprocess"
    """How `smd train` ships weights: ``inprocess`` (the reference engine on rank 0), ``sglang``
    (with ``rollout.backend: sglang``), ``disk`` (safetensors shards under ``dir``). ``broadcast``
    is the wire protocol of external engine receivers
    (:class:`~megatron_smd.sync.receiver.BroadcastReceiver`, the benchmarks); `smd train` has no
    such receiver and refuses it (the ``sglang`` transport drives the same broadcast through
    SGLang's ``update_weights_from_distributed``)."""
    bucket_mb: int = Field(512, ge=1)
    """Bucket size of the weight stream, in MiB."""
    verify: bool = False
    """After every sync, check per-tensor checksums (computed by the sender, compared by the engine
    before it commits; in process at TP = 1, where the sender writes the engine's own memory, the
    one checksum it takes as it writes is both) and, for the staged transports (``inprocess``, ``disk``), compare the
    engine's logits on a probe batch, computed on the staged weights, with the learner's (within
    1e-5; logged as ``sync/probe_max_abs_logit_diff``); fail loudly on a mismatch. With
    ``sglang`` the probe is the sampled-and-replayed trajectory the trainer checks after every
    sync (``sync/probe_max_abs_logprob_diff``)."""
    dir: str | None = None
    """Directory for the ``disk`` transport."""


class LoggingConfig(_Strict):
    tensorboard: bool = True
    mask_images: int = Field(2, ge=0)
    """Shadow masks rendered per log step (first layer and last layer of the first N trajectories)."""
    sample_text: int = Field(2, ge=0)
    progress_bar: bool = True
    term_grad_norms: bool = False
    """Also log the gradient norm of each loss term per step (``train/grad_norm_ppo``,
    ``train/grad_norm_distill``, ``train/grad_norm_kl_ref``): one extra backward per term and
    micro-batch, the update itself unchanged. The norms are of this rank's parameters (exact on a
    single-rank learner, as in ``smd experiment compare``, which turns it on for its smd runs)."""


class ExperimentConfig(_Strict):
    """The whole resolved configuration of one command."""

    preset: str | None = None
    """Model preset this experiment was layered on (informational once resolved)."""
    model: ModelConfig
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    sglang: dict[str, Any] = Field(default_factory=dict)
    """Planning/launch only: arguments passed through to the SGLang servers the launchers start
    (``--key value``); `smd plan` reads ``mem_fraction_static``. ``kv_cache_dtype`` is refused here:
    the K/V format is ``rollout.kv_cache_dtype``, the one setting the engine, the learner's replay and
    the plan all read. The
    patched server needs, on GPU, ``attention_backend: triton``, ``page_size: 1``,
    ``disable_overlap_schedule: true`` and ``cuda_graph_backend_decode: disabled`` (the presets
    carry them; `smd plan` checks the servers' command line with the patch's own rules)."""
    output_dir: str = "runs/default"
    """Where commands write their outputs unless told otherwise."""

    @field_validator("sglang")
    @classmethod
    def _no_server_kv_format(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "kv_cache_dtype" in v or "kv-cache-dtype" in v:
            raise ValueError("kv_cache_dtype is not a server pass-through: the learner would not know the servers "
                             "round K/V and could not replay it. Set rollout.kv_cache_dtype (the reference engine "
                             "stores FP8 and the learner replays it; the patched SGLang server's FP8 path is not "
                             "wired yet)")
        return v
