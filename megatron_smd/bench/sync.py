"""`smd bench sync`: a weight sync per transport against its own floor, measured side by side.

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

Each transport is measured against **its own floor**, in the same run, interleaved with it (floor,
sync, floor, sync, ...). The first :data:`WARMUP` (2) syncs, which allocate what a transport keeps
across syncs (the in-process engine's staging slots, the broadcast receiver's two sets of
buffers, the disk transport's spare snapshot), are not measured (the first one is reported as
``first_seconds``), nor is the floor's own first run:

=====================  ===========================================================================
``inprocess[+verify]`` one ``Tensor.copy_`` of the same number of bytes (best of three, buffers
                       touched beforehand): the sync copies every byte once, converting it into
                       the engine's kept staging arena (:mod:`~megatron_smd.sync.arena`), plus the
                       checks; the commit adopts the arena (no copy).
``broadcast``          a raw ``torch.distributed.broadcast`` of the same number of bytes over the
                       same weight-update group to the same receiver process, into a buffer it
                       keeps (:meth:`~megatron_smd.sync.transports.BroadcastTransport.wire_seconds`).
``disk``               a raw ``safetensors.torch.save_file`` + ``load_file`` of the same tensors
                       (the engine's HF state dict) in the same directory. ``load_file`` maps the
                       file (the transport's reload does too) without reading it; the reload
                       copies it into the engine. The transport also fsyncs its shards before
                       publishing the snapshot, which the raw floor does not: ``floor_durable``
                       is the same floor with an fsync of the file. The floor writes a new file
                       every time, as ``save_file`` does; the transport overwrites the files of
                       its spare snapshot, two shards at a time on two writer threads, and the
                       engine reads each shard as soon as it is written (see
                       :class:`~megatron_smd.sync.DiskTransport`).
=====================  ===========================================================================

Every pair gives a ratio (sync seconds / floor seconds); the figure is the **median** of those
ratios (``floor.ratio``, 9 pairs), with the medians of both timings beside it. Floor and sync run
with the same thread budget: the process's torch threads (``threads``, the machine's cores by
default) for the floor; for the sync one torch thread plus one helper thread that shares the
work (:mod:`~megatron_smd.sync.share`: the in-process plan's chunks, large tensors' pieces), and
for ``broadcast`` the same two processes and gloo group as the raw broadcast. The ``disk`` floor,
``save_file``, writes on one thread (it has no other way); the transport writes two shards at
once. Nothing left over by one measurement is charged to
the next: the disk floor's deletion of its file and the disk runs' write-back are flushed
(``os.sync``, not timed) before the next measurement; ``method`` in the output says so, and
``load_average`` is the machine's load when the run started. ``ratio_vs_copy`` (median
sync seconds over the median plain-copy seconds) is reported for every transport too.
``phases`` are the per-phase medians in seconds (see
:class:`~megatron_smd.sync.weight_sync.SyncReport`; ``engine.*`` run inside the sender's
``send`` / ``finish`` for ``inprocess``), and ``phases_vs_copy`` the same in plain copies.
``peak_live_bytes`` is the sender's extra memory (:class:`~megatron_smd.sync.reshard.LiveBytes`).

CPU only: on a GPU machine run it with ``CUDA_VISIBLE_DEVICES=`` (GPU syncs go to SGLang, see the
``sglang`` transport and its GPU test).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..model.hf import ModelArch
from ..parallel.layout import free_port

MiB = 1 << 20
#: How the figures are taken (also in the output).
METHOD = ("per transport: 2 warm-up syncs, then (floor, sync) pairs interleaved; figure = median of the per-pair "
          "ratios. Same thread budget: the floor with torch's threads (the 'threads' field), the sync with one torch "
          "thread plus one helper thread sharing the work (disk: two writer threads; save_file has one). "
          "Floors: plain Tensor.copy_ of the same bytes "
          "(best of 3); raw torch.distributed.broadcast of the same bytes over the same group to the same receiver; "
          "raw safetensors save_file + load_file of the same tensors. The disk floor's file deletion and the disk "
          "runs' write-back are flushed (os.sync, untimed) so that no measurement pays for the previous one's.")
#: Syncs per transport before the measured ones (see ``_bench_model.run``).
WARMUP = 2

#: Qwen2.5-0.5B (configs/models/qwen2.5-0.5b.yaml, from the model's config.json).
QWEN25_05B = ModelArch(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                       num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=32768)


def _tiny_arch() -> ModelArch:
    from ..model.tiny import tiny_arch
    from ..model.tokenizer import CharTokenizer

    tok = CharTokenizer.build()
    return tiny_arch("qwen2", vocab_size=tok.vocab_size, hidden_size=64, num_layers=4, num_heads=4,
                     num_kv_heads=2, intermediate_size=176, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)


class _Copier:
    """The plain-copy floor: ``dst.copy_(src)`` of ``nbytes`` bytes, both touched beforehand."""

    def __init__(self, nbytes: int):
        self.src = torch.ones(nbytes, dtype=torch.uint8)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # first touch of the pages

    def seconds(self, repeats: int = 3) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.dst.copy_(self.src)
            best = min(best, time.perf_counter() - t0)
        return best


def _raw_safetensors_seconds(tensors: dict[str, torch.Tensor], directory: str) -> tuple[float, float, float]:
    """The disk floor: seconds of ``save_file``, of an fsync of that file, and of ``load_file``."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "raw-floor.safetensors")
    t0 = time.perf_counter()
    save_file(tensors, path)
    t1 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    t2 = time.perf_counter()
    loaded = load_file(path)
    t3 = time.perf_counter()
    del loaded
    os.unlink(path)
    # Not timed: the file system's own work for the unlink (freeing, trimming a model's worth of
    # blocks at the next journal commit) is done here, not charged to the sync measured next.
    os.sync()
    return t1 - t0, t2 - t1, t3 - t2


