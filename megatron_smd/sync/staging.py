"""Engine side of a sync: stage every tensor in a shadow copy, verify, then commit all at once.

The rollout engine must never run on a mixture of two policies. So a receiver does not write into
the engine as tensors arrive: :class:`StagedUpdate` keeps them in a shadow dict (its own copy, in the
engine's dtype and device) and records every problem instead of raising mid-stream (a receiver that
stops reading would stall the senders). :meth:`StagedUpdate.commit` then checks, in order:

1. nothing went wrong while staging (unknown name, duplicate, wrong shape, checksum mismatch,
   an abort from a sender);
2. the sync is complete: exactly the engine's HF tensors (``expected_shapes(arch)``), each once;
3. optionally, a probe batch: the engine's model run *on the staged tensors*
   (``torch.func.functional_call``; nothing is written) must reproduce the learner's logits within
   a tolerance;

and only then copies the shadow into the engine with ``ReferenceEngine.load_weights``. Every name
and shape was validated before that copy starts, so it cannot stop half-way. Any failure raises
:class:`WeightSyncError` with ``engine_state == "previous"``: the engine still holds exactly the
weights it had before the sync.

Cost: the shadow is one extra copy of the model on the engine side (the price of atomicity;
SGLang, which loads in place, cannot offer it, and its transport says so on failure). A receiver
that syncs repeatedly keeps that memory in a :class:`ShadowBuffers` and reuses it: the tensors are
received or converted straight into it, so after the first sync no page is faulted in again (a
fresh gigabyte costs several times its copy on a VM). The in-process engine and the broadcast
receiver commit by adopting what they wrote or received into (``commit(adopt=True)``: no copy at
all; their kept memory alternates between two sets); with ``adopt=False`` the in-process engine
stages a learner tensor that is a view of its parameter in the engine's dtype as it is (it stays
valid until the sync returns; the commit copies it from there). Between syncs
the buffers hold stale bytes and nothing refers to them; a staging refers to them from its first
``add`` until it commits or is discarded, and the next sync's staging only starts after that.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..errors import SMDError
from ..model.hf import expected_shapes
from .bucket import empty_bytes, numel
from .checks import CHECKSUM_ALGORITHM, Checksum, tensor_checksum

EngineState = Literal["previous", "partial", "unknown", "updated"]


class WeightSyncError(SMDError):
    """A weight sync failed.

    Attributes:
        engine_state: what the rollout engine holds now: ``"previous"`` (untouched: the sync was
            staged and never committed), ``"partial"`` (an engine that loads in place, e.g. SGLang,
            received part of the new weights: re-sync before sampling), ``"updated"`` (the new
            weights are in, a check after the commit failed) or ``"unknown"``.
    """

    def __init__(self, message: str, engine_state: EngineState = "unknown"):
        super().__init__(message)
        self.engine_state = engine_state


@dataclass
class Probe:
    """A probe batch and the learner's logits on it: ``tokens [B, T]`` int64, ``logits [B, T, V]``
    fp32 (positions ``0..T-1``, causal). The engine's logits must be within ``atol``."""

    tokens: torch.Tensor
    logits: torch.Tensor
    atol: float = 1e-5


@dataclass
class CommitResult:
    """What a receiver did with one sync (sent back to the learner by wire transports).

    ``engine_state`` is ``"updated"`` when ``ok``; on a refusal ``"previous"`` for a staged engine,
    ``"partial"`` when some engines took the sync and others did not, or for an in-place loader.
    """

    ok: bool
    version: int
    message: str = ""
    tensors: int = 0
    bytes: int = 0
    checksums_verified: int = 0
    probe_max_abs_diff: float | None = None
    receiver: str = "engine"
    engine_state: EngineState = "updated"  # what the engine(s) hold after this verdict
    phases: dict[str, float] = field(default_factory=dict)  # engine-side seconds: recv, stage, verify, probe, commit


