"""KV eviction policies: hand-computed cases, and loop re-implementations as independent references.

The references below are written differently from megatron_smd/policies.py on purpose: plain Python
loops over heads, queries and slots in float64 (``math.exp``, explicit max/sum windows, pairwise
cosine similarities, ``sorted`` with an explicit ``(-score, -slot)`` key for the tie rule). Every
comparison is on the *set of kept slots*, which must match exactly.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from pydantic import ValidationError

from megatron_smd.policies import (
    EvictionPolicy,
    PolicyConfig,
    key_redundancy,
    make_policy,
    rkv_candidate_scores,
    snapkv_candidate_scores,
)


def pol(**kw) -> EvictionPolicy:
    return make_policy(PolicyConfig(**kw))


def select(p: EvictionPolicy, keys, positions=None, acc=None, q=None, qpos=None) -> torch.Tensor:
    H, C, _ = keys.shape
    if positions is None:
        positions = torch.arange(C).expand(H, C).clone()
    keep = p.select(keys=keys, positions=positions, acc=acc, obs_queries=q, obs_positions=qpos)
    assert keep.dtype == torch.int64
    assert torch.equal(keep, keep.sort(dim=-1).values), "rows must be sorted ascending"
    return keep


# ------------------------------------------------------------------------------------------------
# Independent loop references
# ------------------------------------------------------------------------------------------------


def ref_vote(keys, positions, q, qpos) -> list[list[float]]:
    """vote[h][j] = sum over the group's query heads and the obs queries of causal softmax probs."""
    H_kv, C, d = keys.shape
    H_q, w, _ = q.shape
    g = H_q // H_kv
    vote = [[0.0] * C for _ in range(H_kv)]
    for hq in range(H_q):
        h = hq // g
        for i in range(w):
            vis = [j for j in range(C) if int(positions[h, j]) <= int(qpos[i])]
            logits = {}
            for j in vis:
                dot = sum(float(q[hq, i, t]) * float(keys[h, j, t]) for t in range(d))
                logits[j] = dot / math.sqrt(d)
            m = max(logits.values())
            z = sum(math.exp(x - m) for x in logits.values())
            for j, x in logits.items():
                vote[h][j] += math.exp(x - m) / z
    return vote


def ref_pool(s: list[float], k: int, mode: str) -> list[float]:
    r = k // 2
    out = []
    for j in range(len(s)):
        win = [s[i] for i in range(j - r, j + r + 1) if 0 <= i < len(s)]
        out.append(max(win) if mode == "max" else sum(win) / k)
    return out


def ref_keep_row(scores: list[float], C: int, budget: int, window: int) -> list[int]:
    M = C - window
    ranked = sorted(range(M), key=lambda j: (-scores[j], -j))  # more recent wins ties
    return sorted(ranked[: budget - window] + list(range(M, C)))


def ref_redundancy_row(keys_h) -> list[float]:
    C, d = keys_h.shape
    vecs = [[float(x) for x in keys_h[j]] for j in range(C)]
    norms = [max(math.sqrt(sum(x * x for x in v)), 1e-8) for v in vecs]
    out = []
    for j in range(C):
        tot = 0.0
        for jj in range(C):
            if jj != j:
                tot += sum(a * b for a, b in zip(vecs[j], vecs[jj])) / (norms[j] * norms[jj])
        out.append(tot / (C - 1))
    return out


def ref_snapkv(keys, positions, q, qpos, budget, window, k, mode, gran) -> list[list[int]]:
    H_kv, C, _ = keys.shape
    M = C - window
    vote = ref_vote(keys, positions, q, qpos)
    if gran == "layer":
        total = [sum(vote[h][j] for h in range(H_kv)) for j in range(M)]
        row = ref_keep_row(ref_pool(total, k, mode), C, budget, window)
        return [row] * H_kv
    return [ref_keep_row(ref_pool(vote[h][:M], k, mode), C, budget, window) for h in range(H_kv)]


