"""Weight sync (megatron_smd.sync): learner TP x PP shards -> rollout engines, for every CPU transport.

What is measured, and against what:

* **Exactness** (one spawn: 4 gloo learner ranks + 2 broadcast receiver processes). Four layouts in
  turn, TP in {1, 2} x PP in {1, 2} (DP fills the 4 ranks), on tiny Qwen2 (tied embeddings, QKV
  bias) and Llama (untied) models. The learner takes one Adam step first (lr 1e-2), so the engine
  (loaded with the pre-step weights) is far from it: a no-op sync fails (asserted: > 1e-3). Then,
  for ``inprocess``, ``disk`` and ``broadcast`` (both receivers), the engine's logits on a probe batch
  must equal the learner's (fp32, <= 1e-5 absolute; the learner's logits come from a pipelined
  forward of the Megatron model, checked at TP=PP=1 against a direct call). Every sync runs with
  ``verify`` (checksums) and the probe compare, so those paths run too.
* **Memory** (same spawn): a broadcast sync with 256 KiB buckets (the largest tensor, fc1, is
  128 KiB) is profiled on every sending rank with ``torch.profiler`` memory events (the CPU
  allocator's own record, backend temporaries included): the peak extra bytes must stay within two
  buckets. Measured: 256 KiB at TP=1, 320 KiB at TP=2 (the packing buffers: two halves of a bucket,
  the conversion writes straight into them; + the gather buffer at TP=2), and it must agree with the
  resharder's own :class:`LiveBytes` figure (what ``SyncReport`` reports) to within 32 KiB
  (measured: equal).
* **Failure semantics** (same spawn, last layout TP=2 x PP=2): (a) a transport that corrupts one
  tensor of one bucket in transit after the checksum was taken -> every learner rank raises
  ``WeightSyncError(engine_state="previous")`` naming the tensor, and the engine's parameters are
  bit-identical to before; (b) a disk snapshot with one flipped byte -> reload refuses, engine
  unchanged; (c) a NaN in one learner shard -> refused on every rank, naming the HF tensor, engine
  unchanged; (d) one broadcast receiver dies (``os._exit``) on its 2nd bucket of stage 1 -> every
  learner rank raises a clear error within seconds (no hang: a failed sender tears its group down),
  and the surviving receiver, which had staged all of stage 0 and part of stage 1, discards its
  staging and keeps its previous weights.
* **GPU** (``gpu`` marker): the ``sglang`` transport against a real SGLang server, colocated
  (``update_weights_from_tensor``, one GPU) and distributed (NCCL broadcast, two GPUs).
* **Repeated syncs** (one learner rank + one broadcast receiver): three in-process syncs of new
  weights through the engine's kept buffers (two sets the commit adopts in turn) leave the engine's
  parameters bit-identical to the conversion table's HF tensors; a NaN is refused with and without
  checksums (the finiteness test runs on different threads in the two cases), the engine
  bit-identical; the raw-broadcast ``wire`` message works between syncs.
* **Double-buffered receiver, segments, recycled snapshots** (one learner rank + one broadcast
  receiver): five broadcast syncs of new weights, one refused (a NaN), some buckets sent in
  segments straight from the learner's parameters: the receiver's engine matches the learner after
  each, its parameters alternate between two buffer sets that are never received into while live,
  the refused sync changes nothing, the learner's memory is untouched; five disk syncs with
  ``keep=1``: the third and fourth overwrite the first and second snapshots' files (same inodes,
  held open), the engine bit-identical each time, no stale shard after the layout changes.
* Unit tests in the pytest process: the checksum against a pure-Python evaluation of its formula
  and against single-word corruption, and its numpy (CPU) and torch paths against each other; the
  finiteness test against every NaN / inf pattern per float dtype; the resharder's direct
  conversion byte-for-byte against the conversion table (TP 1, 2, 4, query groups split across
  ranks); the wire layout byte-for-byte against SGLang's own ``FlattenedTensorBucket``; safetensors
  shards against the ``safetensors`` reader; the staged commit's atomicity; a disk snapshot whose
  checksums another algorithm computed; ``WeightSync.from_config``; the pieces a tensor is written
  and checked in (row-aligned, each written by its own copies); the checksum fed in pieces from two
  threads; the adopting commit (tied weights stay tied, a refusal changes no storage).
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import queue
import socket
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

from megatron_smd.model.tiny import init_weights, tiny_arch
from megatron_smd.sync.bucket import Bucket, flat_size, tensor_checksum, unflatten, write_safetensors

from _dist import free_port

EXACT_TOL = 1e-5
VOCAB = 250
BUCKET = 256 * 1024  # >= 2x the largest tiny parameter (fc1: 128 KiB), so "two buckets" is meaningful
LAYOUTS = [("qwen2", 1, 1), ("llama", 2, 1), ("llama", 1, 2), ("qwen2", 2, 2)]
WORLD = 4
N_RX = 2
PROBE = torch.tensor([[5, 17, 42, 99, 3, 250 - 1, 7, 64, 128, 200, 11, 0, 33, 77, 150, 249],
                      [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])


def _arch(name: str):
    return tiny_arch(name, vocab_size=VOCAB, pad_token_id=None)


def _hf0(name: str) -> dict[str, torch.Tensor]:
    return init_weights(_arch(name), seed=3, std=0.1)


def _engine(name: str):
    from megatron_smd.model.transformer import RefTransformer
    from megatron_smd.rollout.engine import ReferenceEngine

    return ReferenceEngine(RefTransformer.from_state_dict(_arch(name), _hf0(name)))


@torch.no_grad()
def _engine_logits(engine) -> torch.Tensor:
    return engine.model(PROBE).float()


def _param_sums(engine) -> dict[str, int]:
    return {n: tensor_checksum(p) for n, p in engine.model.named_parameters()}


# ================================================================================== unit tests
def _checksum_reference(t: torch.Tensor) -> int:
    """The checksum's formula evaluated with Python integers, word by word: 64-bit little-endian
    words in rows of 512 (zero-padded), weight ``v_j + u_k`` for word ``(j, k)``, modulo 2^64."""
    b = bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    n = len(b)
    b += b"\0" * (-n % 4096)
    mask = (1 << 64) - 1
    words = [int.from_bytes(b[k:k + 8], "little") for k in range(0, len(b), 8)]
    total = n * 0x9E3779B97F4A7C15
    for i, x in enumerate(words):
        j, k = divmod(i, 512)
        v = 2 * j * 0xBF58476D1CE4E5B9 + 1
        u = 2 * (k * 0x94D049BB133111EB + 0xD6E8FEB86659FD93)
        total += ((v + u) & mask) * x
    return total & mask


def test_checksum_matches_reference_and_detects_corruption():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(70_001, generator=g)  # 280 KB: 69 rows of 4 KiB and a partial one, odd element count
    assert tensor_checksum(t) == _checksum_reference(t)
    odd = torch.arange(7, dtype=torch.uint8)  # odd byte count: zero-padded
    assert tensor_checksum(odd) == _checksum_reference(odd)
    assert tensor_checksum(t.clone()) == tensor_checksum(t)
    assert tensor_checksum(t.bfloat16()) == _checksum_reference(t.bfloat16())
    big = torch.randint(-(1 << 62), 1 << 62, (600_000,), generator=g)  # > one 4 MiB reduction chunk; sums wrap
    assert tensor_checksum(big) == _checksum_reference(big)
    assert tensor_checksum(torch.empty(0)) == _checksum_reference(torch.empty(0))
    base = tensor_checksum(t)
    raw = t.view(torch.int32)
    # old 2^16-word chunk boundaries, 4 KiB row boundaries (int32 1023 / 1024) and the padded last row
    for i in (0, 1, 1023, 1024, 65_535, 65_536, 70_000):
        for bit in (0, 13, 31):
            c = raw.clone()
            c[i] ^= 1 << bit if bit < 31 else -(1 << 31)
            assert tensor_checksum(c.view(torch.float32)) != base, (i, bit)
    sw = t.clone()
    sw[[10, 20]] = sw[[20, 10]]  # two words of one row
    assert tensor_checksum(sw) != base
    sw = t.clone()
    sw[[10, 10 + 1024]] = sw[[10 + 1024, 10]]  # the same column of two rows
    assert tensor_checksum(sw) != base
    sw = t.clone()
    sw[[0, 1]] = sw[[1, 0]]  # within one 64-bit word
    assert tensor_checksum(sw) != base
    assert tensor_checksum(t[:-1]) != base  # truncation
    assert tensor_checksum(torch.zeros(8)) != tensor_checksum(torch.zeros(9))  # zero bytes count too


def _mixed_bucket() -> Bucket:
    g = torch.Generator().manual_seed(1)
    b = Bucket(stage=1, index=3)
    b.add("a.weight", torch.randn(5, 7, generator=g))
    b.add("b.bias", torch.randn(3, generator=g))
    b.add("c.weight", torch.randn(4, 6, generator=g).to(torch.bfloat16))
    b.add("d.weight", torch.randn(2, 2, generator=g).to(torch.bfloat16))
    return b


def _sglang_tensor_bucket():
    """SGLang's ``weight_sync/tensor_bucket.py``, loaded from its file: it needs only torch, while the
    ``sglang`` package's ``__init__`` pulls in GPU-only imports (triton) a CPU machine lacks."""
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        pytest.skip("sglang is not installed (pip install --no-deps sglang==0.5.23, see README)")
    path = Path(spec.origin).parent / "srt" / "weight_sync" / "tensor_bucket.py"
    mod_spec = importlib.util.spec_from_file_location("_sglang_tensor_bucket", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_wire_layout_is_sglang_flattened_bucket():
    FlattenedTensorBucket = _sglang_tensor_bucket().FlattenedTensorBucket

    b = _mixed_bucket()
    ours = b.flatten()
    theirs = FlattenedTensorBucket(named_tensors=list(zip(b.names, b.tensors)))
    assert torch.equal(ours, theirs.get_flattened_tensor())
    h = b.header()
    assert flat_size(h["dtypes"], h["shapes"]) == ours.numel() == b.nbytes
    # SGLang's receive side: allocate from the announcement, reconstruct; and ours
    empty = FlattenedTensorBucket.empty(h["names"], h["dtypes"], h["shapes"], "cpu")
    empty.get_flattened_tensor().copy_(ours)
    mine = unflatten(ours, h["names"], h["dtypes"], h["shapes"])
    for (n1, t1), (n2, t2), name, t in zip(empty.reconstruct_tensors(), mine, b.names, b.tensors):
        assert n1 == n2 == name and torch.equal(t1, t) and torch.equal(t2, t)
    with pytest.raises(ValueError, match="needs bytes"):
        unflatten(ours[:-2], h["names"], h["dtypes"], h["shapes"])
    with pytest.raises(ValueError, match="cover"):
        unflatten(torch.cat([ours, ours[:2]]), h["names"], h["dtypes"], h["shapes"])


def test_safetensors_shard_reads_back(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    b = _mixed_bucket()
    path = tmp_path / "shard.safetensors"
    n = write_safetensors(path, b, {"format": "pt", "smd_sync_version": "7"})
    assert n == path.stat().st_size
    got = load_file(str(path))
    assert list(got) == sorted(b.names) or set(got) == set(b.names)
    for name, t in zip(b.names, b.tensors):
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["smd_sync_version"] == "7"


def test_staged_commit_is_all_or_nothing():
    from megatron_smd.sync.staging import Probe, StagedUpdate, WeightSyncError

    name = "qwen2"
    engine = _engine(name)
    before = _param_sums(engine)
    new = {k: v + 0.01 for k, v in init_weights(_arch(name), seed=4, std=0.1).items()}
    sums = {k: tensor_checksum(v) for k, v in new.items()}

    def stage(skip=None, corrupt=None):
        st = StagedUpdate(engine, version=1)
        for k, v in new.items():
            if k == skip:
                continue
            t = v.clone()
            if k == corrupt:
                t.view(-1)[3] += 1.0
            st.add(k, t, sums[k])
        return st

    last = "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(WeightSyncError, match="checksum mismatch for " + last) as e:
        stage(corrupt=last).commit()
    assert e.value.engine_state == "previous" and _param_sums(engine) == before
    with pytest.raises(WeightSyncError, match="never arrived"):
        stage(skip="model.norm.weight").commit()
    assert _param_sums(engine) == before
    from megatron_smd.model.transformer import RefTransformer

    with torch.no_grad():
        ref_logits = RefTransformer.from_state_dict(_arch(name), new)(PROBE).float()
    with pytest.raises(WeightSyncError, match="probe batch"):
        stage().commit(Probe(PROBE, ref_logits + 1e-3, atol=1e-5))
    assert _param_sums(engine) == before
    bad = StagedUpdate(engine, version=1)
    bad.add("model.layers.0.self_attn.q_proj.weight", torch.zeros(3, 3))
    assert "shape" in bad.problems[0]
    res = stage().commit(Probe(PROBE, ref_logits, atol=EXACT_TOL))
    assert res.ok and res.checksums_verified == len(new) and res.probe_max_abs_diff <= EXACT_TOL
    assert (_engine_logits(engine) - ref_logits).abs().max() <= EXACT_TOL
    assert _param_sums(engine) == {k: tensor_checksum(new[k]) for k in before}


def _every_param_shards():
    """``(model, tp, pp_rank, megatron name, arch, TP shards)`` of every parameter of the tiny Qwen2
    and Llama at TP 1, 2 and 4 (4 > num_kv_heads = 2: query groups split across ranks), both stages
    of PP = 2."""
    from megatron_smd.learner.convert import hf_to_megatron, local_param_names

    for name in ("qwen2", "llama"):
        arch = _arch(name)
        hf = _hf0(name)
        for tp in (1, 2, 4):
            for pp_rank in (0, 1):
                local = [hf_to_megatron(hf, arch, r, tp, pp_rank, 2) for r in range(tp)]
                for pname in local_param_names(arch, pp_rank, 2):
                    yield name, tp, pp_rank, pname, arch, [local[r][pname] for r in range(tp)]


def test_direct_conversion_equals_the_conversion_table():
    """The resharder converts straight into its destination (hf_pieces + write_pieces); the result
    must be byte for byte what the project's one conversion table gives (iter_hf_from_local), for
    every rule, at TP 1, 2 and 4 (4 > num_kv_heads = 2: query groups split across ranks), both PP
    stages, tied and untied embeddings, and when the destination has another dtype."""
    from megatron_smd.learner.convert import iter_hf_from_local
    from megatron_smd.sync.reshard import hf_pieces, write_pieces

    seen: dict[tuple, int] = {}
    for name, tp, pp_rank, pname, arch, shards in _every_param_shards():
        ref = list(iter_hf_from_local(pname, shards, arch, pp_rank=pp_rank, pp_size=2))
        got = hf_pieces(pname, shards, arch, pp_rank=pp_rank, pp_size=2)
        assert [n for n, _ in ref] == [n for n, _, _ in got], (name, tp, pname)
        seen.setdefault((name, tp, pp_rank), 0)
        for (hf_name, t), (_, shape, pieces) in zip(ref, got):
            assert tuple(t.shape) == tuple(shape), (hf_name, tp)
            out = write_pieces(torch.full(shape, float("nan")), pieces)
            assert torch.equal(out, t), (name, tp, pp_rank, hf_name)
            half = write_pieces(torch.empty(shape, dtype=torch.bfloat16), pieces)
            assert torch.equal(half, t.to(torch.bfloat16)), (hf_name, tp)
            seen[name, tp, pp_rank] += 1
    assert len(seen) == 2 * 3 * 2 and all(n > 0 for n in seen.values()), seen


def test_all_finite_is_exact_for_every_float_dtype():
    from megatron_smd.sync.checks import _all_finite_exact, all_finite

    g = torch.Generator().manual_seed(1)
    assert all_finite(torch.arange(10)) and all_finite(torch.empty(0))
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        fi = torch.finfo(dt)
        x = torch.cat([torch.randn(100_000, generator=g).to(dt),
                       torch.tensor([fi.max, -fi.max, fi.tiny, -fi.tiny, 0.0, -0.0, fi.smallest_normal / 4], dtype=dt)])
        assert all_finite(x) and _all_finite_exact(x), dt
        huge = torch.full((10,), fi.max, dtype=dt)  # finite, but its sum overflows: settled exactly
        assert all_finite(huge) and all_finite(-huge), dt
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        for v in (float("inf"), float("-inf"), float("nan"), -float("nan")):
            for pos in (0, 4_099, x.numel() - 1):
                y = x.clone()
                y[pos] = v
                assert not all_finite(y) and not _all_finite_exact(y), (dt, v, pos)
        y = x.clone()
        y.view(bits)[123] = -1  # all bits set: a negative NaN with a full payload
        assert not all_finite(y) and not _all_finite_exact(y), dt


def test_checksum_numpy_and_torch_paths_agree():
    """The CPU computes the checksum with torch and numpy (row and column sums, :class:`Checksum`),
    other devices with torch alone: the same integers."""
    from megatron_smd.sync.checks import _checksum_torch

    g = torch.Generator().manual_seed(2)
    for t in (torch.randn(3, generator=g), torch.randn(1_000_003, generator=g).bfloat16(),
              torch.randint(-(1 << 62), 1 << 62, (600_001,), generator=g), torch.arange(4096, dtype=torch.uint8)):
        assert tensor_checksum(t) == _checksum_torch(t.reshape(-1).view(torch.uint8)), t.dtype


def test_disk_index_names_its_checksum_algorithm(tmp_path):
    """A snapshot whose checksums were computed by another algorithm (an older version of this
    code) is refused with that reason, not as a 'checksum mismatch' of its first tensor."""
    from megatron_smd.sync.bucket import CHECKSUM_ALGORITHM
    from megatron_smd.sync.staging import stage_from_disk

    name = "qwen2"
    engine = _engine(name)
    hf = _hf0(name)
    b = Bucket(0, 0)
    for k, v in hf.items():
        b.add(k, v.contiguous())
    write_safetensors(tmp_path / "model-pp00-00000.safetensors", b)
    sums = {k: str(tensor_checksum(v)) for k, v in hf.items()}
    index = {"metadata": {"smd_sync_version": 3, "smd_checksums": sums, "smd_checksum_algorithm": CHECKSUM_ALGORITHM},
             "weight_map": {k: "model-pp00-00000.safetensors" for k in hf}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    res = stage_from_disk(engine, tmp_path).commit()
    assert res.ok and res.checksums_verified == len([k for k in hf if k != "lm_head.weight"])
    del index["metadata"]["smd_checksum_algorithm"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    from megatron_smd.sync.staging import WeightSyncError

    with pytest.raises(WeightSyncError, match="an earlier algorithm"):
        stage_from_disk(engine, tmp_path).commit()


# ================================================================================ multi-process
def _entry(idx: int, fn, args, env: dict, q) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo unless the job asks for a GPU
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        out = fn(*args)
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put((idx, "ok", buf.getvalue()))
    except BaseException:
        q.put((idx, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:
                pass


def _spawn(jobs: list[tuple], *, may_die: set[int], timeout: float) -> dict[int, object]:
    """Run ``jobs[i] = (fn, args, env)`` in spawned processes; processes in ``may_die`` may exit
    without a result (a receiver killed on purpose). Any error fails at once with its traceback."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(i, fn, args, env, q), daemon=True)
             for i, (fn, args, env) in enumerate(jobs)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    need = set(range(len(jobs))) - may_die

    try:
        while not need <= set(results):
            try:
                i, status, payload = q.get(timeout=timeout)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in results]
                raise AssertionError(f"no result within {timeout}s (exited without a result: {dead})") from None
            if status != "ok":
                raise AssertionError(f"process {i} failed:\n{payload}")
            results[i] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return results


def _two_free_ports() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free (the rendezvous of stage 0's and stage 1's group).

    Drawn below the kernel's ephemeral range (``ip_local_port_range``, 32768+ by default): a port
    picked by binding to 0 is an ephemeral one, which gloo's own connections can take meanwhile.
    """
    import random

    lo = 20000
    try:
        lo_eph = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lo_eph = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        p = rng.randrange(lo, max(lo + 100, lo_eph - 2))
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _profiled_peak(fn):
    """``fn()`` under the torch profiler; returns (result, peak bytes that the CPU allocator handed out
    during the call and that were alive at the same time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    # Bytes allocated during the session and still alive, at their peak. Frees of memory allocated
    # before the session (e.g. a buffer of the previous sync a backend released late) do not count
    # as savings: this is the gross figure, comparable with LiveBytes.
    live, peak, mine = 0, 0, {}
    for e in mem:
        nb, addr = e["args"]["Bytes"], e["args"]["Addr"]
        if nb > 0:
            mine[addr] = nb
            live += nb
            peak = max(peak, live)
        elif addr in mine:
            live -= mine.pop(addr)
    return out, peak


def _corrupting(base_cls):
    """Fault injection: a transport that flips one element of one tensor of bucket 1 of the last stage
    *after* the resharder took its checksum (what a bad link or a bad buffer would do), then hands the
    bucket to the real transport."""

    class Corrupting(base_cls):
        def send(self, ctx, bucket):
            if bucket.stage == ctx.num_stages - 1 and bucket.index == 1:
                # in place: the bucket is packed in the resharder's buffer (never a learner weight)
                assert bucket.flat is not None
                bucket.tensors[-1].view(-1)[0] += 0.5
            super().send(ctx, bucket)

    return Corrupting


def _learner_job(rank: int, bcast_ports: list[int], fail_port: int, tmp: str) -> dict:
    from megatron_smd.learner.learner import Learner, LearnerSettings
    from megatron_smd.learner.runner import MicroBatch
    from megatron_smd.parallel.layout import ParallelLayout
    from megatron_smd.sync import (BroadcastTransport, DiskTransport, InProcessTransport, WeightSync,
                                   WeightSyncError, latest_snapshot, learner_logits, stage_from_disk)

    t_start = time.perf_counter()
    out: dict = {"layouts": []}
    g = torch.Generator().manual_seed(0)
    for li, (name, tp, pp) in enumerate(LAYOUTS):
        t_layout = time.perf_counter()
        arch = _arch(name)
        layout = ParallelLayout(world_size=WORLD, tp=tp, pp=pp)
        layout.initialize(seed=0)
        learner = Learner(arch, layout, LearnerSettings(lr=1e-2, micro_batch_size=2), weights=_hf0(name))
        tokens = torch.randint(0, VOCAB, (2, 32), generator=g)
        mb = MicroBatch(tokens=tokens, position_ids=torch.arange(32).expand(2, 32).clone(),
                        targets=torch.roll(tokens, -1, 1))
        learner.step([mb], lambda logp, m: (-logp.sum() / logp.numel(), logp.numel()))
        L = learner_logits(learner.model, layout, arch, PROBE)
        res: dict = {"name": name, "tp": tp, "pp": pp, "reports": {}}
        engine = _engine(name) if rank == 0 else None
        if rank == 0:
            res["L"] = L
            res["before"] = float((_engine_logits(engine) - L).abs().max())
            if tp == 1 and pp == 1:  # the pipelined probe forward == a direct call of the model
                with torch.no_grad():
                    direct = learner.model(PROBE, torch.arange(16).expand(2, 16), None)[..., :VOCAB]
                res["probe_vs_direct"] = float((direct - L).abs().max())

        def check(kind, report, eng=engine):
            res["reports"][kind] = {"bytes": report.bytes, "tensors": report.tensors, "buckets": report.buckets,
                                    "verified": report.verified_checksums, "probe": report.probe_max_abs_diff,
                                    "peak_live": report.peak_live_bytes, "largest": report.largest_tensor_bytes}
            if rank == 0 and eng is not None:
                res["reports"][kind]["diff"] = float((_engine_logits(eng) - L).abs().max())
                eng.load_weights(_hf0(name))  # back to the old policy: the next transport starts from scratch

        kw = dict(bucket_bytes=BUCKET, verify=True)
        ws = WeightSync(learner.model, layout, arch, InProcessTransport(engine), **kw)
        check("inprocess", ws.sync(1, probe_tokens=PROBE))
        root = Path(tmp) / f"disk{li}"
        ws = WeightSync(learner.model, layout, arch, DiskTransport(root, engine=engine), **kw)
        check("disk", ws.sync(2, probe_tokens=PROBE))
        if rank == 0:
            res["disk_snapshot"] = str(latest_snapshot(root))
        tr = BroadcastTransport("127.0.0.1", bcast_ports[li], N_RX, backend="gloo", timeout_s=60)
        ws = WeightSync(learner.model, layout, arch, tr, **kw)
        check("broadcast", ws.sync(3, probe_tokens=PROBE), None)
        ws.verify = False  # memory: checksums add a bounded temporary (2^16-word chunks), measured without
        rep, peak = _profiled_peak(lambda: ws.sync(4))
        res["mem"] = {"peak_profiler": peak, "peak_live": rep.peak_live_bytes, "largest": rep.largest_tensor_bytes,
                      "sender": learner.layout.dp_rank == 0 and layout.tp_rank == 0}
        ws.close()

        if li == len(LAYOUTS) - 1:  # ---- failure semantics, at TP=2 x PP=2
            fails: dict = {}
            if rank == 0:
                engine.load_weights(_hf0(name))
                sums0 = _param_sums(engine)
            tr = _corrupting(InProcessTransport)(engine)
            ws = WeightSync(learner.model, layout, arch, tr, **kw)
            try:
                ws.sync(5)
                fails["corrupt"] = "no error"
            except WeightSyncError as e:
                fails["corrupt"] = (str(e), e.engine_state)
            if rank == 0:
                fails["corrupt_unchanged"] = _param_sums(engine) == sums0
                snap = Path(res["disk_snapshot"])
                shard = sorted(snap.glob("model-pp01-*.safetensors"))[0]
                data = bytearray(shard.read_bytes())
                data[-5] ^= 0x40  # one bit of the last tensor's data
                shard.write_bytes(bytes(data))
                try:
                    stage_from_disk(engine, snap).commit()
                    fails["disk"] = "no error"
                except WeightSyncError as e:
                    fails["disk"] = (str(e), e.engine_state)
                fails["disk_unchanged"] = _param_sums(engine) == sums0
            # a diverged learner: one NaN in stage 1's first layer -> refused, nothing sent to the engine
            w = dict(learner.model.named_parameters())["decoder.layers.0.mlp.linear_fc2.weight"]
            if layout.pp_rank == 1 and layout.tp_rank == 1:
                saved = w.data.view(-1)[7].item()
                w.data.view(-1)[7] = float("nan")
            try:
                WeightSync(learner.model, layout, arch, InProcessTransport(engine), **kw).sync(7)
                fails["nan"] = "no error"
            except WeightSyncError as e:
                fails["nan"] = (str(e), e.engine_state)
            if layout.pp_rank == 1 and layout.tp_rank == 1:
                w.data.view(-1)[7] = saved
            if rank == 0:
                fails["nan_unchanged"] = _param_sums(engine) == sums0
            tr = BroadcastTransport("127.0.0.1", fail_port, N_RX, backend="gloo", timeout_s=60)
            ws = WeightSync(learner.model, layout, arch, tr, **kw)
            t0 = time.perf_counter()
            try:
                ws.sync(6)
                fails["dead_rx"] = "no error"
            except WeightSyncError as e:
                fails["dead_rx"] = (str(e), e.engine_state)
            fails["dead_rx_seconds"] = time.perf_counter() - t0
            ws.close()
            res["fails"] = fails
        res["seconds"] = time.perf_counter() - t_layout
        out["layouts"].append(res)
        layout.destroy(process_group=False)
    out["seconds"] = time.perf_counter() - t_start
    return out


def _receiver_job(rank: int, bcast_ports: list[int], fail_port: int) -> dict:
    from megatron_smd.sync import BroadcastReceiver, WeightSyncError

    out: dict = {"layouts": []}
    for li, (name, tp, pp) in enumerate(LAYOUTS):
        engine = _engine(name)
        rx = BroadcastReceiver(engine, master_address="127.0.0.1", master_port=bcast_ports[li], num_stages=pp,
                               rank=rank, world_size=1 + N_RX, timeout_s=60)
        n = rx.serve()
        out["layouts"].append({"committed": n, "logits": _engine_logits(engine)})
        rx.close()
    name, _, pp = LAYOUTS[-1]
    engine = _engine(name)
    sums0 = _param_sums(engine)
    seen = []

    def die_on_second_bucket_of_stage1(h):
        seen.append((h["stage"], h["index"]))
        if rank == N_RX and h["stage"] == 1 and h["index"] == 1:
            os._exit(3)  # a receiver crash mid-sync

    rx = BroadcastReceiver(engine, master_address="127.0.0.1", master_port=fail_port, num_stages=pp, rank=rank,
                           world_size=1 + N_RX, timeout_s=60, on_bucket=die_on_second_bucket_of_stage1)
    try:
        r = rx.receive()
        out["fail"] = ("returned", None if r is None else (r.ok, r.message))
    except WeightSyncError as e:
        out["fail"] = ("raised", str(e), e.engine_state)
    out["fail_unchanged"] = _param_sums(engine) == sums0
    out["fail_seen"] = seen
    rx.close()
    return out


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("sync"))
    learner_port = free_port()
    ports = set()
    while len(ports) < len(LAYOUTS) + 1:  # distinct pairs
        p = _two_free_ports()
        if not ({p, p + 1} & {q for x in ports for q in (x, x + 1)}):
            ports.add(p)
    *bcast_ports, fail_port = sorted(ports)
    env = dict(WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(learner_port))
    jobs = [(_learner_job, (r, bcast_ports, fail_port, tmp), {**env, "RANK": str(r), "LOCAL_RANK": str(r)})
            for r in range(WORLD)]
    jobs += [(_receiver_job, (k, bcast_ports, fail_port), {}) for k in range(1, N_RX + 1)]
    res = _spawn(jobs, may_die={WORLD + N_RX - 1}, timeout=240)
    return {"learners": [res[r] for r in range(WORLD)], "receivers": [res.get(WORLD + k) for k in range(N_RX)]}


@pytest.mark.slow
def test_engine_logits_equal_learner_after_sync(sync_run):
    rank0 = sync_run["learners"][0]["layouts"]
    print(f"learner rank 0: {sync_run['learners'][0]['seconds']:.1f}s in the worker, per layout " +
          ", ".join(f"{lay['seconds']:.1f}s" for lay in rank0))
    for li, lay in enumerate(rank0):
        where = f"{lay['name']} tp={lay['tp']} pp={lay['pp']}"
        print(f"{where}: engine vs learner before sync {lay['before']:.3g}; after: " +
              ", ".join(f"{k} {v['diff']:.2g}" for k, v in lay["reports"].items() if "diff" in v))
        assert lay["before"] > 1e-3, f"{where}: the optimizer step did not move the learner away from the engine"
        if "probe_vs_direct" in lay:
            assert lay["probe_vs_direct"] <= 1e-6
        for kind in ("inprocess", "disk"):
            assert lay["reports"][kind]["diff"] <= EXACT_TOL, (where, kind, lay["reports"][kind])
        for kind, rep in lay["reports"].items():
            arch = _arch(lay["name"])
            n_hf = len(init_weights(arch, seed=0))
            assert rep["tensors"] == n_hf, (where, kind, rep)  # every HF tensor exactly once
            assert rep["verified"] == n_hf, (where, kind, rep)
            assert rep["probe"] is not None and rep["probe"] <= EXACT_TOL, (where, kind, rep)
            assert rep["buckets"] >= 2 * lay["pp"]
        for r, other in enumerate(sync_run["learners"]):  # the same report on every rank, DP replicas included
            theirs = {k: {f: v for f, v in rep.items() if f != "diff"}
                      for k, rep in other["layouts"][li]["reports"].items()}
            ours = {k: {f: v for f, v in rep.items() if f != "diff"} for k, rep in lay["reports"].items()}
            assert theirs == ours, (where, r)
        # broadcast: the verdict came from both receiver engines (probe <= 1e-5 on each, checked above);
        # the surviving receiver's engine, in its own process, is also compared directly
        for rx in sync_run["receivers"]:
            if rx is not None:
                got = rx["layouts"][li]
                assert got["committed"] == 2  # the verified sync and the memory-profiled one
                diff = float((got["logits"] - lay["L"]).abs().max())
                print(f"{where}: broadcast receiver engine vs learner {diff:.2g}")
                assert diff <= EXACT_TOL, (where, diff)


@pytest.mark.slow
def test_sender_peak_memory_within_two_buckets(sync_run):
    for r, lr in enumerate(sync_run["learners"]):
        for lay in lr["layouts"]:
            m = lay["mem"]
            if not m["sender"]:
                continue
            print(f"rank {r} {lay['name']} tp={lay['tp']} pp={lay['pp']}: "
                  f"peak extra {m['peak_profiler'] / 1024:.0f} KiB "
                  f"(profiler), {m['peak_live'] / 1024:.0f} KiB (LiveBytes); bucket {BUCKET // 1024} KiB, largest "
                  f"tensor {m['largest'] / 1024:.0f} KiB")
            assert 2 * m["largest"] <= BUCKET
            assert m["peak_live"] <= 2 * BUCKET
            assert m["peak_profiler"] <= 2 * BUCKET, (r, lay["tp"], lay["pp"], m)
            assert abs(m["peak_profiler"] - m["peak_live"]) <= 32 * 1024, (r, lay["tp"], lay["pp"], m)


@pytest.mark.slow
def test_failures_leave_engine_on_previous_weights(sync_run):
    fails = [lr["layouts"][-1]["fails"] for lr in sync_run["learners"]]
    for r, f in enumerate(fails):
        msg, state = f["corrupt"]
        assert state == "previous" and "checksum mismatch" in msg, (r, msg)
        msg, state = f["nan"]
        assert state == "previous", (r, msg)
        assert "non-finite learner weights (model.layers.2.mlp.down_proj.weight" in msg, (r, msg)
        msg, state = f["dead_rx"]
        assert "died" in msg or "failed" in msg, (r, msg)
        assert f["dead_rx_seconds"] < 30, f"rank {r} took {f['dead_rx_seconds']:.1f}s to notice the dead receiver"
    print("corrupted bucket ->", fails[0]["corrupt"][0][:300])
    print("dead receiver ->", fails[0]["dead_rx"][0][:300])
    print("NaN in the learner ->", fails[0]["nan"][0][:300])
    assert fails[0]["corrupt_unchanged"] and fails[0]["disk_unchanged"] and fails[0]["nan_unchanged"]
    msg, state = fails[0]["disk"]
    assert state == "previous" and "checksum mismatch" in msg, msg
    survivor = sync_run["receivers"][0]
    assert sync_run["receivers"][1] is None  # the crashed one never reported
    print("surviving receiver ->", survivor["fail"])
    assert survivor["fail_unchanged"], survivor["fail"]
    # it had staged all of stage 0 and part of stage 1 when the other receiver died: nothing committed
    assert (0, 0) in survivor["fail_seen"] and (1, 0) in survivor["fail_seen"], survivor["fail_seen"]
    assert survivor["fail"][0] == "raised" or not survivor["fail"][1][0]


def _repeat_sync_job(port: int, tmp: str) -> dict:
    """One learner rank (TP=PP=1): repeated syncs through the kept engine-side buffers."""
    from megatron_smd.learner.learner import Learner, LearnerSettings
    from megatron_smd.parallel.layout import ParallelLayout
    from megatron_smd.sync import (BroadcastTransport, InProcessTransport, WeightSync, WeightSyncError,
                                   learner_logits)

    import megatron_smd.sync.bucket as bucket_mod

    # every tensor of >= 1 KiB is written, checked and committed in two halves on two threads (the
    # path large models take; the tiny model's tensors would all stay below the real threshold)
    bucket_mod.SPLIT_BYTES = 1024
    name = "qwen2"
    arch = _arch(name)
    layout = ParallelLayout(world_size=1)
    layout.initialize(seed=0)
    learner = Learner(arch, layout, LearnerSettings(lr=1e-2, micro_batch_size=2), weights=_hf0(name))
    engine = _engine(name)
    tr = InProcessTransport(engine)
    from megatron_smd.learner.convert import megatron_to_hf

    out: dict = {"diffs": [], "slot_ptrs": [], "bitwise": []}
    params = dict(learner.model.named_parameters())
    g = torch.Generator().manual_seed(5)
    for k, verify in enumerate((False, True, False)):
        with torch.no_grad():
            for p in params.values():  # new weights every time: a stale or shared buffer would show
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype), alpha=1e-3)
        ws = WeightSync(learner.model, layout, arch, tr, bucket_bytes=BUCKET, verify=verify)
        rep = ws.sync(k + 1)
        L = learner_logits(learner.model, layout, arch, PROBE)
        out["diffs"].append(float((_engine_logits(engine) - L).abs().max()))
        want = megatron_to_hf({(0, 0): {n: p.detach() for n, p in params.items()}}, arch, 1, 1)
        have = dict(engine.model.named_parameters())
        out["bitwise"].append(all(torch.equal(have[n], t) for n, t in want.items() if n in have))
        live = sorted(t.data_ptr() for t in tr._live._slots.values())  # the engine's parameters are views of these
        out["slot_ptrs"].append(live)
        out.setdefault("params_in_slots", []).append({p.data_ptr() for p in have.values()} <= set(live))
        out.setdefault("verified", []).append(rep.verified_checksums)
        out.setdefault("phases", []).append(sorted(rep.phases))
    # a NaN without verify (the finiteness check then runs on the helper thread) and with it
    sums0 = _param_sums(engine)
    w = params["decoder.layers.1.self_attention.linear_proj.weight"]
    out["nan"] = []
    for verify, at in ((False, -5), (True, 5)):  # in the half the helper thread writes, then the other
        with torch.no_grad():
            saved = float(w.view(-1)[at])
            w.view(-1)[at] = float("nan")
        try:
            WeightSync(learner.model, layout, arch, tr, bucket_bytes=BUCKET, verify=verify).sync(9)
            out["nan"].append(("no error", None))
        except WeightSyncError as e:
            out["nan"].append((str(e), e.engine_state))
        with torch.no_grad():
            w.view(-1)[at] = saved
    out["nan_unchanged"] = _param_sums(engine) == sums0
    # the raw-broadcast floor over a live group, then a sync, then shutdown
    btr = BroadcastTransport("127.0.0.1", port, 1, backend="gloo", timeout_s=60)
    ws = WeightSync(learner.model, layout, arch, btr, bucket_bytes=BUCKET)
    ws.sync(10)
    out["wire"] = btr.wire_seconds(1 << 20, 2)
    out["after_wire"] = ws.sync(11).buckets
    ws.close()
    out["L"] = learner_logits(learner.model, layout, arch, PROBE)
    layout.destroy()
    return out


def _repeat_receiver_job(port: int) -> dict:
    from megatron_smd.sync import BroadcastReceiver

    engine = _engine("qwen2")
    rx = BroadcastReceiver(engine, master_address="127.0.0.1", master_port=port, num_stages=1, rank=1,
                           world_size=2, timeout_s=60)
    n = rx.serve()
    rx.close()
    return {"committed": n, "logits": _engine_logits(engine), "phases": sorted(rx.last_result.phases)}


@pytest.mark.slow
def test_kept_buffers_repeated_syncs_and_wire(tmp_path):
    """Syncs reuse the engine side's kept buffers (two sets, in turn) and still leave the
    engine exactly on the learner's current weights, with tensors written, checked and committed
    in halves on two threads; a NaN is refused with and without checksums (the engine
    bit-identical); the raw-broadcast 'wire' message works between syncs."""
    port = _two_free_ports()
    env = dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    res = _spawn([(_repeat_sync_job, (port, str(tmp_path)), env), (_repeat_receiver_job, (port,), {})],
                 may_die=set(), timeout=240)
    lr, rx = res[0], res[1]
    assert lr["bitwise"] == [True, True, True]  # the engine holds exactly the learner's HF tensors
    assert all(d <= EXACT_TOL for d in lr["diffs"]), lr["diffs"]
    # the commit adopts the slots: the engine's parameters alternate between two kept sets (never
    # written while live), the same two sets every time
    assert lr["slot_ptrs"][0] and lr["slot_ptrs"][0] == lr["slot_ptrs"][2]
    assert not set(lr["slot_ptrs"][0]) & set(lr["slot_ptrs"][1]) and lr["params_in_slots"] == [True] * 3
    n_hf = len(init_weights(_arch("qwen2"), seed=0))
    assert lr["verified"] == [0, n_hf, 0]
    assert {"convert", "finite", "engine.commit"} <= set(lr["phases"][0])
    # one checksum pass: taken by the sender on the engine's own arena, it is the engine's record too
    assert "checksum" in lr["phases"][1] and "engine.verify" not in lr["phases"][1]
    for msg, state in lr["nan"]:
        assert state == "previous" and "non-finite learner weights (model.layers.1.self_attn.o_proj.weight" in msg, msg
    assert lr["nan_unchanged"]
    assert len(lr["wire"]) == 2 and all(s > 0 for s in lr["wire"]) and lr["after_wire"] >= 2
    assert rx["committed"] == 2
    assert float((rx["logits"] - lr["L"]).abs().max()) <= EXACT_TOL
    assert {"recv", "stage", "commit"} <= set(rx["phases"])


# ============================================== pieces, adopting commits, recycled snapshots
def test_tensors_are_written_and_checked_in_row_aligned_pieces():
    """The resharder writes a tensor in pieces (``plan_chunks``) and checks each piece right after writing
    it. The pieces must tile the tensor's bytes in order, each starting on a checksum row, and each
    be written entirely by its own copies: after piece k, the bytes up to its end hold their final
    value and nothing beyond it was touched (so a check of the piece sees the final bytes). Every
    rule, TP 1, 2 and 4, both stages; and tensors of every kind are really cut."""
    from megatron_smd.sync.bucket import ROW_BYTES
    from megatron_smd.sync.pieces import hf_pieces, plan_chunks, write_pieces

    cut = set()
    for name, tp, pp_rank, pname, arch, shards in _every_param_shards():
        for hf_name, shape, pieces in hf_pieces(pname, shards, arch, pp_rank=pp_rank, pp_size=2):
            want = write_pieces(torch.empty(shape), pieces).reshape(-1).view(torch.uint8)
            dest = torch.full(shape, float("nan"))
            untouched = dest.clone().reshape(-1).view(torch.uint8)
            raw = dest.reshape(-1).view(torch.uint8)
            plan = plan_chunks(dest, pieces, 2 * ROW_BYTES)
            assert plan[0][0] == 0 and plan[-1][1] == raw.numel(), hf_name
            for k, (lo, hi, copies) in enumerate(plan):
                assert lo % ROW_BYTES == 0 and (k == 0 or plan[k - 1][1] == lo), (hf_name, k)
                for d, src in copies:
                    d.copy_(src)
                assert torch.equal(raw[:hi], want[:hi]), (name, tp, hf_name, k)
                assert torch.equal(raw[hi:], untouched[hi:]), (name, tp, hf_name, k)
            if len(plan) > 1:
                cut.add(hf_name.split(".")[-2])
    assert {"embed_tokens", "q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= cut, cut


def test_checksum_taken_in_pieces_in_any_order():
    """:class:`Checksum` fed row-aligned pieces in any order, from two threads at once, gives
    :func:`tensor_checksum`; a piece that does not start on a row, or a short one that does not
    end the bytes, is refused."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from megatron_smd.sync.bucket import ROW_BYTES, Checksum

    g = torch.Generator().manual_seed(4)
    t = torch.randn(300_001, generator=g)
    b = t.view(torch.uint8)
    n = b.numel()
    pieces = [(lo, min(lo + 3 * ROW_BYTES, n)) for lo in range(0, n, 3 * ROW_BYTES)]
    random.Random(0).shuffle(pieces)
    ck = Checksum(n)
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda p: ck.update(b[p[0]:p[1]], p[0]), pieces))
    assert ck.value() == tensor_checksum(t)
    with pytest.raises(ValueError, match="row-aligned"):
        Checksum(n).update(b[8:8 + ROW_BYTES], 8)
    with pytest.raises(ValueError, match="row-aligned"):
        Checksum(n).update(b[:100], 0)


def test_arena_plan_writes_checks_and_sums_every_tensor_like_one_by_one(monkeypatch):
    """The in-process engine's arena (:mod:`megatron_smd.sync.arena`): tensors of every size (under a
    row, not a multiple of a row, several chunks), two dtypes and converted pieces (QKV de-interleave,
    gate / up halves) are written into one buffer by two threads sharing chunks, bit-identical to the
    conversion; every tensor's flat checksum equals :func:`tensor_checksum` of that tensor; the gaps
    stay zero; a NaN in a small tensor that shares its chunk with others, and one in a large tensor,
    each mark exactly their tensor; the kept arena (and the plan
    kept with it) is reused, and laid out anew (the plan dropped) when the tensors change."""
    from megatron_smd.sync.arena import ArenaPlan, FlatChecksums
    from megatron_smd.sync.bucket import ROW_BYTES
    from megatron_smd.sync.pieces import hf_pieces, write_pieces
    from megatron_smd.sync.share import Helper
    from megatron_smd.sync.staging import ShadowBuffers

    g = torch.Generator().manual_seed(7)
    arch = tiny_arch("qwen2", vocab_size=VOCAB, pad_token_id=None)
    entries = []  # (name, shape, dtype, pieces)
    for pname, shape in [("decoder.layers.0.self_attention.linear_qkv.weight", (2 * 64 + 2 * 2 * 16 * 2, 64)),
                         ("decoder.layers.0.mlp.linear_fc1.weight", (2 * 176, 64))]:
        src = torch.randn(arch.num_heads * arch.head_dim + 2 * arch.num_kv_heads * arch.head_dim, arch.hidden_size,
                          generator=g) if "qkv" in pname else torch.randn(2 * arch.intermediate_size,
                                                                           arch.hidden_size, generator=g)
        for h, sh, pcs in hf_pieces(pname, [src], arch, pp_rank=0, pp_size=1):
            entries.append((h, tuple(sh), torch.float32, pcs))
    for k, (n, dt) in enumerate([(1, torch.float32), (1024, torch.float32), (17, torch.float32),
                                 (300, torch.bfloat16), (2049, torch.bfloat16), (70_001, torch.float32),
                                 (5000, torch.float32)]):
        src = torch.randn(n, generator=g).to(dt)
        entries.append((f"t{k}", (n,), dt, [(None, src)]))
    bufs = ShadowBuffers()
    import megatron_smd.sync.staging as staging  # memory with stale bytes: the gaps must still read as zero

    monkeypatch.setattr(staging, "empty_bytes", lambda n, device="cpu": torch.full((n,), 0xAB, dtype=torch.uint8))
    arena, slots = bufs.arena([(h, sh, dt) for h, sh, dt, _ in entries], torch.device("cpu"))
    plan = ArenaPlan(slots, [e[3] for e in entries], arena, 4 * ROW_BYTES)
    big = [e[0] for e in entries].index("t5")
    assert any(len(c.tensors) > 2 for c in plan.chunks) and sum(c.tensors == [big] for c in plan.chunks) > 2
    helper = Helper()
    try:
        ck = FlatChecksums(plan)
        finite = plan.run(helper.run, check_finite=True, checksums=ck)
        assert finite == [True] * len(entries)
        for (h, sh, dt, pcs), slot, a in zip(entries, slots, ck.values()):
            assert torch.equal(slot, write_pieces(torch.empty(sh, dtype=dt), pcs)), h
            assert a == tensor_checksum(slot), h
        used = torch.zeros(arena.numel(), dtype=torch.bool)
        for s in slots:
            o = s.data_ptr() - arena.data_ptr()
            used[o:o + s.numel() * s.element_size()] = True
        assert int(arena[~used].count_nonzero()) == 0
        bad = [[e[0] for e in entries].index(n) for n in ("t0", "t5")]  # in a chunk of several; over several
        for k in bad:
            entries[k][3][0][1].view(-1)[-1] = float("nan")
        finite = plan.run(helper.run, check_finite=True)
        assert [k for k, f in enumerate(finite) if not f] == bad
    finally:
        helper.close()
    assert bufs.plan("k", lambda: plan) is plan and bufs.plan("k", lambda: 1 / 0) is plan  # kept while the key holds
    again, slots2 = bufs.arena([(h, sh, dt) for h, sh, dt, _ in entries], torch.device("cpu"))
    assert again.data_ptr() == arena.data_ptr() and all(a is b for a, b in zip(slots, slots2))
    assert bufs.plan("k", lambda: plan) is plan and bufs.plan("k2", lambda: "new") == "new"
    other, _ = bufs.arena([(h, sh, dt) for h, sh, dt, _ in entries[1:]], torch.device("cpu"))
    assert bufs.plan("k2", lambda: "anew") == "anew"  # a new layout drops the kept plan
    assert other.data_ptr() != arena.data_ptr() and bufs.slot("t0", (1,), torch.float32, "cpu") is not None


def test_adopting_commit_swaps_storage_keeps_ties_and_refusals_untouched():
    """``commit(adopt=True)`` (the broadcast receiver's double-buffered commit) makes the staged
    tensors the engine's parameters (the same parameter objects, the tied output layer still the
    embedding) with the new policy's logits; a refused one changes nothing, not even storage."""
    from megatron_smd.model.transformer import RefTransformer
    from megatron_smd.sync.staging import StagedUpdate, WeightSyncError

    name = "qwen2"
    engine = _engine(name)
    params = dict(engine.model.named_parameters())
    ptrs0, sums0 = {n: p.data_ptr() for n, p in params.items()}, _param_sums(engine)
    new = {k: v + 0.01 for k, v in init_weights(_arch(name), seed=4, std=0.1).items()}
    staged = {k: v.clone() for k, v in new.items()}
    st = StagedUpdate(engine, version=1)
    for k, v in staged.items():
        st.add(k, v, copy=False)
    st.problem("refused on purpose")
    with pytest.raises(WeightSyncError, match="refused on purpose"):
        st.commit(adopt=True)
    assert _param_sums(engine) == sums0 and {n: p.data_ptr() for n, p in params.items()} == ptrs0
    st = StagedUpdate(engine, version=2)
    for k, v in staged.items():
        st.add(k, v, copy=False)
    assert st.commit(adopt=True).ok
    for n, p in engine.model.named_parameters():
        assert p is params[n] and p.data_ptr() == staged[n].data_ptr(), n
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    with torch.no_grad():
        ref = RefTransformer.from_state_dict(_arch(name), new)(PROBE).float()
    assert torch.equal(_engine_logits(engine), ref)


def _cycle_learner_job(port: int, tmp: str) -> dict:
    """One learner rank (TP=PP=1), weights changed before every sync: broadcast syncs in 96 KiB
    buckets (the embedding and the MLP matrices, over half a bucket, travel as buckets of their
    own straight from the learner's parameters, the attention output projection as a segment of a
    packed bucket), the third refused (a NaN); then disk syncs with keep=1."""
    from megatron_smd.learner.convert import megatron_to_hf
    from megatron_smd.learner.learner import Learner, LearnerSettings
    from megatron_smd.parallel.layout import ParallelLayout
    from megatron_smd.sync import (BroadcastTransport, DiskTransport, WeightSync, WeightSyncError, latest_snapshot,
                                   learner_logits)

    import megatron_smd.sync.reshard as reshard_mod
    import megatron_smd.sync.transports.disk as disk_mod

    reshard_mod.MIN_SEGMENT_BYTES = 4096  # the tiny model's views of >= 4 KiB travel as segments
    disk_mod.SPLIT_SHARD_BYTES = 32 << 10  # buckets of >= 32 KiB are written as two shards at once
    name = "qwen2"
    arch = _arch(name)
    layout = ParallelLayout(world_size=1)
    layout.initialize(seed=0)
    learner = Learner(arch, layout, LearnerSettings(lr=1e-2, micro_batch_size=2), weights=_hf0(name))
    params = dict(learner.model.named_parameters())
    g = torch.Generator().manual_seed(6)

    def bump():
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype), alpha=1e-3)

    def hf_now():
        return megatron_to_hf({(0, 0): {n: p.detach() for n, p in params.items()}}, arch, 1, 1)

    out: dict = {"bcast": [], "disk": []}
    ws = WeightSync(learner.model, layout, arch, BroadcastTransport("127.0.0.1", port, 1, backend="gloo",
                                                                     timeout_s=60), bucket_bytes=96 << 10)
    w = params["decoder.layers.2.mlp.linear_fc1.weight"]
    for k in range(5):
        bump()
        before = {n: p.detach().clone() for n, p in params.items()}
        if k == 2:
            with torch.no_grad():
                w.view(-1)[11] = float("nan")
        try:
            rep = ws.sync(k + 1)
            out["bcast"].append({"ok": True, "peak": rep.peak_live_bytes, "buckets": rep.buckets})
        except WeightSyncError as e:
            out["bcast"].append({"ok": False, "error": str(e), "state": e.engine_state})
        out["bcast"][-1]["learner_untouched"] = k == 2 or all(torch.equal(p.detach(), before[n])
                                                              for n, p in params.items())
        if k == 2:
            with torch.no_grad():
                w.view(-1)[11] = before["decoder.layers.2.mlp.linear_fc1.weight"].view(-1)[11]
        out["bcast"][-1]["L"] = learner_logits(learner.model, layout, arch, PROBE)
    ws.close()
    engine = _engine(name)
    root = Path(tmp) / "disk"
    tr = DiskTransport(root, engine=engine, keep=1)
    held = []  # open files of the first snapshot: their inode numbers cannot be handed out again
    for k in range(5):
        bump()
        ws = WeightSync(learner.model, layout, arch, tr, bucket_bytes=(96 << 10) if k < 4 else (1 << 20))
        ws.sync(k + 1)
        tr.wait()
        snap = latest_snapshot(root)
        index = json.loads((snap / "model.safetensors.index.json").read_text())
        have = dict(engine.model.named_parameters())
        out["disk"].append({"snapshot": snap.name, "root": sorted(p.name for p in root.iterdir()),
                            "files": sorted(p.name for p in snap.iterdir()),
                            "indexed": sorted(set(index["weight_map"].values())),
                            "inodes": {p.name: p.stat().st_ino for p in snap.glob("*.safetensors")},
                            "bitwise": all(torch.equal(have[n], t) for n, t in hf_now().items() if n in have)})
        if k == 0:
            held = [open(f, "rb") for f in snap.glob("*.safetensors")]
    for f in held:
        f.close()
    # a shard corrupted on disk between its write and the engine's read of it (verify on): refused,
    # the engine bit-identical to before; the next sync is taken
    sums0, real = _param_sums(engine), disk_mod.write_safetensors

    def flipping(path, bucket, *a, **k):
        n = real(path, bucket, *a, **k)
        if bucket.index == 1:
            with open(path, "r+b") as fh:
                fh.seek(-3, os.SEEK_END)
                b = fh.read(1)
                fh.seek(-3, os.SEEK_END)
                fh.write(bytes([b[0] ^ 0x10]))
        return n

    bump()
    disk_mod.write_safetensors = flipping
    try:
        WeightSync(learner.model, layout, arch, tr, bucket_bytes=96 << 10, verify=True).sync(6)
        out["disk_corrupt"] = ("no error", None)
    except WeightSyncError as e:
        out["disk_corrupt"] = (str(e), e.engine_state)
    finally:
        disk_mod.write_safetensors = real
    out["disk_corrupt_unchanged"] = _param_sums(engine) == sums0
    # a NaN in the learner: the writer threads' test refuses it, nothing is published
    latest = (root / "LATEST").read_text()
    with torch.no_grad():
        saved = float(w.view(-1)[11])
        w.view(-1)[11] = float("nan")
    try:
        WeightSync(learner.model, layout, arch, tr, bucket_bytes=96 << 10).sync(8)
        out["disk_nan"] = ("no error", None)
    except WeightSyncError as e:
        out["disk_nan"] = (str(e), e.engine_state)
    with torch.no_grad():
        w.view(-1)[11] = saved
    out["disk_nan_unchanged"] = _param_sums(engine) == sums0 and (root / "LATEST").read_text() == latest
    WeightSync(learner.model, layout, arch, tr, bucket_bytes=96 << 10, verify=True).sync(9)
    have = dict(engine.model.named_parameters())
    out["disk_after"] = all(torch.equal(have[n], t) for n, t in hf_now().items() if n in have)
    layout.destroy()
    return out


def _cycle_receiver_job(port: int) -> dict:
    from megatron_smd.sync import BroadcastReceiver

    engine = _engine("qwen2")
    out: dict = {"syncs": [], "aliased": [], "segments": []}
    rx = None

    def on_bucket(hdr):  # the buffers being received into never back the live weights
        live = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
        recv = {b.untyped_storage().data_ptr() for b in rx.buffers._recv.values()}
        out["aliased"].append(bool(live & recv))
        out["segments"].append(len(hdr.get("segments") or [hdr["nbytes"]]))

    rx = BroadcastReceiver(engine, master_address="127.0.0.1", master_port=port, num_stages=1, rank=1,
                           world_size=2, timeout_s=60, on_bucket=on_bucket)
    while (res := rx.receive()) is not None:
        out["syncs"].append({"ok": res.ok, "logits": _engine_logits(engine), "sums": _param_sums(engine),
                             "storage": sorted({p.untyped_storage().data_ptr() for p in engine.model.parameters()})})
    rx.close()
    return out


@pytest.mark.slow
def test_double_buffered_receiver_and_recycled_disk_snapshots(tmp_path):
    """Broadcast: every sync leaves the receiver's engine on the learner's current policy; its
    parameters alternate between two sets of receive buffers (never received into while live); a
    refused sync (a NaN) leaves them where they were; tensors sent straight from the learner's
    parameters leave the learner untouched and the sender's extra memory within a bucket. Disk
    (keep=1): the third sync writes into the first one's files and the fourth into the second's
    (same inodes; the first snapshot's files are held open, so a deleted one's inode number could
    not come back), only the newest snapshot and the spare remain, the engine is bit-identical to
    the learner every time (buckets written as two shards at once on two threads, each read by the
    engine right after it is written); fewer, larger shards leave no stale file behind; a shard
    corrupted on disk between its write and the engine's read is refused (verify), and so is a NaN
    in the learner (tested by the writer threads), nothing published and the engine bit-identical
    both times; the next sync is taken."""
    port = _two_free_ports()
    env = dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    res = _spawn([(_cycle_learner_job, (port, str(tmp_path)), env), (_cycle_receiver_job, (port,), {})],
                 may_die=set(), timeout=240)
    lr, rx = res[0], res[1]
    assert [s["ok"] for s in lr["bcast"]] == [True, True, False, True, True]
    assert "non-finite" in lr["bcast"][2]["error"] and lr["bcast"][2]["state"] == "previous"
    assert all(s["learner_untouched"] for s in lr["bcast"])
    assert all(s["peak"] <= 96 << 10 for s in lr["bcast"] if s["ok"])
    assert [s["ok"] for s in rx["syncs"]] == [True, True, False, True, True]
    for k, (mine, theirs) in enumerate(zip(lr["bcast"], rx["syncs"])):
        if mine["ok"]:
            assert float((theirs["logits"] - mine["L"]).abs().max()) <= EXACT_TOL, k
    assert rx["syncs"][2]["sums"] == rx["syncs"][1]["sums"]  # refused: untouched
    a, b = rx["syncs"][0]["storage"], rx["syncs"][1]["storage"]
    assert a and b and not set(a) & set(b)
    assert [s["storage"] for s in rx["syncs"]] == [a, b, b, a, b]
    assert rx["aliased"] and not any(rx["aliased"])
    assert max(rx["segments"]) > 1  # some buckets went in segments (packed tensors and views)
    d = lr["disk"]
    assert all(s["bitwise"] for s in d)
    assert d[2]["inodes"] == d[0]["inodes"] and d[3]["inodes"] == d[1]["inodes"]
    assert not set(d[0]["inodes"].values()) & set(d[1]["inodes"].values())
    assert d[3]["root"] == sorted([".spare", "LATEST", d[3]["snapshot"]])
    assert any(f.endswith("-1.safetensors") for f in d[0]["indexed"])  # buckets written as two shards at once
    assert len(d[4]["indexed"]) < len(d[3]["indexed"])
    msg, state = lr["disk_corrupt"]
    assert state == "previous" and "checksum mismatch" in msg, msg
    assert lr["disk_corrupt_unchanged"] and lr["disk_after"]
    msg, state = lr["disk_nan"]
    assert state == "previous" and "non-finite learner weights (model.layers.2.mlp.gate_proj.weight" in msg, msg
    assert lr["disk_nan_unchanged"]
    assert d[4]["files"] == sorted(d[4]["indexed"] + ["config.json", "model.safetensors.index.json"])


# ================================================================================== config
def test_from_config_builds_transports_and_names_missing_settings(tmp_path):
    from megatron_smd.config import SyncConfig
    from megatron_smd.errors import ConfigError
    from megatron_smd.sync import BroadcastTransport, DiskTransport, InProcessTransport, WeightSync

    arch = _arch("qwen2")
    ws = WeightSync.from_config(SyncConfig(), None, None, arch, engine="E")
    assert isinstance(ws.transport, InProcessTransport) and ws.bucket_bytes == 512 << 20 and not ws.verify
    ws = WeightSync.from_config(SyncConfig(transport="disk", dir=str(tmp_path), bucket_mb=8, verify=True), None,
                                None, arch)
    assert isinstance(ws.transport, DiskTransport) and ws.bucket_bytes == 8 << 20 and ws.verify
    ws = WeightSync.from_config(SyncConfig(transport="broadcast"), None, None, arch,
                                broadcast=dict(master_address="127.0.0.1", master_port=29650, num_engine_ranks=2,
                                               backend="gloo"))
    assert isinstance(ws.transport, BroadcastTransport) and ws.transport.num_engine_ranks == 2
    with pytest.raises(ConfigError, match="sync.dir"):
        WeightSync.from_config(SyncConfig(transport="disk"), None, None, arch)
    with pytest.raises(ConfigError, match="num_engine_ranks"):
        WeightSync.from_config(SyncConfig(transport="broadcast"), None, None, arch)
    with pytest.raises(ConfigError, match="URL"):
        WeightSync.from_config(SyncConfig(transport="sglang"), None, None, arch)


# ================================================================================== GPU: SGLang
def _sglang_learner_job(model_dir: str, url: str, mode: str) -> dict:
    from megatron_smd.learner.learner import Learner, LearnerSettings
    from megatron_smd.learner.runner import MicroBatch
    from megatron_smd.model.hf import read_arch
    from megatron_smd.parallel.layout import ParallelLayout
    from megatron_smd.sync import SGLangTransport, WeightSync, learner_logits

    arch = read_arch(model_dir)
    layout = ParallelLayout(world_size=1)
    layout.initialize(seed=0)
    learner = Learner(arch, layout, LearnerSettings(lr=1e-2, micro_batch_size=2), weights=model_dir)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, arch.vocab_size, (2, 32), generator=g)
    mb = MicroBatch(tokens=tokens, position_ids=torch.arange(32).expand(2, 32).clone(),
                    targets=torch.roll(tokens, -1, 1))
    learner.step([mb], lambda logp, m: (-logp.sum() / logp.numel(), logp.numel()))
    probe = PROBE % arch.vocab_size
    L = learner_logits(learner.model, layout, arch, probe)
    tr = SGLangTransport([url], mode=mode, backend="nccl", ranks_per_server=1)
    report = WeightSync(learner.model, layout, arch, tr, bucket_bytes=1 << 20).sync(1)
    tr.close()
    layout.destroy()
    return {"L": L, "probe": probe, "buckets": report.buckets, "message": report.message}


def _sglang_logprobs(url: str, ids: list[int]) -> torch.Tensor:
    """SGLang's log-prob of each token given its prefix (``input_token_logprobs``; the first is None)."""
    import urllib.request

    body = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                       "return_logprob": True, "logprob_start_len": 0}).encode()
    req = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    lps = out["meta_info"]["input_token_logprobs"]
    return torch.tensor([float("nan") if x[0] is None else x[0] for x in lps])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["tensor", "distributed"])
