"""The learner <-> engine weight-update process group, and message framing on top of it.

This module builds the one process group that lives outside :class:`ParallelLayout` (the project
rule is that only the layout builds groups; this one is the exception because it does not belong
to the learner: it joins one learner rank, a pipeline stage's sender, with ranks of other programs,
the rollout engines).

:func:`init_weight_update_group` creates it exactly as SGLang's ``init_custom_process_group``
(``sglang/srt/utils/common.py``) does on the engine side when it serves
``/init_weights_update_group``: a TCP rendezvous at ``master_address:master_port`` hosted by group
rank 0 (the sender), a ``PrefixStore`` named after the group, and
``torch.distributed.distributed_c10d._new_process_group_helper`` with no parent ranks, i.e. a group
independent of each process's default world. So a learner-side group built here can talk to a real
SGLang server, and the CPU tests (gloo) exercise the same construction as production (nccl). Group
rank 0 is always the sender; engine ranks are ``1..world_size-1``.

``_new_process_group_helper`` is private torch API (also used by SGLang, OpenRLHF and slime for
the same purpose); it is isolated here.

Messages: :func:`send_object` / :func:`recv_object` carry a small pickled header (a ``uint8``
tensor preceded by its length) by broadcast (engine groups) or point-to-point (the learner's own
pipeline group, for the in-process transport); tensors follow as plain broadcasts / sends.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch
import torch.distributed as dist


def init_weight_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                             group_name: str, *, backend: str = "gloo", timeout_s: float = 300.0):
    """Create (join) the weight-update group; blocks until all ``world_size`` ranks joined.

    Args:
        master_address / master_port: where group rank 0 (the learner-side sender) hosts the
            rendezvous store.
        rank: this process's rank in the group (0 = sender, engines ``1..world_size-1``).
        group_name: unique per group (one per pipeline stage and connection: ``smd-sync-pp{stage}-<random>``).
        backend: ``"nccl"`` for GPU tensors, ``"gloo"`` for CPU tensors.
        timeout_s: how long a collective on this group may wait (a dead peer on gloo is noticed at
            once; on nccl, and for a peer that hangs, this is the bound).
    """
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    # The store directly, not torch's tcp:// rendezvous handler: under torchrun that handler makes
    # every rank (0 included) a client of the elastic agent's store (TORCHELASTIC_USE_AGENT_STORE),
    # so nobody would host this group's rendezvous and both sides would wait forever.
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      timeout=timeout)
    # Global-rank -> group-rank map that dist.broadcast(src=...) consults: the identity, as SGLang sets it.
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_group(pg) -> None:
    try:
        dist.destroy_process_group(pg)
    except Exception:  # a group whose peer died may fail to shut down cleanly; it is gone either way
        pass


# ------------------------------------------------------------------------------------------ framing
def _encode(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _decode(t: torch.Tensor):
    return pickle.loads(t.cpu().numpy().tobytes())  # noqa: S301 - peers of our own weight-update group


def bcast_object(obj, src: int, group, device: torch.device | str = "cpu"):
    """Broadcast a picklable object from group rank ``src``; returns it on every rank."""
    me = group.rank()
    if me == src:
        payload = _encode(obj).to(device)
        n = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        n = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(n, group=group, group_src=src)
    if me != src:
        payload = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, group=group, group_src=src)
    return obj if me == src else _decode(payload)


def bcast_object_async(obj, group, device: torch.device | str = "cpu") -> list:
    """:func:`bcast_object` from this rank (the source) without waiting: returns the pending works
    (wait on all of them; they hold the tensors). The receivers call :func:`bcast_object`."""
    payload = _encode(obj).to(device)
    n = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    me = group.rank()
    return [dist.broadcast(n, group=group, group_src=me, async_op=True),
            dist.broadcast(payload, group=group, group_src=me, async_op=True)]


def send_object(obj, dst: int, group, device: torch.device | str = "cpu") -> None:
    """Point-to-point object send to group rank ``dst``."""
    payload = _encode(obj).to(device)
    dist.send(torch.tensor([payload.numel()], dtype=torch.int64, device=device), group=group, group_dst=dst)
    dist.send(payload, group=group, group_dst=dst)


def recv_object(src: int, group, device: torch.device | str = "cpu"):
    n = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(n, group=group, group_src=src)
    payload = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.recv(payload, group=group, group_src=src)
    return _decode(payload)