class ShadowBuffers:
    """Engine-side staging memory kept across syncs (see the module docstring).

    ``slot(name, ...)``: a tensor for one HF tensor, written in place by the in-process resharder;
    ``recv(key, nbytes, ...)``: a receive buffer for one wire bucket (``key`` = ``(stage, n)``, the
    ``n``-th bucket of a stage within a sync, so two buckets of one sync never share a buffer).
    A buffer is reallocated only when its size, dtype or device changes.
    """

    def __init__(self):
        self._slots: dict[str, torch.Tensor] = {}
        self._recv: dict[object, torch.Tensor] = {}
        self._arena: torch.Tensor | None = None  # what arena() laid out, and for which tensors
        self._arena_key: tuple = ()
        self._plan: tuple | None = None  # (key, plan) of the arena (see plan())

    def plan(self, key, build):
        """``build()``, kept with the arena: the same object again while ``key`` is the same and the
        arena was not laid out anew (a sync's plan of copies into it, see
        :class:`~megatron_smd.sync.arena.ArenaPlan`: it holds views of the arena and of the
        learner's parameters, so it is only reused for the same parameters at the same addresses)."""
        if self._plan is None or self._plan[0] != key:
            self._plan = None  # the old plan's views go before the new one is built
            self._plan = (key, build())
        return self._plan[1]

    def arena(self, specs: list[tuple[str, tuple[int, ...], torch.dtype]], device: torch.device
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Slots for every ``(name, shape, dtype)`` of ``specs`` as views of one buffer, the *arena*
        (:mod:`~megatron_smd.sync.arena`): back to back in that order, each on a 4 KiB boundary,
        the gaps zero. Kept and reused while ``specs`` and ``device`` are the same; the slots are
        also what :meth:`slot` returns for those names. Returns the arena and the slots."""
        from .arena import arena_layout, row_padded

        key = (tuple((n, tuple(int(d) for d in s), dt) for n, s, dt in specs), torch.device(device))
        if self._arena is None or key != self._arena_key:
            for n, _, _ in specs:
                self._slots.pop(n, None)
            self._arena, self._plan = None, None
            sizes = [numel(s) * dt.itemsize for _, s, dt in specs]
            offsets, total = arena_layout(sizes)
            buf = empty_bytes(total, device)
            for (n, s, dt), off, nb in zip(specs, offsets, sizes):
                buf[off + nb:off + row_padded(nb)].zero_()  # the checksum reads a tensor's last row whole
                self._slots[n] = buf[off:off + nb].view(dt).view(tuple(int(d) for d in s))
            self._arena, self._arena_key = buf, key
        return self._arena, [self._slots[n] for n, _, _ in specs]

    def slot(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = self._slots.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != torch.device(device):
            self._slots.pop(name, None)
            del t
            t = empty_bytes(numel(shape) * dtype.itemsize, device).view(dtype).view(tuple(shape))
            self._slots[name] = t
        return t

    def recv(self, key, nbytes: int, device: torch.device) -> torch.Tensor:
        buf = self._recv.get(key)
        if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
            self._recv.pop(key, None)
            del buf
            buf = empty_bytes(nbytes, device)
            self._recv[key] = buf
        return buf[:nbytes]

    @property
    def nbytes(self) -> int:
        """Bytes held: the arena, the slots outside it and the receive buffers."""
        arena = self._arena
        inside = 0 if arena is None else arena.untyped_storage().data_ptr()
        return ((0 if arena is None else arena.numel())
                + sum(t.numel() * t.element_size() for t in self._slots.values()
                      if t.untyped_storage().data_ptr() != inside)
                + sum(t.numel() for t in self._recv.values()))

    def clear(self) -> None:
        """Free the memory (the next sync allocates, and faults in, its buffers again)."""
        self._slots.clear()
        self._recv.clear()
        self._arena, self._arena_key, self._plan = None, (), None


@dataclass
class StagedUpdate:
    """A shadow copy of one sync's tensors for ``engine`` (a ``ReferenceEngine``).

    Args:
        engine: the engine to update at commit (``.model``, ``.arch``, ``.load_weights``).
        version: the sync's version (every message of the sync carries it).
        verify_checksums: compare each tensor's checksum with the sender's, when the sender sent one.
    """

    engine: object
    version: int
    verify_checksums: bool = True
    problems: list[str] = field(default_factory=list)
    _staged: dict[str, torch.Tensor] = field(default_factory=dict)
    checksums_verified: int = 0
    nbytes: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # seconds spent in verify / probe / commit
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # phases, from writer threads

    def __post_init__(self):
        self.expected = expected_shapes(self.engine.arch)
        self._params = dict(self.engine.model.named_parameters())

    # ------------------------------------------------------------------------------------------
    def problem(self, message: str) -> None:
        """Record a failure; the staging is poisoned and :meth:`commit` will refuse."""
        self.problems.append(message)

    def verifier(self, nbytes: int) -> Checksum | None:
        """This engine's own checksum of a tensor of ``nbytes`` bytes being written straight into
        its staging memory (the in-process resharder's sink), to be fed every piece of the tensor as
        soon as it is written, while the piece is in cache; its value is then passed to :meth:`add`
        as ``received``. None when this staging does not verify checksums."""
        return _VerifyChecksum(nbytes, self) if self.verify_checksums else None

    def add(self, name: str, t: torch.Tensor, checksum: int | None = None, *, copy: bool = True,
            received: int | None = None) -> None:
        """Stage one HF tensor. Problems are recorded, not raised (see the module docstring).

        ``copy=False`` keeps ``t`` itself when it already has the engine's dtype and device (a
        receive buffer that nobody else holds); otherwise it is copied / cast. ``checksum`` is the
        sender's; ``received`` this engine's own checksum of ``t``, taken as it was written into
        the staging (:meth:`verifier`), or None to compute it here.
        """
        if name == "lm_head.weight" and self.engine.arch.tie_word_embeddings:
            return  # tied: model.embed_tokens.weight is the tensor
        if name not in self.expected:
            return self.problem(f"unknown tensor {name} (not a parameter of the engine's {self.engine.arch.arch})")
        if name in self._staged:
            return self.problem(f"tensor {name} received twice")
        if tuple(t.shape) != tuple(self.expected[name]):
            return self.problem(f"tensor {name} has shape {list(t.shape)}, "
                                f"the engine expects {list(self.expected[name])}")
        if checksum is not None and self.verify_checksums:
            got = received
            if got is None:
                t0 = time.perf_counter()
                got = tensor_checksum(t)
                self._time("verify", t0)
            if got != checksum:
                return self.problem(f"checksum mismatch for {name}: sender {checksum:#x}, received {got:#x}")
            self.checksums_verified += 1
        p = self._params[name]
        if copy or t.dtype != p.dtype or t.device != p.device:
            t = t.to(dtype=p.dtype, device=p.device, copy=True)
        self._staged[name] = t
        self.nbytes += t.numel() * t.element_size()

    def _time(self, phase: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        with self._lock:
            self.phases[phase] = self.phases.get(phase, 0.0) + dt

    def __len__(self) -> int:
        return len(self._staged)

    def discard(self) -> None:
        self._staged.clear()

    # ------------------------------------------------------------------------------------------
    def _fail(self, message: str) -> WeightSyncError:
        self.discard()
        return WeightSyncError(f"weight sync v{self.version}: {message}; the engine keeps its previous weights",
                               engine_state="previous")

    @torch.no_grad()
    def probe_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The engine model's logits on ``tokens`` with the *staged* weights (nothing is written)."""
        from torch.func import functional_call

        model = self.engine.model
        dev = next(model.parameters()).device
        return functional_call(model, dict(self._staged), (tokens.to(dev),)).float().cpu()

    def commit(self, probe: Probe | None = None, *, adopt: bool = False) -> CommitResult:
        """Verify and apply the staged weights (see the module docstring). Raises
        :class:`WeightSyncError` (engine untouched) on any problem.

        ``adopt``: instead of copying the staged tensors into the engine's parameters, make them
        the parameters' data (``param.data = staged``, the parameter objects stay, so tied
        weights stay tied): no copy. Only for staged tensors that nobody else will write, i.e. a
        receiver's own buffers, which then back the engine until a later sync replaces them (see
        :class:`~megatron_smd.sync.receiver.BroadcastReceiver`).
        """
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            raise self._fail(self.problems[0] + more)
        missing = [n for n in self.expected if n not in self._staged]
        if missing:
            raise self._fail(f"incomplete: {len(missing)} of {len(self.expected)} tensors never arrived "
                             f"(first: {missing[0]})")
        diff = None
        t0 = time.perf_counter()
        if probe is not None:
            got = self.probe_logits(probe.tokens)
            self._time("probe", t0)
            if got.shape != probe.logits.shape:
                raise self._fail(f"probe logits have shape {list(got.shape)}, the learner's {list(probe.logits.shape)}")
            diff = float((got - probe.logits.float()).abs().max())
            if not diff <= probe.atol:  # also catches NaN
                raise self._fail(f"probe batch: engine logits differ from the learner's by {diff:.3g} "
                                 f"(tolerance {probe.atol:g})")
        t0 = time.perf_counter()
        if adopt:  # names, shapes, dtypes and devices validated: cannot stop half-way
            with torch.no_grad():
                for name, t in self._staged.items():
                    self._params[name].data = t
        else:
            _load_weights(self.engine, self._staged)  # names and shapes validated: cannot stop half-way
        self._time("commit", t0)
        res = CommitResult(ok=True, version=self.version, message="committed", tensors=len(self._staged),
                           bytes=self.nbytes, checksums_verified=self.checksums_verified, probe_max_abs_diff=diff,
                           phases=dict(self.phases))
        self.discard()
        return res


class _VerifyChecksum(Checksum):
    """A staging's own checksum of one tensor (:meth:`StagedUpdate.verifier`): its seconds count as
    the engine's ``verify`` phase."""

    __slots__ = ("_staging",)

    def __init__(self, nbytes: int, staging: StagedUpdate):
        super().__init__(nbytes)
        self._staging = staging

    def update(self, piece: torch.Tensor, offset: int) -> None:
        t0 = time.perf_counter()
        super().update(piece, offset)
        self._staging._time("verify", t0)

    def value(self) -> int:
        t0 = time.perf_counter()
        v = super().value()
        self._staging._time("verify", t0)
        return v


def _load_weights(engine, staged: dict[str, torch.Tensor]) -> None:
    """``engine.load_weights(staged)``; a large CPU commit as two calls on disjoint halves (by bytes),
    one on a helper thread, joined: the sync runs torch with one intra-op thread (OpenMP's spinning
    barriers collapse on a busy machine, see ``WeightSync(threads=...)``), and two Python threads
    joined by a blocking wait use a second core when it is free without that failure mode."""
    from concurrent.futures import ThreadPoolExecutor

    from . import bucket

    SPLIT_BYTES = bucket.SPLIT_BYTES
    sizes = {n: t.numel() * t.element_size() for n, t in staged.items()}
    total = sum(sizes.values())
    if (not SPLIT_BYTES or total < 2 * SPLIT_BYTES or len(staged) < 2
            or any(t.device.type != "cpu" for t in staged.values())):
        engine.load_weights(staged)
        return
    first, acc = {}, 0
    for n, t in staged.items():
        if acc >= total / 2:
            break
        first[n] = t
        acc += sizes[n]
    second = {n: t for n, t in staged.items() if n not in first}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="smd-sync-commit") as pool:
        f = pool.submit(engine.load_weights, second)
        try:
            engine.load_weights(first)
        finally:
            f.result()