def ref_rkv_scores(keys, positions, q, qpos, window, k, mode, lam) -> list[list[float]]:
    H_kv, C, _ = keys.shape
    M = C - window
    vote = ref_vote(keys, positions, q, qpos)
    rows = []
    for h in range(H_kv):
        p = ref_pool(vote[h][:M], k, mode)
        imp = [x / sum(p) for x in p]
        r = ref_redundancy_row(keys[h])[:M]
        mr = max(r)
        z = sum(math.exp(x - mr) for x in r)
        red = [math.exp(x - mr) / z for x in r]
        rows.append([lam * a - (1 - lam) * b for a, b in zip(imp, red)])
    return rows


def ref_rkv(keys, positions, q, qpos, budget, window, k, mode, lam, gran) -> list[list[int]]:
    H_kv, C, _ = keys.shape
    rows = ref_rkv_scores(keys, positions, q, qpos, window, k, mode, lam)
    if gran == "layer":
        mean = [sum(rows[h][j] for h in range(H_kv)) / H_kv for j in range(C - window)]
        return [ref_keep_row(mean, C, budget, window)] * H_kv
    return [ref_keep_row(rows[h], C, budget, window) for h in range(H_kv)]


def random_case(rng: random.Random, gran: str):
    """Random keys/queries; positions with gaps (earlier evictions), per head under 'head'."""
    H_kv = rng.choice([1, 2])
    g = rng.choice([1, 2])
    d = 4
    window = rng.choice([2, 3])
    C = rng.randint(window + 4, 14)
    budget = rng.randint(window + 1, C - 1)
    w = rng.randint(1, window)
    tail = list(range(40, 40 + window))  # the recent window: same positions in every head
    rows = []
    for h in range(H_kv if gran == "head" else 1):
        rows.append(sorted(rng.sample(range(40), C - window)) + tail)
    positions = torch.tensor(rows * (H_kv if gran == "layer" else 1), dtype=torch.int64)
    gen = torch.Generator().manual_seed(rng.randint(0, 10**6))
    keys = torch.randn(H_kv, C, d, generator=gen, dtype=torch.float64)
    q = 1.5 * torch.randn(H_kv * g, w, d, generator=gen, dtype=torch.float64)
    qpos = torch.tensor(tail[window - w:], dtype=torch.int64)
    return keys, positions, q, qpos, budget, window


# ------------------------------------------------------------------------------------------------
# Config validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, needles",
    [
        (dict(name="h2o"), ["budget is required", "h2o"]),
        (dict(name="snapkv", budget=0), ["budget must be > 0", "budget=0"]),
        (dict(name="rkv", budget=-3), ["budget=-3"]),
        (dict(name="streaming", budget=4, sinks=4), ["budget > sinks", "budget=4", "sinks=4"]),
        (dict(name="streaming", budget=3, sinks=8), ["budget=3", "sinks=8"]),
        (dict(name="h2o", budget=16, window=32), ["window must be < budget", "window=32", "budget=16"]),
        (dict(name="snapkv", budget=32, window=32), ["window=32", "budget=32"]),
        (dict(name="rkv", budget=8, window=9), ["window=9", "budget=8"]),
        (dict(name="snapkv", budget=64, pool_kernel=6), ["pool_kernel must be", "odd", "pool_kernel=6"]),
        (dict(name="snapkv", budget=64, pool_kernel=0), ["pool_kernel=0"]),
        (dict(name="rkv", budget=64, buffer=0), ["buffer must be > 0", "buffer=0"]),
        (dict(name="rkv", budget=64, buffer=-5), ["buffer=-5"]),
        (dict(name="rkv", budget=64, rkv_lambda=1.5), ["rkv_lambda must be in [0, 1]", "rkv_lambda=1.5"]),
        (dict(name="rkv", budget=64, rkv_lambda=-0.1), ["rkv_lambda=-0.1"]),
        (dict(name="snapkv", budget=64, window=0), ["window must be >= 1", "window=0"]),
        (dict(name="streaming", budget=64, sinks=-1), ["sinks must be >= 0", "sinks=-1"]),
    ],
)
def test_config_rejects_impossible(kw, needles):
    with pytest.raises(ValidationError) as ei:
        PolicyConfig(**kw)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValidationError) as ei:
        PolicyConfig(name="rkv", budget=16, window=16, pool_kernel=4, buffer=0, rkv_lambda=2.0)
    msg = str(ei.value)
    for n in ("window=16", "pool_kernel=4", "buffer=0", "rkv_lambda=2.0"):
        assert n in msg