def _empty_engine(arch: ModelArch, dtype: torch.dtype):
    """A reference engine with uninitialised weights (every one is overwritten by the sync)."""
    from ..model.transformer import RefTransformer
    from ..rollout.engine import ReferenceEngine

    with torch.device("meta"):
        model = RefTransformer(arch).to(dtype)
    model = model.to_empty(device="cpu")
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return ReferenceEngine(model)


def _receiver_main(arch: ModelArch, dtype: torch.dtype, port: int, q) -> None:
    """The broadcast receiver process: an engine that takes syncs until the learner says stop."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from ..sync import BroadcastReceiver

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


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _summary(reports: list, floors: list[float], copies: list[float], floor_what: str, *, first) -> dict:
    """One transport's figures from interleaved (sync report, floor seconds, copy seconds) triples."""
    secs = [r.seconds for r in reports]
    ratios = [s / f for s, f in zip(secs, floors)]
    copy_s = _median(copies)
    keys = sorted({k for r in reports for k in r.phases})
    phases = {k: _median([r.phases.get(k, 0.0) for r in reports]) for k in keys}
    last = reports[-1]
    return {"seconds": _median(secs), "gb_per_s": last.bytes / _median(secs) / 1e9, "first_seconds": first,
            "buckets": last.buckets, "tensors": last.tensors, "peak_live_bytes": last.peak_live_bytes,
            "verified_checksums": last.verified_checksums, "repeats": len(reports),
            "ratio_vs_copy": _median(secs) / copy_s, "copy_seconds": copy_s,
            "floor": {"what": floor_what, "seconds": _median(floors), "ratio": _median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios)},
            "phases": phases, "phases_vs_copy": {k: v / copy_s for k, v in phases.items()}}


