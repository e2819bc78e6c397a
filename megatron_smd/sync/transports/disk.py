"""``disk``: safetensors shards and an index, published atomically, then the engine reloads
(see the package docstring)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from ..bucket import CHECKSUM_ALGORITHM, Bucket, NonFiniteError, fsync_dir, write_safetensors
from ..staging import (CommitResult, ShadowBuffers, StagedUpdate, WeightSyncError, read_shard, stage_from_disk,
                       stage_read)
from .base import SenderContext, Transport, result_from_error
from .sglang import post_sglang


def latest_snapshot(root: str | os.PathLike) -> Path | None:
    """The newest complete snapshot under a ``disk`` transport root (``LATEST``), or None."""
    p = Path(root) / "LATEST"
    if not p.is_file():
        return None
    snap = Path(root) / p.read_text().strip()
    return snap if (snap / "model.safetensors.index.json").is_file() else None


class DiskTransport(Transport):
    """Safetensors shards + index, written atomically, then the engine reloads.

    Args:
        root: the directory (``sync.dir``), visible to every sender and to the engine.
        engine: a ReferenceEngine on the coordinator to reload into (staged and verified), or None.
            With one pipeline stage it reads each shard as soon as the shard is written (on the
            writer thread, while the other shards are written and all are fsynced) into memory
            the transport keeps, and commits once the snapshot is published, adopting that memory
            (two sets in turn, as the broadcast receiver; a refused sync leaves the parameters
            where they were). With several stages it reads the published snapshot
            (:func:`~megatron_smd.sync.staging.stage_from_disk`) and copies it in.
        sglang_urls: SGLang servers to tell ``/update_weights_from_disk`` (they must see ``root``).
        keep: complete snapshots to keep. After a successful sync the older ones go, in the
            background (:meth:`wait` waits for that): one becomes the *spare* (renamed to
            ``.spare``, no longer a snapshot) whose files the next sync overwrites in place, the
            others are deleted. Reusing a snapshot's files, whose disk blocks are allocated,
            spares the file system allocating a model's worth of blocks per sync and freeing as
            many (with the ``discard`` mount option, freeing costs the next writer a trim of that
            size): measured here, writing a shard then runs at the speed of the page cache. The
            price is one more model's worth of disk between syncs (``keep + 1``; during a sync it
            is ``keep + 1`` either way). Nothing may read a snapshot once it is older than the
            newest ``keep``. ``recycle=False`` deletes them all instead.
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike, *, engine=None, sglang_urls: Sequence[str] = (), keep: int = 2,
                 timeout_s: float = 600.0, recycle: bool = True):
        self.root = Path(root)
        self.engine, self.sglang_urls, self.keep, self.timeout_s = engine, list(sglang_urls), max(1, keep), timeout_s
        self.recycle = recycle
        self._files: list[dict] = []
        self._fsyncs: list[_Fsync] = []
        self._pruning: threading.Thread | None = None
        self.buffers = ShadowBuffers()  # (engine) where the next reload is read into; its commit adopts them
        self._live: ShadowBuffers | None = None  # what the engine's parameters are views of
        self._read_into: dict | None = None  # (this sync) the engine's parameters, when it reads shards as written
        self._writer: ThreadPoolExecutor | None = None  # writes shards while the next bucket is converted
        self._writing: list[tuple[bool, Future]] | None = None  # shards being written (Bucket.borrows_only, job)

    def packs(self, ctx: SenderContext) -> bool:
        return False  # a shard is written tensor by tensor, mostly straight from the parameters

    def checks_finite(self, ctx: SenderContext) -> bool:
        return True  # the writer threads test each piece for NaN / inf right before writing it

    def embedding_first(self, ctx: SenderContext) -> bool:
        # The embedding is one tensor, so one shard on one writer thread, the longest job of the
        # sync: first, it runs while the other thread writes the layers' shards; last, it ran alone.
        return True

    def overlaps(self, ctx: SenderContext) -> bool:
        return True  # a shard is written on a helper thread while the next bucket is converted and checked

    @staticmethod
    def snapshot_name(version: int) -> str:
        return f"v{version:08d}"

    def _partial(self, version: int) -> Path:
        return self.root / f".{self.snapshot_name(version)}.partial"

    @property
    def _spare(self) -> Path:
        return self.root / ".spare"

    def wait(self) -> None:
        """Wait for the background deletion of snapshots older than ``keep`` (the next sync, and
        :meth:`close`, wait for it too)."""
        if self._pruning is not None:
            self._pruning.join()
            self._pruning = None

    def close(self) -> None:
        self.wait()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def begin(self, ctx: SenderContext) -> None:
        self.wait()
        self._files, self._fsyncs, self._writing = [], [], None
        # the coordinator's own engine reads the shards as they are written (single stage: the
        # other stages' shards are only known at the end)
        self._read_into = (dict(self.engine.model.named_parameters())
                           if ctx.coordinator and ctx.num_stages == 1 and self.engine is not None else None)
        part = self._partial(ctx.version)
        if ctx.coordinator:
            spare = self._spare
            if part.exists():  # a leftover of an earlier failed attempt: its files can be reused too
                if self.recycle and not spare.exists():
                    part.rename(spare)
                else:
                    shutil.rmtree(part, ignore_errors=True)
            if self.recycle and spare.is_dir():
                spare.rename(part)  # its shards are overwritten in place (write_safetensors)
            else:
                part.mkdir(parents=True)
        if ctx.num_stages > 1:
            dist.barrier(group=ctx.senders_group)  # the directory exists before anyone writes

    def send(self, ctx: SenderContext, bucket: Bucket) -> None:
        """Queue the bucket's shards on the writer threads, then wait for the earlier buckets' (the
        resharder may free their temporaries once this returns), except those made only of views of
        the learner's parameters (``Bucket.borrows_only``: the embedding, first): they may still be
        written while the next buckets are, and :meth:`finish` waits for them. A write's error is
        raised here or by :meth:`finish`."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="smd-sync-write")
        earlier = self._writing or []
        mine = [self._writer.submit(self._write, ctx, part, fname) for part, fname in _shards(ctx, bucket)]
        self._writing = [(b, f) for b, f in earlier if b] + [(bucket.borrows_only, f) for f in mine]
        for borrowed, f in earlier:
            if not borrowed:
                f.result()

    def _write(self, ctx: SenderContext, bucket: Bucket, fname: str) -> None:
        path = self._partial(ctx.version) / fname
        t0 = time.perf_counter()
        try:
            write_safetensors(path, bucket, {"format": "pt", "smd_sync_version": str(ctx.version)}, fsync=False,
                              check_finite=ctx.check_finite)
        except NonFiniteError as e:
            raise WeightSyncError(f"non-finite learner weights ({e.name} in shard {fname}): the run diverged; "
                                  f"nothing was published", "previous") from None
        finally:
            ctx.phases.add("write", time.perf_counter() - t0)
        # made durable in the background while the next shard is converted and written; finish()
        # waits for every shard before anything is published
        self._fsyncs.append(_Fsync(path))
        rec = {"file": fname, "names": list(bucket.names), "nbytes": bucket.nbytes, "checksums": bucket.checksums}
        if self._read_into is not None:
            # The engine reads the shard right away, on this thread, while the others are written
            # and everything is fsynced; it commits once the snapshot is published (the same
            # files, renamed), adopting what it read into (double-buffered, no second copy).
            t0 = time.perf_counter()
            rec["read"] = read_shard(path, rec["names"], self._read_into, self.buffers)
            rec["read_seconds"] = time.perf_counter() - t0
        self._files.append(rec)

    def finish(self, ctx: SenderContext, failed: str | None) -> CommitResult | None:
        writing, self._writing = self._writing or [], None
        for _, f in writing:
            try:
                f.result()
            except Exception as e:  # the last bucket's shards
                failed = failed or f"writing a shard: {type(e).__name__}: {e}"
        staged = None
        if not failed and self._read_into is not None:  # every shard was read as it was written
            staged = stage_read(self.engine, self._files, version=ctx.version, verify_checksums=ctx.verify)
        with ctx.phases("fsync"):  # what is left of the shards' fsyncs
            for t in self._fsyncs:
                t.join()
        bad = [t.error for t in self._fsyncs if t.error]
        self._fsyncs = []
        if bad and not failed:
            failed = "; ".join(bad)
        mine = {"stage": ctx.stage, "failed": failed, "files": self._files}
        if ctx.num_stages > 1:
            got = [None] * ctx.num_stages if ctx.coordinator else None
            dist.gather_object(mine, got, group=ctx.senders_group, group_dst=0)
        else:
            got = [mine]
        if not ctx.coordinator:
            return None
        errs = [f"stage {g['stage']}: {g['failed']}" for g in got if g["failed"]]
        if errs:
            return CommitResult(ok=False, version=ctx.version, receiver=self.name, engine_state="previous",
                                message="not written: " + "; ".join(errs))  # nothing published or reloaded
        with ctx.phases("publish"):
            snap = self._publish(ctx, got)
        return self._reload(ctx, snap, staged)

    def _publish(self, ctx: SenderContext, got: list[dict]) -> Path:
        part = self._partial(ctx.version)
        weight_map, sums, total = {}, {}, 0
        for g in got:
            for f in g["files"]:
                total += f["nbytes"]
                for i, name in enumerate(f["names"]):
                    weight_map[name] = f["file"]
                    if f["checksums"] is not None:
                        sums[name] = str(f["checksums"][i])
        index = {"metadata": {"total_size": total, "smd_sync_version": ctx.version, "smd_checksums": sums,
                              "smd_checksum_algorithm": CHECKSUM_ALGORITHM},
                 "weight_map": dict(sorted(weight_map.items()))}
        written = {f["file"] for g in got for f in g["files"]}
        for leftover in part.iterdir():  # files of a recycled snapshot that this one does not have
            if leftover.name not in written and leftover.name not in ("model.safetensors.index.json", "config.json"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        (part / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        (part / "config.json").write_text(json.dumps(ctx.arch.to_hf_config(), indent=2) + "\n")
        for name in ("model.safetensors.index.json", "config.json"):
            with open(part / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(part)
        final = self.root / self.snapshot_name(ctx.version)
        if final.exists():  # re-sync of the same version: replace it
            old = self.root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        part.rename(final)
        tmp = self.root / ".LATEST.tmp"
        tmp.write_text(final.name + "\n")
        os.replace(tmp, self.root / "LATEST")
        fsync_dir(self.root)
        return final

    def _prune(self, keep_name: str) -> None:
        snaps = sorted(p for p in self.root.glob("v[0-9]*") if p.is_dir())
        old = [p for p in snaps[:-self.keep] if p.name != keep_name]
        if old and self.recycle and not self._spare.exists():
            old.pop().rename(self._spare)  # the newest of them: its files are overwritten by the next sync
        for p in old:
            shutil.rmtree(p, ignore_errors=True)

    def _reload(self, ctx: SenderContext, snap: Path, staged: StagedUpdate | None = None) -> CommitResult:
        if self.engine is not None:
            st = staged or stage_from_disk(self.engine, snap, version=ctx.version, verify_checksums=ctx.verify)
            try:
                res = st.commit(ctx.probe, adopt=staged is not None)
            except WeightSyncError as e:
                return result_from_error(ctx.version, e, self.name)
            if staged is not None:  # the parameters now live in these buffers; the ones they left are free
                self._live, self.buffers = self.buffers, (self._live or ShadowBuffers())
        elif self.sglang_urls:
            msgs = []
            for url in self.sglang_urls:
                ok, msg = post_sglang(url, "/update_weights_from_disk",
                                {"model_path": str(snap.resolve()), "weight_version": str(ctx.version)}, self.timeout_s)
                if not ok:
                    return CommitResult(ok=False, version=ctx.version, receiver=self.name, engine_state="partial",
                                        message=f"{url}/update_weights_from_disk: {msg} (SGLang rolls back to its "
                                                f"previous weights when loading fails; servers before {url} in the "
                                                f"list took the new ones)")
                msgs.append(msg)
            res = CommitResult(ok=True, version=ctx.version, message="; ".join(msgs), receiver="sglang")
        else:
            res = CommitResult(ok=True, version=ctx.version, message=f"written to {snap} (no engine attached)",
                               receiver=self.name)
        res.message = f"{res.message} [{snap}]"
        # older snapshots are deleted in the background (the trainer's next step runs meanwhile)
        self._pruning = threading.Thread(target=self._prune, args=(snap.name,), daemon=True,
                                         name="smd-sync-prune")
        self._pruning.start()
        return res


#: Writer threads: a bucket of at least :data:`SPLIT_SHARD_BYTES` is written as two shards at once.
#: The kernel copies into the page cache of two files in parallel, not of one (ext4 takes the
#: file's lock for a buffered write): measured here, 1 GB into two files on two threads took
#: 57 ms against 105 ms into one file (either on one thread or on two).
WRITERS = 2
SPLIT_SHARD_BYTES = 16 << 20


def _shards(ctx: SenderContext, bucket: Bucket) -> list[tuple[Bucket, str]]:
    """The shards a bucket is written as: itself, or (at least :data:`SPLIT_SHARD_BYTES`, at least
    two tensors) two buckets cut at the tensor boundary nearest half its bytes, with their file
    names (the same every sync, so a recycled snapshot's files are overwritten in place)."""
    stem = f"model-pp{ctx.stage:02d}-{bucket.index:05d}"
    if len(bucket) < 2 or bucket.nbytes < SPLIT_SHARD_BYTES or bucket.flat is not None:
        return [(bucket, f"{stem}.safetensors")]
    acc, cut = 0, 1
    for i, t in enumerate(bucket.tensors[:-1]):
        acc += t.numel() * t.element_size()
        if acc >= bucket.nbytes / 2:
            cut = i + 1
            break
    else:
        cut = len(bucket) - 1
    out = []
    for part, (lo, hi) in enumerate(((0, cut), (cut, len(bucket)))):
        b = Bucket(bucket.stage, bucket.index)
        try:
            for name, t in zip(bucket.names[lo:hi], bucket.tensors[lo:hi]):
                b.add(name, t)
        except ValueError:  # mixed dtypes that the cut would misalign: one shard
            return [(bucket, f"{stem}.safetensors")]
        if bucket.checksums is not None:
            b.checksums = bucket.checksums[lo:hi]
        out.append((b, f"{stem}-{part}.safetensors"))
    return out


class _Fsync(threading.Thread):
    """fsync one written shard in the background (the disk works while the sender converts)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True, name=f"fsync {path.name}")
        self.path, self.error = path, None
        self.start()

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self.error = f"fsync of {self.path} failed ({e})"