def test_config_unknown_key_and_type_errors():
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        PolicyConfig(name="h2o", budget=64, windw=8)
    with pytest.raises(ValidationError):
        PolicyConfig(name="lru", budget=64)


def test_config_accepts_possible():
    PolicyConfig()  # none needs no budget
    PolicyConfig(name="streaming", budget=5, sinks=4)  # window ignored by streaming (32 > budget)
    PolicyConfig(name="h2o", budget=33, window=32)
    PolicyConfig(name="h2o", budget=8, window=0)  # pure heavy hitters
    PolicyConfig(name="snapkv", budget=64, pool_kernel=1, pooling="avg")
    PolicyConfig(name="rkv", budget=64, rkv_lambda=0.0)
    PolicyConfig(name="rkv", budget=64, rkv_lambda=1.0, granularity="head")


# ------------------------------------------------------------------------------------------------
# Engine-facing attributes and should_compress
# ------------------------------------------------------------------------------------------------


def test_attributes():
    assert pol().name == "none"
    assert pol(name="h2o", budget=8, window=2).needs_attention is True
    for n in ("none", "streaming", "snapkv", "rkv"):
        p = pol(name=n, budget=8, window=2) if n != "none" else pol()
        assert p.needs_attention is False
    assert pol(name="snapkv", budget=8, window=3).obs_window == 3
    assert pol(name="rkv", budget=8, window=5).obs_window == 5
    assert pol(name="h2o", budget=8, window=5).obs_window == 0
    assert pol(name="streaming", budget=8).obs_window == 0
    assert pol().obs_window == 0


@pytest.mark.parametrize(
    "kw, cases",
    [
        (dict(), [(10**6, "prefill", False), (10**6, "decode", False)]),
        (dict(name="streaming", budget=8, sinks=2),
         [(8, "prefill", False), (9, "prefill", True), (8, "decode", False), (9, "decode", True)]),
        (dict(name="h2o", budget=8, window=2),
         [(8, "prefill", False), (9, "prefill", True), (8, "decode", False), (9, "decode", True)]),
        (dict(name="snapkv", budget=8, window=2),
         [(8, "prefill", False), (9, "prefill", True), (9, "decode", False), (500, "decode", False)]),
        (dict(name="rkv", budget=8, window=2, buffer=4),
         [(8, "prefill", False), (9, "prefill", True), (9, "decode", False), (11, "decode", False),
          (12, "decode", True), (13, "decode", True)]),
    ],
)
def test_should_compress(kw, cases):
    p = pol(**kw)
    for n, phase, want in cases:
        assert p.should_compress(n, phase) is want, (kw, n, phase)
    with pytest.raises(ValueError, match="phase"):
        p.should_compress(3, "generate")


# ------------------------------------------------------------------------------------------------
# accumulate (H2O) with GQA
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("H_q, H_kv", [(4, 2), (6, 3), (4, 1), (2, 2)])
def test_accumulate_gqa_matches_loop(H_q, H_kv):
    gen = torch.Generator().manual_seed(H_q * 10 + H_kv)
    C, n_q = 5, 3
    acc = torch.rand(H_kv, C, generator=gen)
    probs = torch.softmax(torch.randn(H_q, n_q, C, generator=gen), dim=-1)
    probs[:, 0, -2:] = 0.0  # a query that could not see the last slots
    acc_before = acc.clone()
    want = acc.clone()
    g = H_q // H_kv
    for hq in range(H_q):
        for i in range(n_q):
            for j in range(C):
                want[hq // g, j] += probs[hq, i, j]
    got = pol(name="h2o", budget=4, window=1).accumulate(acc, probs)
    assert got.dtype == torch.float32 and got.shape == (H_kv, C)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(acc, acc_before), "accumulate must not modify its input in place"


def test_accumulate_gqa_groups_are_contiguous():
    # Query heads 0,1 -> kv 0; 2,3 -> kv 1. Mass only in query head 1 must land on kv head 0.
    probs = torch.zeros(4, 1, 3)
    probs[1, 0] = torch.tensor([0.2, 0.3, 0.5])
    got = pol(name="h2o", budget=2, window=1).accumulate(torch.zeros(2, 3), probs)
    assert torch.equal(got, torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 0.0]]))