def _bench_model(label: str, arch: ModelArch, dtype: torch.dtype, layout, *, bucket_mb: int, repeats: int,
                 transports: tuple[str, ...], seed: int) -> dict:
    from ..learner.model import build_gpt_model
    from ..sync import BroadcastTransport, DiskTransport, InProcessTransport, WeightSync

    t0 = time.perf_counter()
    model = build_gpt_model(arch, params_dtype=dtype, perform_initialization=False)
    _random_fill(model, seed)
    build_s = time.perf_counter() - t0
    engine = _empty_engine(arch, dtype)
    out: dict = {"arch": arch.arch, "dtype": str(dtype).removeprefix("torch."),
                 "params": sum(p.numel() for p in model.parameters()), "bucket_mb": bucket_mb,
                 "build_seconds": round(build_s, 2), "transports": {}}
    # the bytes a sync sends: the HF tensors (a tied output layer once)
    hf = {n: p.detach() for n, p in engine.model.named_parameters()}
    nbytes = sum(t.numel() * t.element_size() for t in hf.values())
    out["bytes"] = nbytes
    copier = _Copier(nbytes)
    kw = dict(bucket_bytes=bucket_mb * MiB)

    def run(name: str, ws: WeightSync, floor, what: str, what2: str = "") -> None:
        """``floor()`` -> seconds, or a tuple whose first item is the floor and second the
        alternative floor ``what2`` describes (disk: without and with fsync)."""
        # The first syncs allocate what a transport keeps: the in-process engine's staging slots,
        # the broadcast receiver's two sets of buffers (its commit alternates between them), the
        # disk transport's spare snapshot (the third sync is the first to overwrite one).
        first = ws.sync(1).seconds
        for v in range(2, WARMUP + 1):
            ws.sync(v)
        floor()  # the floor's own first run (its buffers, the receiver's) is not measured either
        reports, floors, floors2, copies = [], [], [], []
        for k in range(repeats):
            f = floor()
            floors.append(f[0] if isinstance(f, tuple) else f)
            if isinstance(f, tuple):
                floors2.append(f[1])
            copies.append(copier.seconds())
            reports.append(ws.sync(WARMUP + 1 + k))
        res = _summary(reports, floors, copies, what, first=first)
        if floors2:
            ratios = [r.seconds / f for r, f in zip(reports, floors2)]
            res["floor_durable"] = {"what": what2, "seconds": _median(floors2), "ratio": _median(ratios),
                                    "ratio_min": min(ratios), "ratio_max": max(ratios)}
        out["transports"][name] = res

    copy_what = "plain Tensor.copy_ of the same bytes (best of 3), same run, interleaved"
    if "inprocess" in transports:
        tr = InProcessTransport(engine)
        run("inprocess", WeightSync(model, layout, arch, tr, **kw), copier.seconds, copy_what)
        run("inprocess+verify", WeightSync(model, layout, arch, tr, verify=True, **kw), copier.seconds, copy_what)
        del tr
    if "disk" in transports:
        with tempfile.TemporaryDirectory(prefix="smd-bench-sync-") as d:
            ws = WeightSync(model, layout, arch, DiskTransport(Path(d) / "sync", engine=engine, keep=1), **kw)

            def disk_floor() -> tuple[float, float]:
                ws.transport.wait()  # the last sync's background deletion must not slow the floor down
                save, fsync, load = _raw_safetensors_seconds(hf, d)
                return save + load, save + fsync + load

            run("disk", ws, disk_floor,
                "raw safetensors save_file + load_file of the same tensors (no fsync), same directory, interleaved",
                what2="the same with an fsync of the file between save and load (the transport makes its "
                      "snapshot durable before publishing it)")
            ws.close()  # waits for the background deletion of the last old snapshot
        os.sync()  # the disk runs' write-back and trims are not left to the next transport's measurements
    if "broadcast" in transports:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = free_port()
        proc = ctx.Process(target=_receiver_main, args=(arch, dtype, port, q), daemon=True)
        proc.start()
        tr = BroadcastTransport("127.0.0.1", port, 1, backend="gloo", timeout_s=600)
        ws = WeightSync(model, layout, arch, tr, **kw)
        try:
            run("broadcast", ws, lambda: min(tr.wire_seconds(nbytes, 1)),
                "raw torch.distributed.broadcast of the same bytes over the same gloo group to the same receiver, "
                "interleaved")
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
    out["copy"] = {"seconds": copier.seconds(), "gb_per_s": nbytes / copier.seconds() / 1e9}
    # Every closure above has run by now; pyflakes, reading this del, reports their `hf` / `copier` as undefined.
    del model, engine, hf, copier
    return out