# -------------------------------------------------------------------------------------- disk reload
def stage_from_disk(engine, snapshot: str | Path, *, version: int | None = None,
                    verify_checksums: bool = True) -> StagedUpdate:
    """Read a snapshot written by the ``disk`` transport into a :class:`StagedUpdate`.

    The snapshot is an HF model directory (``config.json``, ``model.safetensors.index.json``, shards).
    The index's ``metadata`` carries the sync version and, when the sync was verified, each tensor's
    checksum, which is compared here. Unreadable files are recorded as problems, not raised.

    The ``safetensors`` library maps the shards: the staged tensors are views of the page cache
    (no copy, no fresh memory: measured, mapping and then committing costs about one copy, reading
    into buffers first about two), and the commit copies them into the engine.
    """
    import json

    snap = Path(snapshot)
    index_path = snap / "model.safetensors.index.json"
    try:
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
        meta = index.get("metadata", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        st = StagedUpdate(engine, version if version is not None else -1, verify_checksums)
        st.problem(f"{index_path}: unreadable sync index ({e})")
        return st
    v = int(meta.get("smd_sync_version", -1)) if version is None else version
    st = StagedUpdate(engine, v, verify_checksums)
    sums = meta.get("smd_checksums") or {}
    if isinstance(sums, str):
        sums = json.loads(sums)
    algo = meta.get("smd_checksum_algorithm")
    if sums and verify_checksums and algo != CHECKSUM_ALGORITHM:
        st.problem(f"{index_path}: its checksums were computed with {algo or 'an earlier algorithm'!s}, this "
                   f"version computes {CHECKSUM_ALGORITHM}: re-sync to write a fresh snapshot")
        return st
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    _stage_files(st, snap, sorted(by_file.items()), {n: int(c) for n, c in sums.items()})
    return st


def stage_read(engine, shards: list[dict], *, version: int, verify_checksums: bool) -> StagedUpdate:
    """A :class:`StagedUpdate` of shards already read (:func:`read_shard`) by the ``disk`` transport
    as it wrote them: ``shards`` are its records (``names``, ``checksums``, ``read`` = what
    :func:`read_shard` returned, ``read_seconds``), staged with the same checks as
    :func:`stage_from_disk`."""
    st = StagedUpdate(engine, version, verify_checksums)
    for f in shards:
        entries, problems = f["read"]
        for msg in problems:
            st.problem(msg)
        sums = dict(zip(f["names"], f["checksums"])) if f["checksums"] is not None else {}
        for name, t in entries:
            st.add(name, t, sums.get(name), copy=False)
    st.phases["read"] = sum(f["read_seconds"] for f in shards) - st.phases.get("verify", 0.0)
    return st


def read_shard(path: Path, names: list[str], params: dict[str, torch.Tensor], buffers: ShadowBuffers | None = None
               ) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """The tensors ``names`` of one safetensors file, and the problems met (a tensor missing, the
    file unreadable). The ``safetensors`` library maps the file: a tensor is a view of the page
    cache, or, with ``buffers``, copied into its kept slot when it fits its engine parameter
    (``params``) as it is (the engine's commit then adopts the slot: no second copy)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    out, problems = [], []
    try:
        with safe_open(str(path), framework="pt") as f:  # the tensors keep their mapping
            present = set(f.keys())
            for name in names:
                if name not in present:
                    problems.append(f"{path}: tensor {name} listed in the index is missing")
                    continue
                t = f.get_tensor(name)
                p = params.get(name)
                if (buffers is not None and p is not None and p.dtype == t.dtype and p.device.type == "cpu"
                        and tuple(p.shape) == tuple(t.shape) and t.numel()):
                    slot = buffers.slot(name, t.shape, t.dtype, p.device)
                    slot.copy_(t)
                    t = slot
                out.append((name, t))
    except (SafetensorError, OSError, ValueError) as e:
        problems.append(f"{path}: cannot read safetensors shard ({e})")
    return out, problems


def _stage_files(st: StagedUpdate, snap: Path, files: list[tuple[str, list[str]]], sums: dict[str, int]) -> None:
    """Stage the tensors ``names`` of each safetensors file of ``snap`` (views of the mapped files,
    copied into the engine by the commit); problems are recorded."""
    t0 = time.perf_counter()
    for fname, names in files:
        entries, problems = read_shard(snap / fname, names, st._params)
        for msg in problems:
            st.problem(msg)
        for name, t in entries:
            st.add(name, t, sums.get(name), copy=False)
    st._time("read", t0)
    st.phases["read"] -= st.phases.get("verify", 0.0)  # verify is timed apart