def test_accumulate_rejects_mismatch():
    p = pol(name="h2o", budget=2, window=1)
    with pytest.raises(ValueError, match="H_q divisible"):
        p.accumulate(torch.zeros(2, 3), torch.zeros(3, 1, 3))
    with pytest.raises(ValueError, match="same C"):
        p.accumulate(torch.zeros(2, 3), torch.zeros(4, 1, 4))


# ------------------------------------------------------------------------------------------------
# streaming
# ------------------------------------------------------------------------------------------------


def test_streaming_keeps_sinks_and_recent():
    keys = torch.randn(2, 10, 4)
    p = pol(name="streaming", budget=5, sinks=2)
    keep = select(p, keys)
    assert keep.tolist() == [[0, 1, 7, 8, 9]] * 2
    # After earlier evictions positions have gaps; the sink slots are still positions 0, 1.
    pos = torch.tensor([0, 1, 5, 6, 7, 8, 9, 10, 11, 12]).expand(2, 10).clone()
    keep = select(p, keys, pos)
    assert pos[0, keep[0]].tolist() == [0, 1, 10, 11, 12]
    # sinks = 0: pure sliding window
    assert select(pol(name="streaming", budget=3, sinks=0), keys).tolist() == [[7, 8, 9]] * 2


def test_no_compression_when_within_budget_and_none():
    keys = torch.randn(2, 6, 4)
    assert select(pol(name="streaming", budget=6, sinks=2), keys).tolist() == [list(range(6))] * 2
    assert select(pol(), keys).tolist() == [list(range(6))] * 2


# ------------------------------------------------------------------------------------------------
# H2O
# ------------------------------------------------------------------------------------------------


def test_h2o_hand_computed_head_and_layer():
    acc = torch.tensor([[5.0, 0, 1, 4, 0, 9, 9, 9],
                        [0.0, 3, 0, 0, 7, 0, 0, 0]])
    keys = torch.randn(2, 8, 4)
    # head: row 0 top-2 among slots 0..5 = {5 (9), 0 (5)}; row 1 = {4 (7), 1 (3)}; + window {6, 7}
    keep = select(pol(name="h2o", budget=4, window=2, granularity="head"), keys, acc=acc)
    assert keep.tolist() == [[0, 5, 6, 7], [1, 4, 6, 7]]
    # layer: mean over heads = [2.5, 1.5, 0.5, 2, 3.5, 4.5] -> {5, 4}
    keep = select(pol(name="h2o", budget=4, window=2), keys, acc=acc)
    assert keep.tolist() == [[4, 5, 6, 7]] * 2
    # window 0: pure heavy hitters (layer mean incl. the last slots: 4.5, 4.5, 4.5, 3.5, ...)
    keep = select(pol(name="h2o", budget=3, window=0), keys, acc=acc)
    assert keep.tolist() == [[5, 6, 7]] * 2


def test_h2o_ties_go_to_the_more_recent_slot():
    keys = torch.randn(1, 8, 4)
    acc = torch.tensor([[1.0, 2, 2, 1, 2, 1, 0, 0]])
    # candidates 0..5, top-2: three slots tie at 2 (1, 2, 4) -> the two most recent (2, 4)
    keep = select(pol(name="h2o", budget=4, window=2), keys, acc=acc)
    assert keep.tolist() == [[2, 4, 6, 7]]
    keep = select(pol(name="h2o", budget=4, window=2), keys, acc=torch.zeros(1, 8))
    assert keep.tolist() == [[4, 5, 6, 7]]


