"""Configuration: typed pydantic models are the source of truth, YAML is their serialized form.

Three layers, later wins:

1. a model preset (``configs/models/*.yaml``), named by the experiment's ``preset:`` key (a path
   relative to the experiment file, or a bare name looked up in ``configs/models/``);
2. the experiment file (``configs/*.yaml``);
3. ``key=value`` overrides from the command line (values parsed as YAML: ``rollout.policy.budget=64``,
   ``rollout.policy.name=h2o``, ``task.num_pairs=[1,2]``).

Unknown keys and wrong types are errors that name the dotted key and the layer (file or
``command line``) that set it. Cross-field constraints (a policy budget smaller than its sinks plus
window, ...) are checked here too, at config time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .policies import PolicyConfig
from .tasks import TaskConfig

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


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
        from .model.hf import ModelArch

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
    before it commits) and, for the staged transports (``inprocess``, ``disk``), compare the
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
    (``--key value``); `smd plan` reads ``mem_fraction_static`` and ``kv_cache_dtype``. The
    patched server needs, on GPU, ``attention_backend: triton``, ``page_size: 1``,
    ``disable_overlap_schedule: true`` and ``cuda_graph_backend_decode: disabled`` (the presets
    carry them; `smd plan` checks the servers' command line with the patch's own rules)."""
    output_dir: str = "runs/default"
    """Where commands write their outputs unless told otherwise."""


