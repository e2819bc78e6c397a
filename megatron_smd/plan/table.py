"""``smd plan``'s table: :func:`plan`'s result for a person to read."""

from __future__ import annotations

from typing import Any

from .memory import GIB


def _gib(x: int) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_plan(d: dict[str, Any]) -> str:
    """A human-readable table of :func:`plan`'s result."""
    a, lay, ln, ro = d["model"]["arch"], d["layout"], d["learner"], d["rollout"]
    out = [
        f"model   {d['model']['path']}  ({a['arch']}, {d['model']['hf_params'] / 1e9:.2f} B params, "
        f"L={a['num_layers']} D={a['hidden_size']} H={a['num_heads']}/{a['num_kv_heads']} d={a['head_dim']}; "
        f"from {d['model']['source']})",
        (f"layout  tp={lay['tp']} pp={lay['pp']} cp={lay['cp']} dp={lay['dp']} = {lay['learner_gpus']} learner GPUs "
         f"on {lay['nodes']} node(s); rollout: {ro['engines']} engine(s) x tp={ro['engine_tp']} ({ro['mode']}); "
         f"GPU {lay['gpu_memory_bytes'] / GIB:.1f} GiB") if lay["gpus_per_node"] else
        (f"layout  tp={lay['tp']} pp={lay['pp']} cp={lay['cp']} dp={lay['dp']} = {lay['learner_gpus']} learner ranks "
         f"on {lay['nodes']} CPU node(s) (gpus_per_node=0: gloo processes, the figures below are per process, "
         f"checked against resources.gpu_memory_gb = {lay['gpu_memory_bytes'] / GIB:.1f} GiB); rollout in-process"),
        "",
        f"learner ({ln['precision']}, {ln['bytes_per_param']} B/param, recompute={ln['recompute'] or 'off'}, "
        f"attention={ln['attention_backend']}, seq {ln['seq_len']}, {ln['rows_per_microbatch']} rows x "
        f"{ln['microbatches_per_step']} micro-batches per step)",
    ]
    for st in ln["stages"]:
        out.append(f"  stage {st['stage']} ({st['layers']} layers, {st['params'] / 1e6:.1f} M params/GPU, "
                   f"{st['microbatches_in_flight']} micro-batch(es) in flight)")
        out.append(f"    weights {_gib(st['weights_bytes'])}   grads {_gib(st['grads_bytes'])}   "
                   f"optimizer {_gib(st['optimizer_bytes'])} "
                   f"(distributed: {st['optimizer_bytes_distributed'] / GIB:.2f})")
        extra = f"   reference model {_gib(st['ref_weights_bytes'])}" if st["ref_weights_bytes"] else ""
        out.append(f"    activations {_gib(st['activations_bytes'])}   transient {_gib(st['transient_bytes'])}{extra}")
        out.append(f"    total {_gib(st['total_bytes'])}")
    out.append(f"  per GPU {_gib(ln['per_gpu_bytes'])}  -> {ln['status']}")
    out += [
        "",
        f"rollout (policy {ro['policy']}" + (f", budget {ro['budget']}" if ro["budget"] else "")
        + f"; prompt {ro['prompt_len']} + {ro['new_tokens']} new tokens; KV {ro['kv_dtype_bytes']} B/elem)",
        f"  weights {_gib(ro['weights_bytes'])} per GPU; KV {ro['kv_bytes_per_token'] / 2**10:.1f} KiB per token; "
        f"pool {_gib(max(0, ro['kv_pool_bytes']))} (mem_fraction_static {ro['mem_fraction_static']})",
        f"  per request: dense {ro['tokens_per_request_dense']} tokens = "
        f"{ro['bytes_per_request_dense'] / 2**20:.1f} MiB; {ro['policy']} {ro['tokens_per_request']} tokens = "
        f"{ro['bytes_per_request'] / 2**20:.1f} MiB",
        f"  concurrent requests per engine: dense {ro['concurrent_requests_dense']}, {ro['policy']} "
        f"{ro['concurrent_requests']} (batch needs {ro['requests_per_engine']})  -> {ro['status']}",
    ]
    for w in d["warnings"]:
        out.append(f"warning: {w}")
    out.append("ok" if d["ok"] else "NOT OK: does not fit on the declared GPU")
    return "\n".join(out)