def test_sglang_transport_updates_a_server(tmp_path, mode):
    """A real SGLang server (fp32, the tiny Qwen2 widened to head_dim 64 for its kernels) takes the
    learner's weights through the HTTP weight-update API; its prompt log-probs then match the
    learner's within 2e-3 (different attention kernels), and they did not before the sync.
    ``tensor`` (colocated, CUDA IPC) needs one GPU; ``distributed`` (NCCL broadcast) needs two, as
    NCCL refuses two ranks on one device."""
    import subprocess
    import sys
    import urllib.request

    if importlib_find("sglang") is None:
        pytest.skip("sglang is not installed")
    if mode == "distributed" and torch.cuda.device_count() < 2:
        pytest.skip("the distributed (NCCL) mode needs two GPUs: NCCL refuses two ranks on one device")
    from megatron_smd.model.tiny import init_model_dir

    model_dir = init_model_dir(tmp_path / "tiny", "qwen2", seed=0, hidden_size=256, num_heads=4, num_kv_heads=2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1" if mode == "distributed" else "0")
    server = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir),
                               "--port", str(port), "--dtype", "float32", "--mem-fraction-static", "0.2",
                               "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
                               "--skip-server-warmup"], env=env)
    try:
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError("the SGLang server did not come up") from None
                time.sleep(2)
        from megatron_smd.model.hf import read_arch

        before = [_sglang_logprobs(url, row.tolist()) for row in PROBE % read_arch(model_dir).vocab_size]
        res = _spawn([(_sglang_learner_job, (str(model_dir), url, mode),
                       dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                            CUDA_VISIBLE_DEVICES="0"))], may_die=set(), timeout=900)[0]
        L, probe = res["L"], res["probe"]
        ref = torch.log_softmax(L.double(), -1)[:, :-1].gather(-1, probe[:, 1:, None])[..., 0]
        for b in range(probe.shape[0]):
            got = _sglang_logprobs(url, probe[b].tolist())[1:].double()
            diff = float((got - ref[b]).abs().max())
            print(f"{mode}: row {b}: SGLang vs learner log-probs after sync {diff:.2g} ({res['buckets']} buckets)")
            assert diff <= 2e-3
            assert float((before[b][1:].double() - ref[b]).abs().max()) > 1e-2
    finally:
        server.terminate()
        server.wait(timeout=60)


def importlib_find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)
