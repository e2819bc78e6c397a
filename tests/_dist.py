"""Run a function in N fresh processes that form a gloo process group (multi-rank CPU tests).

    results = run_distributed(worker, world_size=2, args=(arg1, arg2))

``worker(rank, world_size, *args)`` runs in a *spawned* process (a clean interpreter: Megatron's
global state and the CPU shim never leak into the pytest process) with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set for ``torch.distributed`` on a free local
port, CUDA hidden (``CUDA_VISIBLE_DEVICES=""``: CPU + gloo even on a GPU machine) and one intra-op
thread (the tests run on 2 cores). The worker sets up its own process group
(usually through ``ParallelLayout.initialize``). Its return value comes back through
``torch.save`` (tensors included) as ``results[rank]``. An exception in any rank fails the call
with that rank's traceback; a rank that hangs or dies is reported after ``timeout`` seconds.

The worker must be a module-level function of an importable module (spawn pickles it by name).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world_size: int, port: int, args: Sequence[Any], q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      # CPU ranks even on a GPU machine: N ranks must not contend for one device,
                      # and the gloo/CPU-shim path is what these tests exercise.
                      CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    try:
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, including assertion errors, to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:
                pass


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 180.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, tuple(args), q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = q.get(timeout=timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                raise AssertionError(f"run_distributed: no result within {timeout}s "
                                     f"(ranks exited without reporting: {dead})") from None
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # the other ranks are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("run_distributed: a rank failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
