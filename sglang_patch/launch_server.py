"""Launch an SGLang server with per-layer KV eviction and shadow-mask export.

Run (CPU: everything else is set for you)::

    python -m sglang_patch.launch_server --model-path MODEL --device cpu \\
        --smd-policy h2o --smd-budget 64 --port 30000

Run (GPU)::

    python -m sglang_patch.launch_server --model-path MODEL --attention-backend triton \\
        --page-size 1 --disable-overlap-schedule --cuda-graph-backend-decode disabled \\
        --smd-policy h2o --smd-budget 1024 [--smd-window 32 --smd-sinks 4 ...] [other SGLang args]

Our flags (``--smd-*``, the fields of :class:`megatron_smd.policies.PolicyConfig`) are consumed
here; everything else is passed to SGLang's own ``launch_server``. Before SGLang starts, the
settings are checked and anything the patch cannot honour is refused with the reason, never
silently run dense:

* ``--attention-backend`` (and ``--decode-/--prefill-attention-backend`` if given) must be
  ``triton`` (GPU) or ``torch_native`` (CPU);
* ``--page-size 1`` (a paged allocator frees whole pages);
* ``--disable-overlap-schedule`` (frees happen after the forward, at a synced point);
* decode CUDA graphs off (``--cuda-graph-backend-decode disabled``): captured graphs bake the KV
  index buffers' shapes;
* the radix cache on, and built by this patch (``--radix-cache-backend smd``, added for you; any
  other backend is refused: the hooks act on SGLang's ``RadixCache``);
* no ``--enable-mixed-chunk`` (decode tokens in an extend batch would skip the eviction hook),
  ``--tp-size 1``, no speculative decoding, no hierarchical cache, no deterministic inference
  (it seeds every sample of a group alike), ``--smd-granularity layer``;
* a budget the policy accepts (e.g. H2O/SnapKV/R-KV need ``budget > window``);
* ``SGLANG_RETURN_ORIGINAL_LOGPROB`` unset (the returned log-probs must be the temperature-scaled
  distribution the learner uses).

``--device cpu`` adds what SGLang's CPU path needs and the user would otherwise have to know:
``--attention-backend torch_native``, ``--page-size 1``, ``--disable-overlap-schedule``, CUDA graphs
off, ``--max-total-tokens`` (:data:`CPU_MAX_TOTAL_TOKENS` unless given: SGLang would otherwise
size the pool from host memory, gigabytes and a minute of start-up), ``--dtype float32`` (SGLang's
``auto`` would run an fp32 checkpoint and its KV cache in fp16), ``SGLANG_USE_CPU_ENGINE=1``,
and the pure-torch stand-ins of :mod:`sglang_patch.cpu_standins` for the kernel modules SGLang
imports on CPU but the package registry does not ship (each only where the real one is missing).
A flag you give yourself is kept, then checked like any other.

FP8 KV cache (``--kv-cache-dtype fp8_e5m2``, CPU ``torch_native`` only): K and V are
stored as one byte per element with per-layer K and V scales (``--smd-kv-scales kv_scales.json``
from ``smd calibrate-kv``; unit scales without it) and
read back exactly as the learner's replay rounds them (:mod:`sglang_patch.fp8_kv`). The server
reports the cache under ``/server_info`` and the trainer refuses servers whose cache differs from
``rollout.kv_cache_dtype`` / ``rollout.kv_scales``. Refused: ``fp8_e4m3`` on CPU (SGLang 0.5.23 serves
it only with Intel AMX and its ``intel_amx`` backend, a cache layout the patch does not hook), FP8 on
the Triton backend (its GQA decode also rounds the query and the softmax weights, which the learner
does not replay) and ``--quantization-param-path`` (one merged scale per layer).

Memory: with an evicting policy SGLang's token pool is replaced by the per-layer pool of
:mod:`sglang_patch.kv_pool`; ``--max-total-tokens`` (or SGLang's own sizing from free memory) is the
number of physical K/V slots *per layer* (the same K/V bytes as SGLang's dense pool of that many
tokens), and admission reserves what each policy holds, so more requests run at once than dense.

The policy reaches every SGLang process through the environment (:data:`patch.ENV_CONFIG`) and is
applied there by SGLang's plugin loader (``sglang.srt.plugins`` entry point
``sglang_patch.patch:plugin_entry``); the launcher refuses to start if that entry point is not
installed, and a patch that fails to apply stops the server with the reason. It also sets
``SGLANG_DISABLE_LEAN_ATTENTION=1`` (Lean decode reads ``seq_lens``, not the index lists).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from megatron_smd.errors import ConfigError, SMDError
from megatron_smd.policies import PolicyConfig

from .eviction import EvictionConfigError, check_policy_supported
from .fp8_kv import ENV_KV, SUPPORTED_KV_DTYPES, kv_to_env
from .patch import RADIX_BACKEND, SUPPORTED_BACKENDS

PLUGIN_NAME = "smd_eviction"
#: KV pool size (tokens) a CPU launch gets unless ``--max-total-tokens`` is given.
CPU_MAX_TOTAL_TOKENS = 16384


def _smd_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--smd-policy", required=True, choices=["none", "streaming", "h2o", "snapkv", "rkv"])
    p.add_argument("--smd-budget", type=int)
    p.add_argument("--smd-window", type=int)
    p.add_argument("--smd-sinks", type=int)
    p.add_argument("--smd-pool-kernel", type=int)
    p.add_argument("--smd-pooling", choices=["max", "avg"])
    p.add_argument("--smd-buffer", type=int)
    p.add_argument("--smd-rkv-lambda", type=float)
    p.add_argument("--smd-granularity", choices=["layer", "head"])
    p.add_argument("--smd-kv-scales", help="FP8 KV cache: per-layer K/V scales (kv_scales.json from smd calibrate-kv); "
                                           "without it an FP8 cache has unit scales")
    return p


def _sglang_view_parser() -> argparse.ArgumentParser:
    """The few SGLang flags we must see (SGLang parses them again itself)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--max-total-tokens", type=int)
    p.add_argument("--radix-cache-backend")
    p.add_argument("--enable-mixed-chunk", action="store_true")
    p.add_argument("--enable-deterministic-inference", action="store_true")
    p.add_argument("--attention-backend")
    p.add_argument("--decode-attention-backend")
    p.add_argument("--prefill-attention-backend")
    p.add_argument("--page-size", type=int)
    p.add_argument("--disable-overlap-schedule", action="store_true")
    p.add_argument("--disable-decode-cuda-graph", action="store_true")
    p.add_argument("--disable-cuda-graph", action="store_true")  # deprecated spelling SGLang still maps
    p.add_argument("--cuda-graph-backend-decode")
    p.add_argument("--cuda-graph-backend-prefill")
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--tp-size", "--tp", type=int, default=1)
    p.add_argument("--speculative-algorithm")
    p.add_argument("--enable-hierarchical-cache", action="store_true")
    p.add_argument("--sleep-on-idle", action="store_true")
    p.add_argument("--model-path")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization-param-path")
    return p


