"""Context and tensor parallelism of ShadowCoreAttention on gloo processes (CPU).

One spawn of 4 gloo ranks runs everything (process start-up and the Megatron import dominate the
cost): CP=2 on rank pairs {0,1} and {2,3}, CP=4 on all ranks, TP=2 and TP=4 (KV groups replicated
by Megatron), and CP=2 taken from ``megatron.core.parallel_state``. Every rank builds the same
inputs from one seed, runs the parallel module on its share (Megatron's CP chunks / its TP heads)
and, in the same process, the single-process module on everything; parallel outputs and gradients
(reassembled across ranks) must equal the single-process ones to 1e-5. The pairs also check a
whole Megatron ``SelfAttention`` (QKV projection, RoPE, output projection): Megatron's local
DotProductAttention vs ShadowCoreAttention, and CP=2 vs one process.
"""

from __future__ import annotations

import pytest
import torch

from _dist import run_distributed
from megatron_smd.errors import ConfigError
from megatron_smd.parallel.cp import local_positions, split_for_cp

TOL = 1e-5
L, HQ, HKV, D = 3, 4, 2, 8


# ------------------------------------------------------------------------------------------------
# layout (single process)
# ------------------------------------------------------------------------------------------------


def test_local_positions_is_megatrons_chunk_layout():
    assert local_positions(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_positions(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert local_positions(16, 3, 4).tolist() == [6, 7, 8, 9]
    # the ranks together hold every position exactly once
    allpos = torch.cat([local_positions(24, r, 3) for r in range(3)])
    assert sorted(allpos.tolist()) == list(range(24))
    x = torch.arange(2 * 24).view(2, 24)
    for r in range(3):
        assert torch.equal(split_for_cp(x, 1, r, 3), x[:, local_positions(24, r, 3)])
    with pytest.raises(ConfigError, match=r"sequence length 20 is not divisible by 2 \* cp = 8"):
        local_positions(20, 0, 4)


# ------------------------------------------------------------------------------------------------
# multi-process
# ------------------------------------------------------------------------------------------------


def _evict(gen, b, s, heads, docs):
    """Valid packed evict [b, L, (H,) s]; row 0 packs ``docs``, the others are one document."""
    out = []
    for row in range(b):
        lens = docs if row == 0 else [s]
        starts = [sum(lens[:k]) for k in range(len(lens))]
        end = torch.cat([torch.full((n,), a + n) for a, n in zip(starts, lens)])
        shape = (L, s) if heads is None else (L, heads, s)
        j = torch.arange(s)
        e = (j + 1 + (torch.rand(shape, generator=gen) * (end - j)).long()).clamp(max=end)
        kept = torch.rand(shape, generator=gen) < 0.3
        out.append(torch.where(kept, end, e))
    return torch.stack(out).to(torch.int32)


def _run(module, q, k, v, evict, dout):
    q, k, v = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = module(q, k, v, evict)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _err(a, b) -> float:
    return float((a - b).abs().max())


def _gather_rows(local: torch.Tensor, cp: int, group) -> torch.Tensor:
    """Reassemble per-rank local rows (dim 0) into global order, written independently of cp.py."""
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    s = local.shape[0] * cp
    c = s // (2 * cp)
    full = torch.empty((s, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        full[r * c:(r + 1) * c] = part[:c]
        full[(2 * cp - 1 - r) * c:(2 * cp - r) * c] = part[c:]
    return full


def _config(groups: int = HKV):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=L, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=groups,
                             kv_channels=D, attention_dropout=0.0, hidden_dropout=0.0)


def _attn(pgc, backend: str = "sdpa", layer: int = 2, groups: int = HKV):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_smd.learner.attention import ShadowCoreAttention

    return ShadowCoreAttention(_config(groups), layer, AttnMaskType.causal, "self", pg_collection=pgc, backend=backend)


def _cp_checks(group, one, gen) -> dict:
    """CP over ``group`` (size cp) against one process: out, dq, dk, dv; flex forward; the gather."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_smd.parallel.cp import all_gather_cp

    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    pg_single = ProcessGroupCollection(tp=one, cp=one)
    pg_cp = ProcessGroupCollection(tp=one, cp=group)
    s, b = 8 * cp, 2
    res = {}
    for name, heads in (("per_layer", None), ("per_head", HKV), ("causal", "none")):
        evict = None if heads == "none" else _evict(gen, b, s, heads, [3 * cp, 5 * cp])  # row 0 packs 2 docs
        q = torch.randn(s, b, HQ, D, generator=gen)
        k = torch.randn(s, b, HKV, D, generator=gen)
        v = torch.randn(s, b, HKV, D, generator=gen)
        dout = torch.randn(s, b, HQ * D, generator=gen)
        ref = _run(_attn(pg_single), q, k, v, evict, dout)
        mine = _run(_attn(pg_cp), *(split_for_cp(t, 0, rank, cp) for t in (q, k, v)), evict,
                    split_for_cp(dout, 0, rank, cp))
        res[name] = max(_err(_gather_rows(m, cp, group), r) for m, r in zip(mine, ref))
        # the local rows alone, against the reference cut by Megatron's own CP batch split
        ref_local = get_batch_on_this_cp_rank({"x": ref[0].transpose(0, 1)}, cp_group=group)["x"].transpose(0, 1)
        res[f"{name}_local_rows"] = _err(mine[0], ref_local)

    evict = _evict(gen, b, s, HKV, [s // 2, s // 2])
    q, k, v = (torch.randn(s, b, h, D, generator=gen) for h in (HQ, HKV, HKV))
    with torch.no_grad():
        ref_out = _attn(pg_single)(q, k, v, evict)
        flex = _attn(pg_cp, "flex")(*(split_for_cp(t, 0, rank, cp) for t in (q, k, v)), evict)
    res["flex_forward"] = _err(_gather_rows(flex, cp, group), ref_out)

    x_full = torch.randn(s, 3, generator=gen)
    weights = torch.randn(cp, s, 3, generator=gen)  # rank r's loss is sum(weights[r] * gathered)
    expected = split_for_cp(weights.sum(0), 0, rank, cp)  # d/dx: the sum over ranks, own rows
    for mode in ("all_reduce", "reduce_scatter"):
        x = split_for_cp(x_full, 0, rank, cp).requires_grad_(True)
        y = all_gather_cp(x, 0, group, grad_reduce=mode)
        (y * weights[rank]).sum().backward()
        res[f"gather_value_{mode}"] = _err(y.detach(), x_full)
        res[f"gather_grad_{mode}"] = _err(x.grad, expected)
    return res


def _tp_checks(group, one, gen) -> dict:
    """Heads split over ``group`` (tp = 2: ng=2 split; tp = 4: Megatron replicates the 2 KV groups)."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    s, b = 16, 2
    evict = _evict(gen, b, s, HKV, [4, 12])
    q, k, v = (torch.randn(s, b, h, D, generator=gen) for h in (HQ, HKV, HKV))
    dout = torch.randn(s, b, HQ * D, generator=gen)
    ref = _run(_attn(ProcessGroupCollection(tp=one, cp=one)), q, k, v, evict, dout)
    if tp <= HKV:  # rank r: q heads [r*HQ/tp, ...), kv heads [r*HKV/tp, ...)
        qh = slice(rank * HQ // tp, (rank + 1) * HQ // tp)
        kh = slice(rank * HKV // tp, (rank + 1) * HKV // tp)
        core_groups = HKV
    else:  # SelfAttention hands core attention a config copy with num_query_groups = tp
        qh = slice(rank * HQ // tp, (rank + 1) * HQ // tp)
        kh = slice(rank // (tp // HKV), rank // (tp // HKV) + 1)
        core_groups = tp
    mine = _run(_attn(ProcessGroupCollection(tp=group, cp=one), groups=core_groups),
                q[:, :, qh], k[:, :, kh], v[:, :, kh], evict, dout.view(s, b, HQ, D)[:, :, qh].reshape(s, b, -1))
    res = {"out": _err(mine[0], ref[0].view(s, b, HQ, D)[:, :, qh].reshape(s, b, -1)),
           "dq": _err(mine[1], ref[1][:, :, qh])}
    dk, dv = mine[2].clone(), mine[3].clone()
    if tp > HKV:  # ranks sharing a replicated kv head each hold part of its gradient
        for t in (dk, dv):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t, group=group)
            t.copy_(sum(parts[r] for r in range(tp) if r // (tp // HKV) == rank // (tp // HKV)))
    res["dk"], res["dv"] = _err(dk, ref[2][:, :, kh]), _err(dv, ref[3][:, :, kh])
    return res


def _parallel_state_checks(one, gen) -> dict:
    """No pg_collection: the CP group comes from megatron.core.parallel_state (cp=2, dp=2 here)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    parallel_state.initialize_model_parallel(context_parallel_size=2)
    group = parallel_state.get_context_parallel_group()
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    s, b = 16, 2
    evict = _evict(gen, b, s, None, [s // 2, s // 2])
    q, k, v = (torch.randn(s, b, h, D, generator=gen) for h in (HQ, HKV, HKV))
    dout = torch.randn(s, b, HQ * D, generator=gen)
    ref = _run(_attn(ProcessGroupCollection(tp=one, cp=one)), q, k, v, evict, dout)
    implicit = _attn(None)
    mine = _run(implicit, *(split_for_cp(t, 0, rank, cp) for t in (q, k, v)), evict, split_for_cp(dout, 0, rank, cp))
    res = {"cp_size": float(implicit.cp_size),
           "err": max(_err(_gather_rows(m, cp, group), r) for m, r in zip(mine, ref))}
    parallel_state.destroy_model_parallel()
    return res


def _worker(rank: int, world: int) -> dict:
    """4 ranks: CP=2 on {0,1} and {2,3}, CP=4 on all, TP=2 / TP=4 likewise, parallel_state cp=2."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    from megatron_smd.parallel import cpu_shim

    cpu_shim.apply()  # SelfAttention's linear layers ask torch.cuda for the current device
    dist.init_process_group("gloo", rank=rank, world_size=world)
    singles = [dist.new_group([r]) for r in range(world)]
    pairs = [dist.new_group([2 * p, 2 * p + 1]) for p in range(world // 2)]
    one, pair, everyone = singles[rank], pairs[rank // 2], dist.group.WORLD
    gen = torch.Generator().manual_seed(1234)  # same stream on every rank
    res: dict = {}
    for tag, group in (("cp2", pair), ("cp4", everyone)):
        res.update({f"{tag}_{k}": v for k, v in _cp_checks(group, one, gen).items()})
    for tag, group in (("tp2", pair), ("tp4_replicated_kv", everyone)):
        res.update({f"{tag}_{k}": v for k, v in _tp_checks(group, one, gen).items()})
    res.update({f"parallel_state_{k}": v for k, v in _parallel_state_checks(one, gen).items()})
    res.update(_self_attention_checks(pair, one, gen))
    return res


def _self_attention_checks(group, one, gen) -> dict:
    """A whole Megatron SelfAttention (QKV projection, RoPE, output projection): ours vs Megatron's
    local DotProductAttention, and CP over ``group`` vs one process (with RoPE's CP slicing)."""
    import copy

    import torch.distributed as dist

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_smd.learner.attention import ShadowCoreAttention

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()  # the local DotProductAttention's score buffer
    tensor_parallel.get_cuda_rng_tracker().add("model-parallel-rng", 1234)  # its (inactive) dropout fork
    cfg = TransformerConfig(num_layers=L, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV,
                            kv_channels=D, attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True)
    spec = get_gpt_layer_local_spec().submodules.self_attention
    ours_spec = copy.deepcopy(spec)
    ours_spec.submodules.core_attention = ModuleSpec(module=ShadowCoreAttention, params={"backend": "sdpa"})
    pg1 = ProcessGroupCollection(tp=one, cp=one, pp=one)
    torch.manual_seed(0)
    megatron_local = build_module(spec, config=cfg, layer_number=2, pg_collection=pg1)
    ours = build_module(ours_spec, config=cfg, layer_number=2, pg_collection=pg1)
    ours.load_state_dict(megatron_local.state_dict())
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    s, b = 8 * world, 2
    x = torch.randn(s, b, HQ * D, generator=gen)
    emb = RotaryEmbedding(kv_channels=D, rotary_percent=1.0, cp_group=one)(s)
    out_megatron, _ = megatron_local(x, attention_mask=None, rotary_pos_emb=emb)
    out_ours, _ = ours(x, attention_mask=None, rotary_pos_emb=emb)
    dense = torch.full((b, L, s), s, dtype=torch.int32)  # never evicted == causal
    out_dense, _ = ours(x, attention_mask=dense, rotary_pos_emb=emb)
    res = {"selfattn_vs_megatron_local": _err(out_ours, out_megatron),
           "selfattn_dense_evict_vs_megatron_local": _err(out_dense, out_megatron)}

    evict = _evict(gen, b, s, HKV, [s // 2, s // 2])
    xg = x.clone().requires_grad_(True)
    full_out, _ = ours(xg, attention_mask=evict, rotary_pos_emb=emb)
    full_out.backward(torch.ones_like(full_out))
    cp_cfg = copy.deepcopy(cfg)
    cp_cfg.context_parallel_size = world
    ours_cp = build_module(ours_spec, config=cp_cfg, layer_number=2,
                           pg_collection=ProcessGroupCollection(tp=one, cp=group, pp=one))
    ours_cp.load_state_dict(ours.state_dict())
    emb_cp = RotaryEmbedding(kv_channels=D, rotary_percent=1.0, cp_group=group)(s)  # this rank's positions
    xl = split_for_cp(x, 0, rank, world).requires_grad_(True)
    cp_out, _ = ours_cp(xl, attention_mask=evict, rotary_pos_emb=emb_cp)
    cp_out.backward(torch.ones_like(cp_out))
    res["selfattn_cp2_out"] = _err(cp_out, split_for_cp(full_out.detach(), 0, rank, world))
    res["selfattn_cp2_dx"] = _err(xl.grad, split_for_cp(xg.grad, 0, rank, world))
    # parameter gradients: the CP ranks' contributions sum to the single-process gradient
    w_cp = ours_cp.linear_qkv.weight.grad.clone()
    dist.all_reduce(w_cp, group=group)
    res["selfattn_cp2_dW_qkv"] = _err(w_cp, ours.linear_qkv.weight.grad)
    return res


@pytest.mark.slow
def test_cp_and_tp_match_single_process():
    """One spawn of 4 gloo ranks (process start-up dominates the cost): CP=2, CP=4, TP=2, TP=4."""
    results = run_distributed(_worker, world_size=4)
    for rank, res in enumerate(results):
        print(f"rank {rank}: " + ", ".join(f"{k}={v:.1e}" for k, v in res.items()))
        assert res.pop("parallel_state_cp_size") == 2
        bad = {k: v for k, v in res.items() if not v <= TOL}
        assert not bad, f"rank {rank}: errors above {TOL}: {bad}"
