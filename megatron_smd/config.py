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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    scripts size a job for a model whose weights are not on this machine."""

    arch: Literal["qwen2", "llama"]
    vocab_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int | None = None
    """Default: hidden_size // num_heads."""
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

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
    """Compute dtype of the reference engine. Exactness claims are stated for float32."""
    arch: ModelArchConfig | None = None
    """Architecture for planning/launching when ``path`` is not on this machine (real-model presets)."""
    max_seq_len: int = Field(4096, ge=1)
    """Longest prompt + completion the learner is sized for (`smd plan`, micro-batch padding)."""


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
    """Learner nodes (Slurm)."""
    gpus_per_node: int = Field(8, ge=0)
    """GPUs per node; ``launch/slurm/submit.sh`` asks Slurm for them (``--gpus-per-node``). 0 = a CPU
    cluster: no GPU is requested, the learner ranks are gloo processes spread evenly over
    ``nodes`` (``tp*pp*cp*dp`` must be a multiple of it); the rollout runs in-process, or with
    ``rollout.backend: sglang`` on patched SGLang CPU servers (``rollout_nodes`` of them, or one
    colocated on the first learner node when 0). One machine (``launch/local.sh``, ``smd train``)
    ignores it."""
    rollout_nodes: int = Field(0, ge=0)
    """Nodes that run SGLang rollout servers (0 = colocated with the learner: the in-process reference
    engine, or with ``rollout.backend: sglang`` one server on the first learner node)."""
    rollout_tp: int = Field(1, ge=1)
    """Tensor-parallel degree of each rollout engine (SGLang --tp)."""
    gpu_memory_gb: float = Field(80.0, gt=0)
    """Memory of one accelerator, for `smd plan` (80 GB H100 by default)."""
    cpu_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per process (None: torch's default). Tiny CPU models run fastest with 1:
    per-op threading overhead dominates their small matrices. Results depend on it at fp32 rounding."""

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
    bucket_mb: int = Field(512, ge=1)
    verify: bool = False
    """After a sync, check per-tensor checksums (or probe logits) and fail loudly on mismatch."""
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
    """Arguments passed through to SGLang servers unchanged (``--key value``)."""
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