def cpu_defaults(sglang_argv: Sequence[str]) -> list[str]:
    """The flags a ``--device cpu`` launch needs that ``sglang_argv`` does not give itself."""
    sg, _ = _sglang_view_parser().parse_known_args(list(sglang_argv))
    add: list[str] = []
    if sg.attention_backend is None and sg.decode_attention_backend is None:
        add += ["--attention-backend", "torch_native"]
    if sg.page_size is None:
        add += ["--page-size", "1"]
    if not sg.disable_overlap_schedule:
        add += ["--disable-overlap-schedule"]
    if sg.cuda_graph_backend_decode is None and not (sg.disable_cuda_graph or sg.disable_decode_cuda_graph):
        add += ["--cuda-graph-backend-decode", "disabled"]
    if sg.cuda_graph_backend_prefill is None and not sg.disable_cuda_graph:
        add += ["--cuda-graph-backend-prefill", "disabled"]
    if sg.max_total_tokens is None:
        add += ["--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS)]
    if sg.dtype is None:
        add += ["--dtype", "float32"]  # SGLang's "auto" runs an fp32 checkpoint (and its KV) in fp16
    if not sg.sleep_on_idle:
        # an idle scheduler otherwise busy-polls its sockets: one core per server at 100%, which on a
        # laptop-sized CPU starves the server that has work (and every other process)
        add += ["--sleep-on-idle"]
    return add


def parse_args(argv: Sequence[str], env: dict | None = None) -> tuple[PolicyConfig, list[str]]:
    """Split ``argv`` into our policy and SGLang's arguments, refusing unsupported settings.

    Returns ``(policy, sglang_argv)``: ``sglang_argv`` has the CPU defaults added for
    ``--device cpu`` and ``--radix-cache-backend smd``. Raises :class:`EvictionConfigError` (a
    ``ConfigError``) listing every problem, each naming the flag.
    """
    env = os.environ if env is None else env
    ours, rest = _smd_parser().parse_known_args(list(argv))
    fields = {k[len("smd_"):]: v for k, v in vars(ours).items() if v is not None and k != "smd_kv_scales"}
    fields["name"] = fields.pop("policy")
    try:
        policy = PolicyConfig(**fields)
    except ValidationError as e:
        msgs = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise EvictionConfigError(f"--smd-* flags: {msgs}") from None
    errs: list[str] = []
    try:
        check_policy_supported(policy)
    except EvictionConfigError as e:
        errs.append(str(e))
    sg, _ = _sglang_view_parser().parse_known_args(rest)
    if sg.device == "cpu":
        rest = rest + cpu_defaults(rest)
        sg, _ = _sglang_view_parser().parse_known_args(rest)
    backends = ", ".join(SUPPORTED_BACKENDS)
    for flag, val in (("--attention-backend", sg.attention_backend),
                      ("--decode-attention-backend", sg.decode_attention_backend),
                      ("--prefill-attention-backend", sg.prefill_attention_backend)):
        if flag == "--attention-backend" and val is None and sg.decode_attention_backend is None:
            errs.append(f"--attention-backend must be given explicitly (supported: {backends}; "
                        f"--device cpu picks torch_native); SGLang's automatic choice is FA3/FlashInfer, "
                        f"which this patch does not support")
        elif val is not None and val not in SUPPORTED_BACKENDS:
            errs.append(f"{flag} {val} is not supported by smd eviction (supported: {backends}): the patch "
                        f"hands Triton's decode per-layer kv_indptr/kv_indices and torch_native's decode "
                        f"per-layer slot tables; FA3 and FlashInfer are not built")
    if sg.page_size != 1:
        errs.append(f"--page-size must be 1 (got {sg.page_size}): a paged allocator frees whole pages, "
                    f"so a single evicted token could not return its slot")
    if not sg.disable_overlap_schedule:
        errs.append("--disable-overlap-schedule is required: evicted slots are freed after the decode "
                    "forward finished; the overlap scheduler runs the next forward meanwhile")
    graph_off = sg.disable_decode_cuda_graph or sg.disable_cuda_graph or sg.cuda_graph_backend_decode == "disabled"
    if not graph_off:
        errs.append("--cuda-graph-backend-decode disabled is required: CUDA graph decode is not supported "
                    "(captured graphs bake the KV index buffers' shapes; per-layer lists change every step)")
    if sg.disable_radix_cache:
        errs.append("--disable-radix-cache is not supported: GRPO samples share their prompt through "
                    "the radix cache, which the patch keeps tree-owned")
    if sg.radix_cache_backend is not None and sg.radix_cache_backend != RADIX_BACKEND:
        errs.append(f"--radix-cache-backend {sg.radix_cache_backend} is not supported: the eviction hooks "
                    f"act on SGLang's RadixCache, which the patch's own backend ({RADIX_BACKEND!r}, "
                    f"selected for you) builds; the default UnifiedRadixCache and others are not hooked")
    if sg.enable_mixed_chunk:
        errs.append("--enable-mixed-chunk is not supported: decode tokens mixed into an extend batch go "
                    "through the prefill path and would skip the per-layer eviction hook")
    if sg.enable_deterministic_inference:
        errs.append("--enable-deterministic-inference is not supported: SGLang then seeds every sample of "
                    "a parallel-sampling group with the same seed, so a GRPO group's samples are identical")
    if sg.tp_size != 1:
        errs.append(f"--tp-size {sg.tp_size} is not supported (need 1): each TP rank scores only its "
                    f"heads, and a cross-rank reduction of the scores is not built")
    if sg.speculative_algorithm:
        errs.append(f"--speculative-algorithm {sg.speculative_algorithm} is not supported")
    if sg.enable_hierarchical_cache:
        errs.append("--enable-hierarchical-cache is not supported (host copies would outlive freed slots)")
    errs += _kv_cache_errors(sg, ours.smd_kv_scales)
    if env.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
        errs.append("SGLANG_RETURN_ORIGINAL_LOGPROB must be unset: the trajectory's log-probs are the "
                    "temperature-scaled distribution the learner uses")
    if errs:
        raise EvictionConfigError("refusing to start SGLang with smd eviction:\n  - " + "\n  - ".join(errs))
    if sg.radix_cache_backend is None:
        rest = rest + ["--radix-cache-backend", RADIX_BACKEND]
    return policy, rest


def _kv_cache_errors(sg: argparse.Namespace, kv_scales: str | None) -> list[str]:
    """What the FP8 KV cache flags ask that the patch cannot honour (:mod:`sglang_patch.fp8_kv`)."""
    errs = []
    dt = sg.kv_cache_dtype
    if dt not in SUPPORTED_KV_DTYPES:
        errs.append(f"--kv-cache-dtype {dt} is not supported (supported: {', '.join(SUPPORTED_KV_DTYPES)}): the "
                    f"learner replays only the FP8 formats it can round the same way")
        return errs
    if dt == "auto":
        if kv_scales is not None:
            errs.append("--smd-kv-scales is set but --kv-cache-dtype is auto (no FP8 cache to scale)")
        return errs
    backends = {b for b in (sg.attention_backend, sg.decode_attention_backend, sg.prefill_attention_backend) if b}
    if dt == "fp8_e4m3" and sg.device == "cpu":
        errs.append("--kv-cache-dtype fp8_e4m3 on CPU is not supported: SGLang 0.5.23 serves an e4m3 KV cache on "
                    "CPU only with Intel AMX and its intel_amx attention backend (a separate cache layout the patch "
                    "does not hook); use --kv-cache-dtype fp8_e5m2 on CPU")
    if backends - {"torch_native"}:
        errs.append(f"--kv-cache-dtype {dt} with --attention-backend {'/'.join(sorted(backends - {'torch_native'}))} is "
                    f"not supported: Triton's GQA decode also rounds the query and the softmax weights to FP8 and "
                    f"its extend reads the chunk's own K/V unrounded, which the learner does not replay (FP8 runs on "
                    f"the CPU torch_native backend)")
    if sg.quantization_param_path is not None:
        errs.append("--quantization-param-path is not supported: it loads one scale per layer for K and V together "
                    "(fp8_e4m3 only); give the calibrated per-layer K and V scales with --smd-kv-scales")
    return errs


def server_kv_cache(argv: Sequence[str]):
    """The FP8 KV cache a server started with ``argv`` stores (a
    :class:`~megatron_smd.quant.cache.RolloutKV`), or None for ``--kv-cache-dtype auto``.

    ``--smd-kv-scales``: the file's format, layer count and FP8 format are checked; without it,
    unit scales. Errors name the flag and the file. The server does not compare the file's
    ``weights.fingerprint`` with ``--model-path``: a trainer starts servers from ``model.path`` and
    then syncs its own starting weights (e.g. an SFT warm start) into them, so the trainer checks the
    scales against those weights, and every trajectory carries the fingerprint to the learner."""
    from megatron_smd.model.hf import read_arch
    from megatron_smd.quant.cache import load_rollout_kv

    ours, rest = _smd_parser().parse_known_args(list(argv))
    sg, _ = _sglang_view_parser().parse_known_args(rest)
    if sg.kv_cache_dtype == "auto":
        return None
    if sg.model_path is None:
        raise EvictionConfigError("--kv-cache-dtype: needs --model-path (the layer count and the weights the "
                                  "scales belong to)")
    try:
        num_layers = read_arch(sg.model_path).num_layers
        return load_rollout_kv(sg.kv_cache_dtype, ours.smd_kv_scales, num_layers)
    except (SMDError, OSError, ValueError) as e:
        raise EvictionConfigError(f"--smd-kv-scales / --kv-cache-dtype: {e}") from None


def plugin_installed() -> bool:
    """Whether SGLang's plugin loader will find :func:`sglang_patch.patch.plugin_entry`."""
    from importlib.metadata import entry_points

    return any(ep.name == PLUGIN_NAME and ep.value == "sglang_patch.patch:plugin_entry"
               for ep in entry_points(group="sglang.srt.plugins"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        policy, rest = parse_args(argv)
        kv = server_kv_cache(argv)
        from .version import check_sglang_version

        check_sglang_version()
        if not plugin_installed():
            raise EvictionConfigError(
                "the sglang_patch plugin entry point is not installed (pyproject.toml: "
                '[project.entry-points."sglang.srt.plugins"] smd_eviction = '
                '"sglang_patch.patch:plugin_entry"; then pip install -e .): without it SGLang\'s '
                "scheduler process would run dense")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from . import patch

    if _sglang_view_parser().parse_known_args(rest)[0].device == "cpu":
        from .cpu_standins import prepare_cpu_environment

        prepare_cpu_environment(os.environ)  # before anything imports SGLang, in every process
    os.environ[patch.ENV_CONFIG] = json.dumps(policy.model_dump(mode="json"))
    if kv is not None:
        os.environ[ENV_KV] = kv_to_env(kv)
    else:
        os.environ.pop(ENV_KV, None)
    os.environ.setdefault("SGLANG_DISABLE_LEAN_ATTENTION", "1")
    patch.apply()  # this process too (the engine), before SGLang reads anything
    from sglang.srt.server_args import prepare_server_args

    from sglang.launch_server import run_server  # SGLang's own entry point

    run_server(prepare_server_args(rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
