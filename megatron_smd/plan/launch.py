"""What the launch scripts need from a config (``python -m megatron_smd.plan --shell``): the layout
variables and the SGLang servers' command line, validated before any node is touched."""

from __future__ import annotations

import json
import shlex
from typing import Any

from ..errors import ConfigError
from ..policies import PolicyConfig
from .validate import resolve_arch, validate_layout


def _sglang_flags(extra: dict[str, Any]) -> list[str]:
    """``{key: value}`` -> SGLang flags: ``--key value``; True -> ``--key``; False / None -> omitted."""
    out: list[str] = []
    for k, v in extra.items():
        flag = "--" + str(k).replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        elif isinstance(v, (list, tuple)):
            out += [flag, *(str(x) for x in v)]
        elif isinstance(v, dict):
            out += [flag, json.dumps(v)]
        else:
            out += [flag, str(v)]
    return out


def policy_flags(pol: PolicyConfig) -> list[str]:
    """``pol`` as ``sglang_patch.launch_server``'s ``--smd-*`` flags: every field, so a server runs
    exactly the policy of the config (the trainer checks it again against ``/server_info``)."""
    out = []
    for name, val in pol.model_dump(mode="json").items():
        if val is None:
            continue
        out += ["--smd-policy" if name == "name" else "--smd-" + name.replace("_", "-"), str(val)]
    return out


def kv_cache_flags(cfg) -> list[str]:
    """The servers' KV cache flags from ``rollout.kv_cache_dtype`` / ``rollout.kv_scales`` (none for
    ``algorithm.correction: dense``, which samples the model's dtype, like the trainer's check)."""
    r = cfg.rollout
    if cfg.algorithm.correction == "dense" or r.kv_cache_dtype == "auto":
        return []
    return ["--kv-cache-dtype", r.kv_cache_dtype, *(["--smd-kv-scales", r.kv_scales] if r.kv_scales else [])]


def check_server_args(argv: list[str], *, cpu: bool) -> None:
    """The servers' command line against the eviction patch's own rules
    (:func:`sglang_patch.launch_server.parse_args`): a setting the patch would refuse at start-up
    (attention backend, page size, overlap scheduler, CUDA graphs, TP, ...) stops the launch here,
    before any node is touched. CPU servers get ``--device cpu`` (which supplies the CPU settings)."""
    from sglang_patch.launch_server import parse_args

    try:
        parse_args(list(argv) + (["--device", "cpu"] if cpu else []), env={})
    except ConfigError as e:
        raise ConfigError(f"the SGLang servers would refuse this config ({e}); set the flags under the config's "
                          f"sglang: section (attention_backend: triton, page_size: 1, disable_overlap_schedule: "
                          f"true, cuda_graph_backend_decode: disabled on GPU)") from None


def launch_vars(cfg) -> dict[str, Any]:
    """What the launch scripts need, validated (the layout is checked before any GPU is touched).

    Scalars are strings; ``SMD_SGLANG_ARGS`` is a list (the server's arguments after the module,
    without ``--host`` / ``--port``, which the launcher sets per engine).
    """
    arch, _ = resolve_arch(cfg)
    validate_layout(cfg, arch)
    r = cfg.resources
    pol = cfg.rollout.policy if cfg.algorithm.correction != "dense" else PolicyConfig()
    sgl = ["--model-path", cfg.model.path, "--tp-size", str(r.rollout_tp), *_sglang_flags(cfg.sglang),
           *policy_flags(pol), *kv_cache_flags(cfg)]
    if r.rollout_nodes > 0 or cfg.rollout.backend == "sglang":
        check_server_args(sgl, cpu=r.gpus_per_node == 0)
    return dict(
        SMD_TP=r.tp, SMD_PP=r.pp, SMD_CP=r.cp, SMD_DP=r.dp, SMD_LEARNER_WORLD=r.learner_world_size,
        SMD_NODES=r.nodes, SMD_GPUS_PER_NODE=r.gpus_per_node,
        # one node: the whole learner; several: one rank per GPU, or (a CPU cluster) the world split evenly
        SMD_NPROC_PER_NODE=r.learner_world_size // r.nodes if r.nodes == 1 or r.gpus_per_node == 0
        else r.gpus_per_node,
        SMD_ROLLOUT_NODES=r.rollout_nodes, SMD_ROLLOUT_TP=r.rollout_tp,
        # engines per rollout node: gpus_per_node / rollout_tp; one CPU server on a CPU cluster
        SMD_ENGINES_PER_NODE=(r.gpus_per_node // r.rollout_tp if r.gpus_per_node else 1) if r.rollout_nodes else 0,
        SMD_MODEL_PATH=cfg.model.path, SMD_OUTPUT_DIR=cfg.output_dir, SMD_SGLANG_ARGS=sgl,
        SMD_ROLLOUT_BACKEND=cfg.rollout.backend,
        # every server runs under python -m sglang_patch.supervise (restart on exit or hang)
        SMD_SUPERVISE_ARGS=["--max-restarts", str(cfg.rollout.faults.server_max_restarts),
                            "--hang-timeout-s", str(cfg.rollout.faults.server_hang_timeout_s)],
    )


def format_shell(v: dict[str, Any]) -> str:
    """Bash assignments (``eval``-safe: every value is quoted with :func:`shlex.quote`)."""
    lines = []
    for k, val in v.items():
        if isinstance(val, list):
            lines.append(f"{k}=(" + " ".join(shlex.quote(str(x)) for x in val) + ")")
        else:
            lines.append(f"{k}={shlex.quote(str(val))}")
    return "\n".join(lines)