# ---------------------------------------------------------------------------------------- loading
class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` / ``3E4`` as floats (YAML 1.1 wants ``1.0e-5``, and a
    learning rate silently parsed as a string is a classic config trap)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, src: str, sources: dict[str, str], prefix: str = "") -> dict:
    out = dict(base)
    for k, v in top.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, src, sources, key + ".")
        else:
            out[k] = v
            _mark(v, key, src, sources)
    return out


def _mark(v: Any, key: str, src: str, sources: dict[str, str]) -> None:
    sources[key] = src
    if isinstance(v, dict):
        for k2, v2 in v.items():
            _mark(v2, f"{key}.{k2}", src, sources)


def _resolve_preset(name: str, exp_path: Path | None) -> Path:
    cands = []
    if exp_path is not None:
        cands.append((exp_path.parent / name))
    cands += [Path(name), REPO_CONFIGS / "models" / name, REPO_CONFIGS / "models" / f"{name}.yaml"]
    for c in cands:
        if c.is_file():
            return c
    raise ConfigError(f"{exp_path or 'command line'}: preset {name!r} not found (looked in {[str(c) for c in cands]})")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} must look like key=value (e.g. rollout.policy.budget=64)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: override {item!r} has an empty key")
    try:
        val = _yaml_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: override {key}: value {raw!r} is not valid YAML ({e})") from None
    return key, val


def _nest(key: str, val: Any) -> dict:
    out: Any = val
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                schema: type[BaseModel] = ExperimentConfig) -> BaseModel:
    """Load and validate the three layers. Raises ConfigError naming the dotted key and its source."""
    sources: dict[str, str] = {}
    data: dict = {}
    exp_path = Path(path) if path is not None else None
    exp = _read_yaml(exp_path) if exp_path is not None else {}
    preset = exp.get("preset")
    for item in overrides or []:
        k, v = parse_override(item)
        if k == "preset":
            preset = v
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{exp_path}: preset must be a string, got {preset!r}")
        ppath = _resolve_preset(preset, exp_path)
        pdata = _read_yaml(ppath)
        if "preset" in pdata:
            raise ConfigError(f"{ppath}: a model preset cannot itself name a preset")
        data = _merge(data, pdata, str(ppath), sources)
    data = _merge(data, exp, str(exp_path), sources)
    for item in overrides or []:
        k, v = parse_override(item)
        data = _merge(data, _nest(k, v), "command line", sources)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, sources, str(exp_path) if exp_path else "command line")) from None


def _format_errors(e: ValidationError, sources: dict[str, str], default_src: str) -> str:
    lines = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
        # pydantic puts union/tagged branch names in loc; keep only real field names
        dotted = ".".join(p for p in loc if not p[0].isupper())
        src = default_src
        probe = dotted
        while probe:
            if probe in sources:
                src = sources[probe]
                break
            probe = probe.rpartition(".")[0]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{src}: {dotted or '<top level>'}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def dump_config(cfg: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), next to a command's outputs."""
    from .rollout.io import _atomic_write_bytes

    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    _atomic_write_bytes(Path(path), text.encode())


# ---------------------------------------------------------------------------- what every field does
RUN = "run"
"""The field changes what a run computes or writes (rollouts, updates, logs, checkpoints)."""
PLAN = "plan"
"""Planning/launch only: read by `smd plan` and the launch scripts, never by a run (the field's
docstring says "Planning/launch only")."""

#: Every field of :class:`ExperimentConfig` (dotted, leaves; a ``dict`` passthrough is one entry)
#: -> its class and what it reaches. ``tests/test_settings.py`` checks that this covers the schema
#: exactly, that planning/launch-only fields say so in their docstrings, and that every field is
#: seen to take effect: a run field by changing it and comparing runs bit for bit (rollout tensors,
#: TensorBoard scalars, weights or written files), a planning field by changing `smd plan`'s
#: result or the launchers' variables.
SETTINGS: dict[str, tuple[str, str]] = {
    "preset": (RUN, "loading: the model preset layered under the experiment"),
    "model.path": (RUN, "weights and tokenizer of every engine and learner"),
    **{f"model.init.{k}": (RUN, "the tiny model created when model.path is missing")
       for k in ("arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                 "tie_word_embeddings", "seed")},
    "model.dtype": (RUN, "the reference engine's compute dtype; smd plan"),
    **{f"model.arch.{k}": (PLAN, "smd plan / launchers; checked against config.json by every run")
       for k in ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                 "max_position_embeddings")},
    "model.max_seq_len": (RUN, "refuses runs whose sequences could be longer; smd plan"),
    **{f"task.{k}": (RUN, "prompts, answers and rewards")
       for k in ("name", "num_pairs", "num_queries", "seed", "key_digits", "value_digits", "modulus", "max_depth",
                 "literal_prob")},
    "rollout.backend": (RUN, "the rollout engine"),
    "rollout.sglang_urls": (RUN, "the servers the sglang engine and transport talk to"),
    **{f"rollout.{k}": (RUN, "rollout tensors")
       for k in ("num_prompts", "group_size", "max_new_tokens", "temperature", "top_p", "top_k", "seed")},
    "rollout.stop_at_eos": (RUN, "rollout tensors and the periodic evals"),
    "rollout.kv_growth": (RUN, "KV statistics of the rollout and of the periodic evals"),
    **{f"rollout.faults.{k}": (RUN, "retries against failing rollout servers (backend sglang)")
       for k in ("request_timeout_s", "max_attempts", "wait_healthy_s", "mask_retries", "probe_atol")},
    **{f"rollout.faults.{k}": (PLAN, "the launchers' server supervisor")
       for k in ("server_max_restarts", "server_hang_timeout_s")},
    **{f"rollout.policy.{k}": (RUN, "eviction in the rollout (shadow masks), the compressed eval, the servers' --smd-*")
       for k in ("name", "budget", "granularity", "sinks", "window", "pool_kernel", "pooling", "buffer", "rkv_lambda")},
    **{f"algorithm.{k}": (RUN, "the learner's loss")
       for k in ("correction", "clip_low", "clip_high", "aggregation", "normalize_adv_std", "epochs", "minibatches",
                 "kl_coef", "kl_estimator", "tis_cap", "sparse_rl.reject_min", "sparse_rl.reject_mean",
                 "sparse_rl.weight_min", "sparse_rl.weight_max", "distill.coef", "distill.direction",
                 "distill.estimator")},
    **{f"learner.{k}": (RUN, "the learner's optimizer and forward (and SFT's)")
       for k in ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip", "micro_batch_size",
                 "attention_backend", "seed", "precision", "distributed_optimizer", "megatron")},
    **{f"resources.{k}": (RUN, "the learner's process layout (torchrun world)") for k in ("tp", "pp", "cp", "dp")},
    **{f"resources.{k}": (PLAN, "smd plan / launchers")
       for k in ("nodes", "gpus_per_node", "rollout_nodes", "rollout_tp", "gpu_memory_gb")},
    "resources.cpu_threads": (RUN, "torch intra-op threads of smd train / sft / rollout"),
    "train.steps": (RUN, "the RL loop"),
    "train.eval_every": (RUN, "when the periodic evals run"),
    "train.eval_prompts": (RUN, "the periodic evals"),
    "train.save_every": (RUN, "when checkpoints are written"),
    "train.keep_checkpoints": (RUN, "which checkpoints are kept"),
    **{f"sft.{k}": (RUN, "the SFT warm start") for k in ("enabled", "out", "steps", "batch_size", "lr", "warmup_steps",
                                                         "target_reward", "eval_every")},
    "sync.transport": (RUN, "the weight sync"),
    "sync.bucket_mb": (RUN, "the weight sync's buckets"),
    "sync.verify": (RUN, "the weight sync's checks"),
    "sync.dir": (RUN, "where the disk transport writes"),
    "logging.tensorboard": (RUN, "TensorBoard events"),
    "logging.mask_images": (RUN, "TensorBoard images"),
    "logging.sample_text": (RUN, "TensorBoard text"),
    "logging.progress_bar": (RUN, "the progress bar"),
    "sglang": (PLAN, "the SGLang servers' command line (launchers); smd plan"),
    "output_dir": (RUN, "where a run writes"),
}


def schema_fields(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf fields of ``model`` -> their pydantic ``FieldInfo`` (nested models flattened)."""
    import typing

    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        sub = [a for a in (f.annotation, *typing.get_args(f.annotation))
               if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub:
            out.update(schema_fields(sub[0], f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = f
    return out


# ---------------------------------------------------------------------------- run-time checks
#: learner.megatron keys a run sets itself from the model directory, the layout or the learner's
#: precision: a passthrough value would silently disagree with the weights the engine runs.
MEGATRON_OWNED = {
    "num_layers": "config.json", "hidden_size": "config.json", "ffn_hidden_size": "config.json",
    "num_attention_heads": "config.json", "num_query_groups": "config.json", "kv_channels": "config.json",
    "layernorm_epsilon": "config.json (rms_norm_eps)", "add_qkv_bias": "config.json",
    "normalization": "the architecture", "gated_linear_unit": "the architecture",
    "activation_func": "the architecture", "params_dtype": "learner.precision (fp32 or bf16)",
    "pipeline_dtype": "learner.precision (fp32 or bf16)", "fp16": "learner.precision (fp32 or bf16)",
    "bf16": "learner.precision (fp32 or bf16)",
    "tensor_model_parallel_size": "resources.tp", "pipeline_model_parallel_size": "resources.pp",
    "context_parallel_size": "resources.cp", "calculate_per_token_loss": "the learner (losses arrive normalised)",
    "core_attention": "learner.attention_backend", "pre_process": "the pipeline layout",
    "post_process": "the pipeline layout",
}


def check_megatron_passthrough(lc: LearnerConfig) -> None:
    """``learner.megatron`` must name ``TransformerConfig`` fields the run does not set itself,
    with values YAML can express (a dtype or a function cannot come from a config file)."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    for k, v in lc.megatron.items():
        key = f"learner.megatron.{k}"
        if k in MEGATRON_OWNED:
            raise ConfigError(f"{key}={v!r}: set by the run from {MEGATRON_OWNED[k]}, not passed through to "
                              f"Megatron; remove it")
        if k in ("recompute", "vocab_divisor"):  # build_gpt_model's own switches
            if not isinstance(v, bool if k == "recompute" else int) or (k == "vocab_divisor" and v < 1):
                raise ConfigError(f"{key}={v!r}: expected {'true/false' if k == 'recompute' else 'a positive integer'}")
            continue
        if k not in fields:
            raise ConfigError(f"{key}: not a field of Megatron-Core's TransformerConfig (a typo?)")
        t = str(fields[k].type)
        if "dtype" in t or "Callable" in t:
            raise ConfigError(f"{key}={v!r}: a TransformerConfig field of type {t} cannot come from a config file")


def check_runnable(cfg: ExperimentConfig, command: str, model_dir: str | os.PathLike | None = None) -> None:
    """Refuse, before anything is built, a config whose settings a run would not honour.

    ``command``: ``train``, ``sft`` or ``rollout``. ``model_dir``: the model directory the run
    uses (its config.json is compared with ``model.arch``). Raises :class:`ConfigError` naming
    the key, why, and what to use instead.
    """
    from .tasks import make_task

    if command == "train":
        if cfg.sync.transport == "broadcast":
            raise ConfigError(
                "sync.transport=broadcast: smd train has no broadcast receiver (that transport feeds external "
                "engine receivers, megatron_smd.sync.receiver). Use sync.transport=inprocess for the reference "
                "engine, or rollout.backend=sglang with sync.transport=sglang (the same broadcast, through "
                "SGLang's update_weights_from_distributed)")
        if cfg.rollout.backend == "sglang" and cfg.sync.transport != "sglang":
            raise ConfigError(f"rollout.backend=sglang needs sync.transport=sglang (the servers get the learner's "
                              f"weights after every step), got {cfg.sync.transport!r}")
        if cfg.sync.transport == "sglang" and cfg.rollout.backend != "sglang":
            raise ConfigError("sync.transport=sglang feeds SGLang servers, but rollout.backend="
                              f"{cfg.rollout.backend}: set rollout.backend=sglang, or use sync.transport=inprocess")
    if command in ("train", "sft"):
        check_megatron_passthrough(cfg.learner)
    task = make_task(cfg.task)
    prompt = task.approx_prompt_tokens()
    if command == "sft":
        need, what = prompt + task.max_answer_tokens(), "the answer and <eos>"
    else:
        need, what = prompt + cfg.rollout.max_new_tokens, f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
    if need > cfg.model.max_seq_len:
        raise ConfigError(
            f"model.max_seq_len={cfg.model.max_seq_len}: the task's prompts ({prompt} tokens at most) plus {what} "
            f"need up to {need} tokens; raise model.max_seq_len to {need}, or shorten the task (task.num_pairs) "
            f"or the completion")
    if model_dir is not None and cfg.model.arch is not None:
        check_arch_matches(cfg, model_dir)


def check_arch_matches(cfg: ExperimentConfig, model_dir: str | os.PathLike):
    """``model.arch`` against ``model_dir/config.json``, every field; returns the directory's arch."""
    from .model.hf import read_arch

    disk = read_arch(model_dir)
    if cfg.model.arch is None:
        return disk
    declared = cfg.model.arch.to_model_arch()
    names = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
             "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")
    bad = [f"{f}: model.arch={getattr(declared, f)!r}, config.json={getattr(disk, f)!r}"
           for f in names if getattr(declared, f) != getattr(disk, f)]
    if bad:
        raise ConfigError(f"model.arch disagrees with {Path(model_dir) / 'config.json'}: " + "; ".join(bad)
                          + " (the run uses config.json; fix model.arch or remove it)")
    return disk


def apply_cpu_threads(cfg: ExperimentConfig) -> None:
    """``resources.cpu_threads``: torch's intra-op threads for this process."""
    if cfg.resources.cpu_threads is not None:
        import torch

        torch.set_num_threads(cfg.resources.cpu_threads)