def test_h2o_fuzz_against_loop():
    rng = random.Random(0)
    for _ in range(30):
        H, C = rng.choice([1, 3]), rng.randint(6, 15)
        window = rng.randint(0, 3)
        budget = rng.randint(window + 1, C - 1)
        acc = torch.tensor([[float(rng.randint(0, 4)) for _ in range(C)] for _ in range(H)])
        for gran in ("head", "layer"):
            keep = select(pol(name="h2o", budget=budget, window=window, granularity=gran),
                          torch.zeros(H, C, 2), acc=acc)
            if gran == "head":
                want = [ref_keep_row(acc[h].tolist(), C, budget, window) for h in range(H)]
            else:
                mean = [sum(float(acc[h, j]) for h in range(H)) / H for j in range(C)]
                want = [ref_keep_row(mean, C, budget, window)] * H
            assert keep.tolist() == want


# ------------------------------------------------------------------------------------------------
# SnapKV
# ------------------------------------------------------------------------------------------------


def _snap_hand_inputs():
    """C = 6, window = 2: candidates 0..3. q = sqrt(2) e0 so logit_j = keys[j, 0].

    Logits: slot 1 -> 2, slot 3 -> 1, others 0. Queries at positions 4 and 5 (causal: the first
    sees slots 0..4). Votes: v1 > v3 > v0 = v2.
    """
    keys = torch.zeros(1, 6, 2)
    keys[0, 1, 0] = 2.0
    keys[0, 3, 0] = 1.0
    q = torch.zeros(1, 2, 2)
    q[0, :, 0] = math.sqrt(2.0)
    return keys, q, torch.tensor([4, 5])


def test_snapkv_hand_computed_no_pooling():
    keys, q, qpos = _snap_hand_inputs()
    p = pol(name="snapkv", budget=4, window=2, pool_kernel=1)
    assert select(p, keys, q=q, qpos=qpos).tolist() == [[1, 3, 4, 5]]


def test_snapkv_hand_computed_max_pooling_plateau_tie():
    # max-pool k=3 over [v0, v1, v2, v3] = [v1, v1, v1, v3]: slots 0, 1, 2 tie -> most recent two: 2, 1
    keys, q, qpos = _snap_hand_inputs()
    p = pol(name="snapkv", budget=4, window=2, pool_kernel=3, pooling="max")
    assert select(p, keys, q=q, qpos=qpos).tolist() == [[1, 2, 4, 5]]
    p = pol(name="snapkv", budget=3, window=2, pool_kernel=3, pooling="max")
    assert select(p, keys, q=q, qpos=qpos).tolist() == [[2, 4, 5]]


def test_snapkv_hand_computed_avg_pooling():
    keys, q, qpos = _snap_hand_inputs()
    e = math.e
    # query at 4 sees slots 0..4 (logits 0,2,0,1,0); query at 5 sees 0..5 (logits 0,2,0,1,0,0)
    z4, z5 = 3 + e**2 + e, 4 + e**2 + e
    v = [1 / z4 + 1 / z5, e**2 / z4 + e**2 / z5, 1 / z4 + 1 / z5, e / z4 + e / z5]
    pooled = [(v[0] + v[1]) / 3, (v[0] + v[1] + v[2]) / 3, (v[1] + v[2] + v[3]) / 3, (v[2] + v[3]) / 3]
    best = sorted(range(4), key=lambda j: -pooled[j])[:1]
    assert best == [2]  # the pooled neighbourhood of the two high slots
    p = pol(name="snapkv", budget=3, window=2, pool_kernel=3, pooling="avg")
    assert select(p, keys, q=q, qpos=qpos).tolist() == [[2, 4, 5]]


