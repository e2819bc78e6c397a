"""`smd bench sync`: seconds and GB/s of a weight sync per transport, next to a plain copy of the bytes.

Run it::

    smd bench sync --json                    # CPU; about a minute

Two models, each built on the fly with random weights (nothing is downloaded):

* ``tiny``: the tiny Qwen2 of ``configs/models/tiny-qwen2.yaml`` (fp32, ~0.1 M parameters), where
  per-bucket and per-message overheads dominate;
* ``qwen2.5-0.5b``: the Qwen2.5-0.5B layout of ``configs/models/qwen2.5-0.5b.yaml`` (bf16, 494 M
  parameters, 0.99 GB), where bandwidth dominates.

For each: a Megatron learner (TP=1, PP=1, one gloo rank on the CPU) syncs into a reference engine
through ``inprocess`` (engine in this process; also with ``verify`` = per-tensor checksums),
``disk`` (safetensors shards under a temporary directory, then the engine reloads them) and
``broadcast`` (a reference engine in a second process receiving over a gloo weight-update group).
The figure that matters is ``ratio_vs_copy``: the sync's seconds over the seconds of one
``Tensor.copy_`` of the same number of bytes, measured in the same run (best of five), i.e. how
many memory copies a sync costs. A staged sync into an engine needs at least two (into the shadow,
then into the engine) plus the conversion. ``peak_live_bytes`` is the sender's extra memory
(:class:`~megatron_smd.sync.reshard.LiveBytes`).

CPU only: on a GPU machine run it with ``CUDA_VISIBLE_DEVICES=`` (GPU syncs go to SGLang, see the
``sglang`` transport and its GPU test).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import tempfile
import time
from pathlib import Path

import torch

from .model.hf import ModelArch

MiB = 1 << 20

#: Qwen2.5-0.5B (configs/models/qwen2.5-0.5b.yaml, from the model's config.json).
QWEN25_05B = ModelArch(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                       num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=32768)


def _tiny_arch() -> ModelArch:
    from .model.tiny import tiny_arch
    from .model.tokenizer import CharTokenizer

    tok = CharTokenizer.build()
    return tiny_arch("qwen2", vocab_size=tok.vocab_size, hidden_size=64, num_layers=4, num_heads=4,
                     num_kv_heads=2, intermediate_size=176, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_seconds(nbytes: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds of one ``dst.copy_(src)`` of ``nbytes`` bytes (the baseline)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def _empty_engine(arch: ModelArch, dtype: torch.dtype):
    """A reference engine with uninitialised weights (every one is overwritten by the sync)."""
    from .model.transformer import RefTransformer
    from .rollout.engine import ReferenceEngine

    with torch.device("meta"):
        model = RefTransformer(arch).to(dtype)
    model = model.to_empty(device="cpu")
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return ReferenceEngine(model)


def _receiver_main(arch: ModelArch, dtype: torch.dtype, port: int, q) -> None:
    """The broadcast receiver process: an engine that takes syncs until the learner says stop."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from .sync import BroadcastReceiver

    try:
        engine = _empty_engine(arch, dtype)
        rx = BroadcastReceiver(engine, master_address="127.0.0.1", master_port=port, num_stages=1, rank=1,
                               world_size=2, timeout_s=600)
        q.put(("ok", rx.serve()))
        rx.close()
    except BaseException as e:  # reported by the parent
        q.put(("error", f"{type(e).__name__}: {e}"))


def _random_fill(model: torch.nn.Module, seed: int) -> None:
    """Random weights, fast: every parameter is a slice of one ``N(0, 0.02)`` vector as long as the
    largest parameter (drawing 0.5 B normals one by one costs seconds; the sync does not care)."""
    params = list(model.parameters())
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(max(p.numel() for p in params), generator=g) * 0.02).to(params[0].dtype)
    with torch.no_grad():
        for p in params:
            p.copy_(base[:p.numel()].view_as(p))


