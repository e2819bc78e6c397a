"""The per-layer KV arithmetic (megatron_smd.kv_budget) against hand counts.

The same functions size the patched SGLang server's pools and admission and ``smd plan``'s rollout
figures; ``tests/test_sglang_live.py`` checks them against a live server's pool counters."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_smd import kv_budget as kb
from megatron_smd.model.tiny import tiny_arch
from megatron_smd.policies import PolicyConfig

B = 16
POL = {
    "none": PolicyConfig(),
    "streaming": PolicyConfig(name="streaming", budget=B, sinks=4),
    "h2o": PolicyConfig(name="h2o", budget=B, window=4),
    "snapkv": PolicyConfig(name="snapkv", budget=B, window=4),
    "rkv": PolicyConfig(name="rkv", budget=B, window=4, buffer=8),
}


@pytest.mark.parametrize("P,N,want", [
    # hand counts: prompt prefilled densely; compressed to B if P > B; the last sampled token never cached
    (24, 40, {"none": 63, "streaming": 24, "h2o": 24, "snapkv": 55, "rkv": 24}),
    (8, 40, {"none": 47, "streaming": 17, "h2o": 17, "snapkv": 47, "rkv": 24}),
    (8, 4, {"none": 11, "streaming": 11, "h2o": 11, "snapkv": 11, "rkv": 11}),
])
def test_request_peak_by_hand(P, N, want):
    for name, cfg in POL.items():
        assert kb.request_peak_tokens(cfg, P, N) == want[name], name


def test_private_and_live_peaks():
    assert [kb.private_peak_tokens(POL[n], 200) for n in POL] == [199, 17, 17, 199, 24]
    assert [kb.private_peak_tokens(POL[n], 5) for n in POL] == [4, 4, 4, 4, 4]
    assert [kb.live_peak_tokens(POL[n]) for n in POL] == [None, 17, 17, None, 24]


def test_admission_of_a_lone_request_is_its_peak_and_of_a_sample_its_generated_tokens():
    h2o = POL["h2o"]
    assert kb.admission_tokens(h2o, 64, 128, 64) == kb.request_peak_tokens(h2o, 64, 128) == 64
    assert kb.admission_tokens(h2o, 1, 128, 64) == 1 + 17  # shares the cached prompt
    assert kb.admission_tokens(POL["none"], 64, 128, 64) == 64 + 127
    assert kb.admission_tokens(POL["snapkv"], 64, 128, 64) == 16 + 127


def test_group_reserve_takes_the_tighter_bound():
    h2o = POL["h2o"]
    # a lone request at steady state: 16 alive (4 prompt tokens kept, 12 generated): one more token
    assert kb.group_reserve_tokens(h2o, [128], [[12, 12]], [100], owned_kept=[4, 4]) == 1
    # just after prefill (prompt compressed to 16, nothing generated yet): one token
    assert kb.group_reserve_tokens(h2o, [128], [[0, 0]], [128], owned_kept=[16, 16]) == 1
    # 4 samples sharing a 16-token prompt kept in the tree (not detached): 4 * 17 - 0 alive beyond it
    assert kb.group_reserve_tokens(h2o, [128] * 4, np.zeros((4, 2)), [128] * 4, owned_kept=[0, 0]) == 4 * 17
    # short generations: what is left to generate bounds it
    assert kb.group_reserve_tokens(h2o, [3] * 2, np.zeros((2, 2)), [2, 1], owned_kept=[0, 0]) == 3
    # no live bound for snapkv: its generated tokens
    assert kb.group_reserve_tokens(POL["snapkv"], [128], [[10, 10]], [118], owned_kept=[16, 16]) == 117


def test_bytes_and_pool_sizes():
    arch = tiny_arch(vocab_size=100)  # 4 layers, 2 KV heads of 16
    assert kb.slot_layer_bytes(arch.num_kv_heads, arch.head_dim, 4) == 2 * 2 * 16 * 4
    assert kb.kv_bytes_per_token(arch, 4) == 4 * 256
    assert kb.request_kv_bytes(arch, POL["h2o"], 24, 40, 4) == 24 * 4 * 256
    assert kb.pool_kv_bytes(1000, 4, 2, 16, 4) == 1000 * 4 * 256
    assert kb.concurrent_requests(1000, POL["h2o"], 24, 40) == 1000 // 24
    assert kb.logical_slots(1000, 4, POL["h2o"]) == 4000 and kb.logical_slots(1000, 4, POL["none"]) == 1000
    assert kb.translation_table_bytes(1000, 4, POL["h2o"]) == 4 * (4001 + 1000) * 4
    assert kb.translation_table_bytes(1000, 4, POL["none"]) == 0


def test_same_per_request_figures_as_the_reference_batch_arithmetic():
    """``batch_peak_tokens`` of one prompt and one sample is the per-request peak (what the
    reference engine holds for a batch of one)."""
    for cfg in POL.values():
        for P, N in ((24, 40), (8, 40), (40, 3)):
            assert kb.batch_peak_tokens(cfg, P, N, 1, 1) == kb.request_peak_tokens(cfg, P, N)