def test_snapkv_causal_mask_of_obs_queries():
    """Slot 5 would swallow query a's attention if a (position 4) could see it.

    Masked (correct): slot 0 total ~ 0.834 + 0.130 > slot 2 ~ 0.352 + 0.041 -> keep slot 0.
    Unmasked (wrong): a's mass goes to slot 5, slot 0 ~ 0.130 < slot 2 -> would keep slot 2.
    """
    s2 = math.sqrt(2.0)
    keys = torch.zeros(1, 6, 2)
    keys[0, 0] = torch.tensor([3.0, 0.0])
    keys[0, 2] = torch.tensor([0.0, 1.0])
    keys[0, 5] = torch.tensor([100.0, 0.0])
    q = torch.tensor([[[s2, 0.0], [0.0, s2]]])
    p = pol(name="snapkv", budget=3, window=2, pool_kernel=1)
    assert select(p, keys, q=q, qpos=torch.tensor([4, 5])).tolist() == [[0, 4, 5]]
    # if both queries sat at position 5, slot 5 is visible to a and slot 2 wins
    assert select(p, keys, q=q, qpos=torch.tensor([5, 5])).tolist() == [[2, 4, 5]]


def test_snapkv_head_vs_layer():
    # kv head 0 prefers slot 1, kv head 1 prefers slot 3 (strongly); H_q = 4 (GQA g = 2)
    keys = torch.zeros(2, 6, 2)
    keys[0, 1, 0] = 2.0
    keys[1, 3, 0] = 4.0
    keys[1, 1, 0] = 1.0
    q = torch.zeros(4, 1, 2)
    q[:, 0, 0] = math.sqrt(2.0)
    qpos = torch.tensor([5])
    head = select(pol(name="snapkv", budget=3, window=2, pool_kernel=1, granularity="head"),
                  keys, q=q, qpos=qpos)
    assert head.tolist() == [[1, 4, 5], [3, 4, 5]]
    layer = select(pol(name="snapkv", budget=3, window=2, pool_kernel=1), keys, q=q, qpos=qpos)
    assert layer.tolist() == [[3, 4, 5]] * 2
    want = ref_snapkv(keys.double(), torch.arange(6).expand(2, 6), q.double(), qpos, 3, 2, 1, "max", "layer")
    assert layer.tolist() == want


def test_snapkv_layer_reduces_heads_before_pooling():
    """Max-pooling does not commute with the sum over heads; the layer score pools the total vote.

    kv head 0 peaks at slot 1, head 1 (higher) at slot 3, k = 3. Pooling the total vote gives the
    plateau of the larger peak (slots 2, 3, 4) -> most recent: slot 4. Pooling per head and then
    summing would make slot 2 (covered by both plateaus) the unique best.
    """
    keys = torch.zeros(2, 8, 2)
    keys[0, 1, 0] = 2.0
    keys[1, 3, 0] = 3.0
    q = torch.zeros(2, 1, 2)
    q[:, 0, 0] = math.sqrt(2.0)
    qpos = torch.tensor([7])
    p = pol(name="snapkv", budget=3, window=2, pool_kernel=3)
    keep = select(p, keys, q=q, qpos=qpos)
    assert keep.tolist() == [[4, 6, 7]] * 2
    assert keep.tolist() == ref_snapkv(keys.double(), torch.arange(8).expand(2, 8), q.double(), qpos,
                                       3, 2, 3, "max", "layer")