def _bench_model(label: str, arch: ModelArch, dtype: torch.dtype, layout, *, bucket_mb: int, repeats: int,
                 transports: tuple[str, ...], seed: int) -> dict:
    from .learner.model import build_gpt_model
    from .sync import BroadcastTransport, DiskTransport, InProcessTransport, WeightSync

    t0 = time.perf_counter()
    model = build_gpt_model(arch, params_dtype=dtype, perform_initialization=False)
    _random_fill(model, seed)
    build_s = time.perf_counter() - t0
    engine = _empty_engine(arch, dtype)
    out: dict = {"arch": arch.arch, "dtype": str(dtype).removeprefix("torch."),
                 "params": sum(p.numel() for p in model.parameters()), "bucket_mb": bucket_mb,
                 "build_seconds": round(build_s, 2), "transports": {}}

    copies = [_copy_seconds(sum(p.numel() * p.element_size() for p in model.parameters()))]

    def run(name: str, ws: WeightSync, n: int) -> None:
        best = None
        for k in range(n):
            rep = ws.sync(k + 1)
            if best is None or rep.seconds < best.seconds:
                best = rep
        out["transports"][name] = {"seconds": best.seconds, "gb_per_s": best.gb_per_s, "buckets": best.buckets,
                                   "tensors": best.tensors, "peak_live_bytes": best.peak_live_bytes,
                                   "verified_checksums": best.verified_checksums}
        out.setdefault("bytes", best.bytes)
        copies.append(_copy_seconds(best.bytes))

    kw = dict(bucket_bytes=bucket_mb * MiB)
    if "inprocess" in transports:
        run("inprocess", WeightSync(model, layout, arch, InProcessTransport(engine), **kw), repeats)
        run("inprocess+verify", WeightSync(model, layout, arch, InProcessTransport(engine), verify=True, **kw), 1)
    if "disk" in transports:
        with tempfile.TemporaryDirectory(prefix="smd-bench-sync-") as d:
            run("disk", WeightSync(model, layout, arch, DiskTransport(Path(d), engine=engine, keep=1), **kw), repeats)
    if "broadcast" in transports:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = _free_port()
        proc = ctx.Process(target=_receiver_main, args=(arch, dtype, port, q), daemon=True)
        proc.start()
        ws = WeightSync(model, layout, arch, BroadcastTransport("127.0.0.1", port, 1, backend="gloo", timeout_s=600),
                        **kw)
        try:
            run("broadcast", ws, repeats)
        finally:
            ws.close()
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
        try:
            status, detail = q.get(timeout=5)
        except queue.Empty:
            status, detail = "error", "the receiver process exited without a report"
        if status != "ok":
            out["transports"]["broadcast"]["receiver_error"] = detail
    copies.append(_copy_seconds(out["bytes"]))
    copy_s = min(copies[1:])  # taken between the transports: same conditions as the syncs
    out["copy"] = {"seconds": copy_s, "gb_per_s": out["bytes"] / copy_s / 1e9}
    for r in out["transports"].values():
        r["ratio_vs_copy"] = r["seconds"] / copy_s
    del model, engine
    return out


def bench_sync(*, large: bool = True, bucket_mb: int = 512, repeats: int = 2,
               transports: tuple[str, ...] = ("inprocess", "disk", "broadcast"), seed: int = 0) -> dict:
    """Run the sync benchmark (see the module docstring); returns a JSON-serialisable dict.

    Args:
        large: also run the Qwen2.5-0.5B layout (the tiny model always runs).
        bucket_mb: bucket size (``sync.bucket_mb``).
        repeats: syncs per transport; the best is reported (``inprocess+verify`` runs once).
        transports: which of ``inprocess``, ``disk``, ``broadcast``.
    """
    from .errors import SMDError
    from .parallel.layout import ParallelLayout

    if torch.cuda.is_available():
        raise SMDError("smd bench sync measures the CPU path: run it with CUDA_VISIBLE_DEVICES= "
                       "(GPU syncs go to SGLang through the sglang transport)")
    if torch.distributed.is_initialized():
        raise SMDError("smd bench sync starts its own one-rank process group; run it in a fresh process")
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}  # restored below: later runs in this process must not
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    layout = ParallelLayout(world_size=1)                  # mistake themselves for torchrun ranks
    try:
        layout.initialize(seed=seed)
    except BaseException:
        _restore_env(saved)
        raise
    t0 = time.perf_counter()
    try:
        res = {"device": "cpu", "threads": torch.get_num_threads(), "layout": "tp=1 pp=1 (one gloo rank)",
               "models": {}}
        models = [("tiny", _tiny_arch(), torch.float32)]
        if large:
            models.append(("qwen2.5-0.5b", QWEN25_05B, torch.bfloat16))
        for label, arch, dtype in models:
            res["models"][label] = _bench_model(label, arch, dtype, layout, bucket_mb=bucket_mb, repeats=repeats,
                                                transports=transports, seed=seed)
        res["seconds"] = time.perf_counter() - t0
        return res
    finally:
        layout.destroy()
        _restore_env(saved)


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def format_sync_bench(res: dict) -> str:
    """A human-readable table of :func:`bench_sync`'s result."""
    lines = []
    for label, m in res["models"].items():
        lines.append(f"{label}: {m['params'] / 1e6:.1f} M params, {m['bytes'] / 1e9:.3f} GB {m['dtype']}, "
                     f"buckets of {m['bucket_mb']} MiB; plain copy {m['copy']['seconds'] * 1e3:.1f} ms "
                     f"({m['copy']['gb_per_s']:.2f} GB/s)")
        for name, r in m["transports"].items():
            lines.append(f"  {name:18s} {r['seconds'] * 1e3:9.1f} ms  {r['gb_per_s']:7.3f} GB/s  "
                         f"{r['ratio_vs_copy']:7.1f}x copy  {r['buckets']:4d} buckets  "
                         f"peak {r['peak_live_bytes'] / MiB:8.1f} MiB")
    return "\n".join(lines)
