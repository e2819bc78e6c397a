"""Which model ``smd plan`` sizes (:func:`resolve_arch`) and the layouts that cannot work at all
(:func:`validate_layout`, a :class:`~megatron_smd.errors.ConfigError` naming the numbers)."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ConfigError
from ..model.hf import ModelArch, read_arch

VOCAB_DIVISOR = 128  # Megatron's make_vocab_size_divisible_by (megatron_smd.learner.convert)
# SGLang flags the launcher derives from resources / model; the passthrough may not set them.
_OWNED_SGLANG = {"model_path": "model.path", "tp_size": "resources.rollout_tp", "tp": "resources.rollout_tp",
                 "host": "the launcher", "port": "the launcher", "base_gpu_id": "the launcher"}


def resolve_arch(cfg) -> tuple[ModelArch, str]:
    """The model's architecture and where it came from.

    ``model.arch`` (real-model presets) wins when the directory is absent; when both exist they must
    agree on every field (a preset describing a different model than the directory is a bug; the
    runs refuse it too).
    A tiny preset whose directory does not exist yet is sized from its ``model.init`` section.
    """
    m = cfg.model
    path = Path(m.path)
    disk = read_arch(path) if (path / "config.json").is_file() else None
    declared = m.arch.to_model_arch() if m.arch is not None else None
    if disk is not None and declared is not None:
        from ..config import check_arch_matches

        return check_arch_matches(cfg, path), str(path / "config.json")  # every field, as the runs check it
    if disk is not None:
        return disk, str(path / "config.json")
    if declared is not None:
        return declared, "model.arch"
    if m.init is not None:
        from ..model.tiny import CharTokenizer, tiny_arch

        kw = m.init.model_dump()
        name = kw.pop("arch")
        kw.pop("seed")
        tok = CharTokenizer.build()
        return tiny_arch(name, vocab_size=tok.vocab_size, **kw), "model.init"
    raise ConfigError(f"model.path={m.path!r} does not exist and the config has no model.arch: "
                      f"`smd plan` needs the architecture (copy it from the model's config.json)")


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def padded_seq_len(max_seq_len: int, cp: int) -> int:
    """The learner's row length for a ``max_seq_len`` row: a multiple of ``lcm(2*cp, 8)``."""
    m = _lcm(2 * cp, 8)
    return -(-max_seq_len // m) * m


def validate_layout(cfg, arch: ModelArch) -> None:
    """Reject layouts that cannot work, naming the numbers (ConfigError)."""
    from ..parallel.layout import ParallelLayout

    r = cfg.resources
    try:
        layout = ParallelLayout(world_size=r.learner_world_size, tp=r.tp, pp=r.pp, cp=r.cp)
        layout.validate_model(arch)
        if r.cp > 1 and cfg.model.max_seq_len % (2 * r.cp):
            raise ConfigError(
                f"parallel layout: model.max_seq_len={cfg.model.max_seq_len} is not divisible by "
                f"2*cp = {2 * r.cp} (context parallelism cuts each row into 2*cp equal chunks)")
    except ConfigError as e:
        raise ConfigError(f"layout cannot work (resources.tp={r.tp}, pp={r.pp}, cp={r.cp}): {e}") from None
    world = r.learner_world_size
    cap = r.nodes * r.gpus_per_node
    if r.gpus_per_node == 0:  # a CPU cluster: the same number of gloo ranks on every node
        if world % r.nodes:
            raise ConfigError(
                f"layout cannot work: tp*pp*cp*dp = {r.tp}*{r.pp}*{r.cp}*{r.dp} = {world} learner ranks cannot "
                f"be spread evenly over resources.nodes={r.nodes} (resources.gpus_per_node=0: a CPU cluster "
                f"runs the same number of gloo ranks on every node)")
    elif r.nodes > 1 and world != cap:
        raise ConfigError(
            f"layout cannot work: tp*pp*cp*dp = {r.tp}*{r.pp}*{r.cp}*{r.dp} = {world} learner ranks, but "
            f"resources.nodes*gpus_per_node = {r.nodes}*{r.gpus_per_node} = {cap} GPUs: a multi-node "
            f"learner fills its nodes (set resources.dp={cap // (r.tp * r.pp * r.cp)} if that divides)")
    elif world > cap:
        raise ConfigError(
            f"layout cannot work: tp*pp*cp*dp = {r.tp}*{r.pp}*{r.cp}*{r.dp} = {world} learner ranks do not fit "
            f"on resources.nodes*gpus_per_node = {r.nodes}*{r.gpus_per_node} = {cap} GPUs")
    # rollout: in-process (backend reference, rollout_nodes 0), one CPU SGLang server colocated on
    # the first learner node (CPU cluster, backend sglang, rollout_nodes 0), or servers on the rollout nodes
    if r.rollout_nodes > 0 and cfg.rollout.backend != "sglang":
        raise ConfigError(
            f"layout cannot work: resources.rollout_nodes={r.rollout_nodes} starts SGLang servers, but "
            f"rollout.backend={cfg.rollout.backend}: smd train would sample in-process and never use them; set "
            f"rollout.backend=sglang (and sync.transport=sglang), or resources.rollout_nodes=0 (the learner "
            f"ranks run the in-process reference engine)")
    rt = r.rollout_tp
    if arch.num_heads % rt:
        raise ConfigError(f"layout cannot work: num_attention_heads={arch.num_heads} is not divisible by "
                          f"resources.rollout_tp={rt} (SGLang shards attention heads over its TP ranks)")
    if rt > arch.num_kv_heads and rt % arch.num_kv_heads:
        raise ConfigError(f"layout cannot work: resources.rollout_tp={rt} > num_key_value_heads="
                          f"{arch.num_kv_heads} needs rollout_tp to be a multiple of it (replicated KV heads)")
    if r.rollout_nodes > 0 and r.gpus_per_node > 0 and (rt > r.gpus_per_node or r.gpus_per_node % rt):
        raise ConfigError(f"layout cannot work: resources.rollout_tp={rt} must divide "
                          f"resources.gpus_per_node={r.gpus_per_node} (one engine never spans nodes)")
    if cfg.model.max_seq_len <= cfg.rollout.max_new_tokens:
        raise ConfigError(f"model.max_seq_len={cfg.model.max_seq_len} must exceed rollout.max_new_tokens="
                          f"{cfg.rollout.max_new_tokens} (it covers prompt + completion)")
    for key, owner in _OWNED_SGLANG.items():
        if key in cfg.sglang or key.replace("_", "-") in cfg.sglang:
            raise ConfigError(f"sglang.{key} is set by {owner}; remove it from the sglang passthrough")