@pytest.mark.parametrize("gran", ["head", "layer"])
def test_candidate_score_values_against_loop(gran):
    """The score vectors themselves (not only the kept sets) match the loop formulas, float64."""
    rng = random.Random(31 if gran == "head" else 32)
    for _ in range(15):
        keys, pos, q, qpos, budget, window = random_case(rng, gran)
        H_kv, C, _ = keys.shape
        M = C - window
        k, mode = rng.choice([1, 3, 5]), rng.choice(["max", "avg"])
        lam = rng.choice([0.1, 0.6])
        got = rkv_candidate_scores(keys, pos, q, qpos, window, k, mode, lam, gran)
        rows = ref_rkv_scores(keys, pos, q, qpos, window, k, mode, lam)
        if gran == "layer":
            rows = [[sum(r[j] for r in rows) / H_kv for j in range(M)]] * H_kv
        torch.testing.assert_close(got, torch.tensor(rows, dtype=torch.float64), rtol=0, atol=1e-12)
        got = snapkv_candidate_scores(keys, pos, q, qpos, window, k, mode, gran)
        vote = ref_vote(keys, pos, q, qpos)
        if gran == "layer":
            total = [sum(v[j] for v in vote) for j in range(M)]
            rows = [ref_pool(total, k, mode)] * H_kv
        else:
            rows = [ref_pool(v[:M], k, mode) for v in vote]
        torch.testing.assert_close(got, torch.tensor(rows, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("gran", ["head", "layer"])
def test_snapkv_fuzz_against_loop(gran):
    rng = random.Random(1 if gran == "head" else 2)
    for _ in range(25):
        keys, pos, q, qpos, budget, window = random_case(rng, gran)
        k, mode = rng.choice([1, 3, 5]), rng.choice(["max", "avg"])
        p = pol(name="snapkv", budget=budget, window=window, pool_kernel=k, pooling=mode,
                granularity=gran)
        got = select(p, keys, pos, q=q, qpos=qpos)
        assert got.shape == (keys.shape[0], budget)
        assert got.tolist() == ref_snapkv(keys, pos, q, qpos, budget, window, k, mode, gran)


# ------------------------------------------------------------------------------------------------
# R-KV
# ------------------------------------------------------------------------------------------------


def test_key_redundancy_matches_pairwise_loop():
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    keys[1, 2] = 0.0  # zero key: cosine 0 to everything (eps), no NaN
    got = key_redundancy(keys)
    for h in range(2):
        torch.testing.assert_close(got[h], torch.tensor(ref_redundancy_row(keys[h]), dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_rkv_pure_redundancy_keeps_the_unique_key():
    # lambda = 0: only redundancy. Slot 2 is the only key not parallel to e0 -> kept.
    keys = torch.tensor([[[1.0, 0], [2.0, 0], [0.0, 1], [1.0, 0], [3.0, 0], [1.0, 0]]])
    q = torch.tensor([[[0.0, 1.0]]])
    p = pol(name="rkv", budget=3, window=2, pool_kernel=1, rkv_lambda=0.0)
    assert select(p, keys, q=q, qpos=torch.tensor([5])).tolist() == [[2, 4, 5]]
    # ...even when the queries attend to e0 keys only (importance is ignored at lambda = 0)
    q2 = torch.tensor([[[5.0, 0.0]]])
    assert select(p, keys, q=q2, qpos=torch.tensor([5])).tolist() == [[2, 4, 5]]
    # lambda = 1: pure importance; q2 favours the largest e0 component among candidates: slot 1
    p1 = pol(name="rkv", budget=3, window=2, pool_kernel=1, rkv_lambda=1.0)
    assert select(p1, keys, q=q2, qpos=torch.tensor([5])).tolist() == [[1, 4, 5]]


def test_rkv_lambda_one_equals_snapkv_head():
    rng = random.Random(5)
    for _ in range(10):
        keys, pos, q, qpos, budget, window = random_case(rng, "head")
        kw = dict(budget=budget, window=window, pool_kernel=3, granularity="head")
        a = select(pol(name="rkv", rkv_lambda=1.0, **kw), keys, pos, q=q, qpos=qpos)
        b = select(pol(name="snapkv", **kw), keys, pos, q=q, qpos=qpos)
        assert torch.equal(a, b)


def test_rkv_hand_computed_tradeoff():
    """Equal importance by construction; the duplicated candidates lose on redundancy.

    Keys (d = 2): slots 0 and 1 both e0, slot 2 = e1, window slots 3 = (1, 1) and 4 = (1, -1).
    q = 0 gives uniform attention (1/5 per slot), so I = 1/3 for each of the 3 candidates.
    Mean cosine to the other 4 keys: r0 = r1 = (1 + 0 + c + c) / 4 with c = 1/sqrt(2);
    r2 = (0 + 0 + c - c) / 4 = 0. R = softmax(r); score = 0.3 * I - 0.7 * R.
    """
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]],
                        dtype=torch.float64)
    q = torch.zeros(1, 1, 2, dtype=torch.float64)
    qpos = torch.tensor([4])
    pos = torch.arange(5).view(1, 5)
    c = 1 / math.sqrt(2)
    r = [(1 + 2 * c) / 4, (1 + 2 * c) / 4, 0.0]
    z = sum(math.exp(x) for x in r)
    want = torch.tensor([[0.3 / 3 - 0.7 * math.exp(x) / z for x in r]], dtype=torch.float64)
    got = rkv_candidate_scores(keys, pos, q, qpos, 2, 1, "max", 0.3, "head")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    p = pol(name="rkv", budget=3, window=2, pool_kernel=1, rkv_lambda=0.3)
    assert select(p, keys, q=q, qpos=qpos).tolist() == [[2, 3, 4]]


@pytest.mark.parametrize("gran", ["head", "layer"])
def test_rkv_fuzz_against_loop(gran):
    rng = random.Random(11 if gran == "head" else 12)
    for _ in range(25):
        keys, pos, q, qpos, budget, window = random_case(rng, gran)
        k, mode = rng.choice([1, 3, 5]), rng.choice(["max", "avg"])
        lam = rng.choice([0.0, 0.1, 0.5, 0.9])
        p = pol(name="rkv", budget=budget, window=window, pool_kernel=k, pooling=mode,
                rkv_lambda=lam, granularity=gran)
        got = select(p, keys, pos, q=q, qpos=qpos)
        assert got.tolist() == ref_rkv(keys, pos, q, qpos, budget, window, k, mode, lam, gran)


def test_rkv_head_vs_layer_rows():
    rng = random.Random(21)
    differ = 0
    for _ in range(10):
        keys, pos, q, qpos, budget, window = random_case(rng, "layer")
        if keys.shape[0] == 1:
            continue
        kw = dict(name="rkv", budget=budget, window=window, pool_kernel=1)
        layer = select(pol(granularity="layer", **kw), keys, pos, q=q, qpos=qpos)
        head = select(pol(granularity="head", **kw), keys, pos, q=q, qpos=qpos)
        assert all(torch.equal(layer[0], r) for r in layer)
        differ += int(not torch.equal(head[0], head[1]))
    assert differ > 0, "random heads should sometimes choose differently"


# ------------------------------------------------------------------------------------------------
# Determinism, dtypes, input checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["snapkv", "rkv"])
def test_full_ties_keep_most_recent_and_are_repeatable(name):
    # identical keys and queries: every candidate scores the same -> the most recent are kept
    keys = torch.ones(2, 10, 4)
    q = torch.ones(4, 3, 4)
    qpos = torch.tensor([7, 8, 9])
    p = pol(name=name, budget=6, window=3, pool_kernel=3, granularity="head")
    first = select(p, keys, q=q, qpos=qpos)
    assert first.tolist() == [[4, 5, 6, 7, 8, 9]] * 2
    for _ in range(3):
        assert torch.equal(select(p, keys, q=q, qpos=qpos), first)


def test_low_precision_inputs_score_in_float32():
    rng = random.Random(9)
    keys, pos, q, qpos, budget, window = random_case(rng, "layer")
    p = pol(name="snapkv", budget=budget, window=window, pool_kernel=3)
    a = select(p, keys.bfloat16(), pos, q=q.bfloat16(), qpos=qpos)
    b = select(p, keys.bfloat16().float(), pos, q=q.bfloat16().float(), qpos=qpos)
    assert torch.equal(a, b)


def test_select_rejects_bad_inputs():
    p = pol(name="snapkv", budget=3, window=2)
    keys = torch.randn(1, 6, 2)
    with pytest.raises(ValueError, match="obs_queries"):
        select(p, keys)
    with pytest.raises(ValueError, match="strictly increasing"):
        select(p, keys, torch.tensor([[0, 2, 1, 3, 4, 5]]), q=torch.randn(1, 1, 2), qpos=torch.tensor([5]))
    with pytest.raises(ValueError, match="obs_window"):
        select(p, keys, q=torch.randn(1, 3, 2), qpos=torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="identical positions"):
        select(p, torch.randn(2, 6, 2), torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 6]]),
               q=torch.randn(2, 1, 2), qpos=torch.tensor([6]))
    with pytest.raises(ValueError, match="acc"):
        select(pol(name="h2o", budget=3, window=1), keys)