def bench_sync(*, large: bool = True, bucket_mb: int = 512, repeats: int = 9,
               transports: tuple[str, ...] = ("inprocess", "disk", "broadcast"), seed: int = 0,
               quick: bool = False) -> dict:
    """Run the sync benchmark (see the module docstring); returns a JSON-serialisable dict.

    Args:
        large: also run the Qwen2.5-0.5B layout (the tiny model always runs).
        bucket_mb: bucket size (``sync.bucket_mb``).
        repeats: (floor, sync) pairs per transport, after :data:`WARMUP` syncs; medians are reported.
        transports: which of ``inprocess``, ``disk``, ``broadcast``.
        quick: the tiny model only, three pairs (a smoke run: ``smd bench all --quick``).
    """
    if quick:
        large, repeats = False, min(repeats, 3)
    from ..errors import SMDError
    from ..parallel.layout import ParallelLayout, one_process_env

    if torch.cuda.is_available():
        raise SMDError("smd bench sync measures the CPU path: run it with CUDA_VISIBLE_DEVICES= "
                       "(GPU syncs go to SGLang through the sglang transport)")
    if torch.distributed.is_initialized():
        raise SMDError("smd bench sync starts its own one-rank process group; run it in a fresh process")
    with one_process_env():  # restored afterwards: later runs in this process are no launcher ranks
        layout = ParallelLayout(world_size=1)
        layout.initialize(seed=seed)
        t0 = time.perf_counter()
        try:
            res = {"device": "cpu", "threads": torch.get_num_threads(), "layout": "tp=1 pp=1 (one gloo rank)",
                   "load_average": [round(x, 2) for x in os.getloadavg()], "method": METHOD, "models": {}}
            models = [("tiny", _tiny_arch(), torch.float32)]
            if large:
                models.append(("qwen2.5-0.5b", QWEN25_05B, torch.bfloat16))
            for label, arch, dtype in models:
                res["models"][label] = _bench_model(label, arch, dtype, layout, bucket_mb=bucket_mb,
                                                    repeats=repeats, transports=transports, seed=seed)
            res["seconds"] = time.perf_counter() - t0
            return res
        finally:
            layout.destroy()


def format_sync_bench(res: dict) -> str:
    """A human-readable table of :func:`bench_sync`'s result."""
    lines = []
    for label, m in res["models"].items():
        lines.append(f"{label}: {m['params'] / 1e6:.1f} M params, {m['bytes'] / 1e9:.3f} GB {m['dtype']}, "
                     f"buckets of {m['bucket_mb']} MiB; plain copy {m['copy']['seconds'] * 1e3:.1f} ms "
                     f"({m['copy']['gb_per_s']:.2f} GB/s)")
        for name, r in m["transports"].items():
            f = r["floor"]
            lines.append(f"  {name:17s} {r['seconds'] * 1e3:8.1f} ms  {r['ratio_vs_copy']:5.2f}x copy  "
                         f"{f['ratio']:5.2f}x its floor ({f['seconds'] * 1e3:.1f} ms: {f['what'].split(',')[0]})  "
                         f"first sync {r['first_seconds'] * 1e3:.0f} ms  peak {r['peak_live_bytes'] / MiB:.0f} MiB")
            if "floor_durable" in r:
                fd = r["floor_durable"]
                lines.append(f"      {fd['ratio']:5.2f}x the floor with fsync ({fd['seconds'] * 1e3:.1f} ms)")
            lines.append("      phases (x copy): " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_vs_copy"].items()))
    return "\n".join(lines)
