"""The shadow-mask type: semantics, validation errors, packing, statistics."""

import pytest
import torch

from megatron_smd import mask as M
from megatron_smd.errors import MaskError


def _loop_dense(evict):
    L, T = evict.shape
    out = torch.zeros(L, T, T, dtype=torch.bool)
    for l in range(L):
        for i in range(T):
            for j in range(T):
                out[l, i, j] = j <= i < int(evict[l, j])
    return out


def test_to_dense_matches_definition():
    evict = torch.tensor([[3, 2, 5, 5, 5], [5, 5, 4, 4, 5]], dtype=torch.int32)
    assert torch.equal(M.to_dense(evict), _loop_dense(evict))
    # never-evicted mask is plain causal
    assert torch.equal(M.to_dense(M.never_evicted(1, 4))[0], torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_layer_dense_subset_rows_equals_full_rows():
    evict = torch.tensor([[3, 2, 5, 5, 5]], dtype=torch.int32)
    full = M.to_dense(evict)
    q = torch.tensor([4, 0, 2])
    assert torch.equal(M.layer_dense(evict, q), full[:, q])


@pytest.mark.parametrize("bad,msg", [
    (torch.tensor([[1, 1, 3]], dtype=torch.int32), "layer 0, position 1 has evict=1"),
    (torch.tensor([[1, 2, 4]], dtype=torch.int32), "layer 0, position 2 has evict=4, which is past the end"),
    (torch.tensor([[[1, 2, 3], [1, 2, 2]]], dtype=torch.int32), "layer 0, kv-head 1, position 2"),
])
def test_validate_names_layer_and_position(bad, msg):
    with pytest.raises(MaskError, match=msg):
        M.validate_evict(bad, name="x")


def test_validate_dtype_shape_and_model_fit():
    with pytest.raises(MaskError, match="dtype must be int32"):
        M.validate_evict(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(MaskError, match=r"shape must be \[L, T\]"):
        M.validate_evict(torch.ones(3, dtype=torch.int32))
    with pytest.raises(MaskError, match="has 2 layers, the model has 4"):
        M.validate_evict(M.never_evicted(2, 3), num_layers=4)
    with pytest.raises(MaskError, match="has 3 KV heads, the model has 2"):
        M.validate_evict(M.never_evicted(2, 3, 3), num_kv_heads=2)


def test_pack_unpack_roundtrip_and_no_cross_document_attention():
    a = torch.tensor([[2, 3, 3], [3, 3, 3]], dtype=torch.int32)
    b = torch.tensor([[4, 2, 4, 4], [1, 4, 4, 4]], dtype=torch.int32)
    packed, cu = M.pack([a, b])
    assert cu.tolist() == [0, 3, 7]
    M.validate_evict(packed, seq_end=M.seq_end_from_cu(cu))
    ua, ub = M.unpack(packed, cu)
    assert torch.equal(ua, a) and torch.equal(ub, b)
    dense = M.to_dense(packed)
    assert not dense[:, 3:, :3].any(), "a query of sequence 2 sees a key of sequence 1"
    assert torch.equal(dense[:, :3, :3], M.to_dense(a)) and torch.equal(dense[:, 3:, 3:], M.to_dense(b))
    # a packed row validated against a single end catches nothing wrong; against per-doc ends, leaks are caught
    leak = packed.clone()
    leak[0, 1] = 5
    with pytest.raises(MaskError, match="past the end of its sequence"):
        M.validate_evict(leak, seq_end=M.seq_end_from_cu(cu))


def test_kept_fraction_and_sizes():
    assert torch.allclose(M.kept_fraction(M.never_evicted(3, 10), prompt_len=2), torch.ones(3))
    # a window of one: every query sees only itself
    evict = (torch.arange(6) + 1).to(torch.int32).view(1, 6)
    expected = torch.tensor([1 / (i + 1) for i in range(6)]).mean()
    assert torch.allclose(M.kept_fraction(evict), expected.view(1))
    assert M.nbytes_evict(28, 32768) == 28 * 32768 * 4
    assert M.nbytes_dense(28, 32768) == 28 * 32768 * 32768 // 8


def test_pad_batch_padding_is_zero():
    out = M.pad_batch([M.never_evicted(2, 2), M.never_evicted(2, 4)])
    assert out.shape == (2, 2, 4) and out[0, :, 2:].eq(0).all() and out[1].eq(4).all()
