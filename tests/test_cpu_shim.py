"""The CPU shim for megatron-core (megatron_smd/parallel/cpu_shim.py): apply / undo, idempotence,
and its ``Tensor.cuda`` stand-in answering megatron-core's own calls only.

Everything runs in one spawn of 2 gloo processes (tests/_dist.py), so the shim never enters the
pytest process. Each rank, in order:

1. imports the megatron-core modules the shim touches and snapshots, by identity, ``vars()`` of
   ``torch.cuda``, ``torch.Tensor``, every loaded ``megatron.core`` module and every class defined
   in one;
2. applies the shim, snapshots again, applies it a second time, snapshots again, undoes it,
   snapshots again (the round trip must change nothing, the second apply must change nothing);
3. with the shim on, calls ``.cuda()`` from code whose module is in ``megatron_smd`` (must raise,
   naming the caller), from this test module (must raise) and from a ``megatron.core`` module
   (must give the tensor back);
4. ``ParallelLayout.initialize`` (which applies the shim again) with PP=2, builds the tiny Qwen2
   learner (tied embeddings: the last stage's output weight is zero-filled, passed through
   megatron-core's ``weight.data.cuda()`` and all-reduced with the first stage's embedding) and runs
   a forward pass through Megatron's pipeline schedule;
5. undoes the shim after that use and snapshots the patched attributes again;
6. uses ``active()`` (undone on exit unless applied before the block).
"""

from __future__ import annotations

import pytest
import torch

from _dist import run_distributed

pytestmark = pytest.mark.slow  # a spawn of 2 gloo ranks

# Modules the shim patches (an independent list: the module docstring's call sites), imported
# before the first snapshot so that importing them is not mistaken for a change.
SHIM_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.random",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
)
# (object path, attribute) that must be replaced while the shim is on and be the very same object
# again after undo. An attribute a class inherits (not in its own __dict__) is recorded as absent.
KEY_ATTRIBUTES = (
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
    ("torch.cuda", "Stream"),
    ("torch.cuda", "manual_seed"),
    ("torch:Tensor", "cuda"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.pipeline_parallel.schedules", "torch"),
    ("megatron.core.utils", "torch"),
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "get_pos_emb_on_this_cp_rank"),
    ("megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer", "_build_model_and_main_param_groups"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
)
ABSENT = "<absent>"


# ------------------------------------------------------------------------------------------------
# worker (spawned processes)
# ------------------------------------------------------------------------------------------------


def _resolve(path: str):
    import importlib

    mod_name, _, cls_name = path.partition(":")
    obj = importlib.import_module(mod_name)
    return getattr(obj, cls_name) if cls_name else obj


def _label(obj) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}:{obj.__qualname__}"
    return getattr(obj, "__name__", repr(obj))


def _owners() -> list:
    """torch.cuda, torch.Tensor, every loaded megatron.core module and every class defined in one."""
    import sys
    import types

    mods = [m for n, m in sorted(sys.modules.items())
            if isinstance(m, types.ModuleType) and (n == "megatron.core" or n.startswith("megatron.core."))]
    owners: dict[int, object] = {id(torch.cuda): torch.cuda, id(torch.Tensor): torch.Tensor}
    for m in mods:
        owners[id(m)] = m
        for v in list(vars(m).values()):
            if isinstance(v, type) and str(getattr(v, "__module__", "")).startswith("megatron.core"):
                owners[id(v)] = v
    return list(owners.values())


def _snapshot(owners: list) -> dict:
    return {id(o): (o, dict(vars(o))) for o in owners}


def _changed(before: dict, after: dict) -> list[tuple[str, str]]:
    """(owner, attribute) whose value in ``vars(owner)`` is not the same object (or appeared/vanished)."""
    out = []
    for key, (owner, old) in before.items():
        new = after[key][1]
        for name in sorted(set(old) | set(new)):
            if old.get(name, ABSENT) is not new.get(name, ABSENT):
                out.append((_label(owner), name))
    return sorted(out)


def _key_values() -> dict[tuple[str, str], object]:
    return {(path, name): vars(_resolve(path)).get(name, ABSENT) for path, name in KEY_ATTRIBUTES}


def _cuda_from(module_name: str, t: torch.Tensor):
    """``t.cuda()`` made by code whose module is ``module_name``: (returned tensor is t, error or None)."""
    scope = {"__name__": module_name, "t": t}
    code = compile("result = t.cuda()", f"<code of {module_name}>", "exec")
    try:
        exec(code, scope)  # noqa: S102 (a caller with a chosen module name)
    except BaseException as e:  # noqa: BLE001 (reported to the test)
        return False, f"{type(e).__name__}: {e}"
    return scope["result"] is t, None


def _own_cuda_call(t: torch.Tensor):
    """``t.cuda()`` from this test module itself."""
    try:
        t.cuda()
    except BaseException as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def _shim_worker(rank: int, world: int) -> dict:
    import importlib
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_smd.parallel import cpu_shim

    res: dict = {"needed": cpu_shim.is_needed(), "applied_at_start": cpu_shim.is_applied()}
    for name in SHIM_MODULES:
        importlib.import_module(name)

    # 1-2: round trip and idempotence, compared by identity over everything reachable
    owners = _owners()
    before, keys_before = _snapshot(owners), _key_values()
    res["apply"] = cpu_shim.apply()
    first = _snapshot(owners)
    res["changed_by_apply"] = _changed(before, first)
    res["patched_attributes"] = sorted((_label(o), n) for o, n in cpu_shim.patched_attributes())
    keys_on = _key_values()
    res["keys_not_replaced"] = sorted(k for k in keys_before if keys_on[k] is keys_before[k])
    res["apply_again"] = cpu_shim.apply()
    res["changed_by_second_apply"] = _changed(first, _snapshot(owners))

    # 3: Tensor.cuda() callers while the shim is on
    t = torch.arange(4.0)
    res["cuda_from_project"] = _cuda_from("megatron_smd.learner.runner", t)
    res["cuda_from_test"] = _own_cuda_call(t)
    res["test_module"] = __name__
    res["cuda_from_megatron"] = _cuda_from("megatron.core.models.common.language_module.language_module", t)

    res["undo"] = cpu_shim.undo()
    res["undo_again"] = cpu_shim.undo()
    res["changed_by_round_trip"] = _changed(before, _snapshot(owners))
    res["applied_after_undo"] = cpu_shim.is_applied()
    res["cuda_from_megatron_after_undo"] = _cuda_from("megatron.core.models.common.language_module.language_module", t)

    # 4: megatron-core builds and runs the learner on CPU under the shim (applied by the layout)
    from megatron_smd.learner.model import build_gpt_model
    from megatron_smd.learner.runner import MicroBatch, run_microbatches
    from megatron_smd.model.tiny import tiny_arch
    from megatron_smd.parallel.layout import ParallelLayout

    layout = ParallelLayout.from_env(tp=1, pp=2, cp=1)
    layout.initialize(seed=0)
    res["applied_by_layout"] = cpu_shim.is_applied()
    arch = tiny_arch("qwen2", vocab_size=250, pad_token_id=None)
    torch.manual_seed(0)
    model = build_gpt_model(arch, attention_backend="sdpa")
    res["pp_rank"] = layout.pp_rank
    res["shared_weight"] = model.shared_embedding_or_output_weight().detach().clone()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (2, 32), generator=g)
    mb = MicroBatch(tokens=tokens, position_ids=torch.arange(32).expand(2, 32).clone(),
                    targets=torch.randint(0, arch.vocab_size, (2, 32), generator=g))
    with torch.no_grad():
        res["logprobs"] = torch.stack(run_microbatches(model, layout, [mb, mb], vocab_size=arch.vocab_size,
                                                       forward_only=True).logprobs)
    layout.destroy(process_group=False)

    # 5: undo after use: every patched attribute is the original object again
    patched_in_use = [(_label(o), n, o) for o, n in cpu_shim.patched_attributes()]
    res["undo_after_use"] = cpu_shim.undo()
    res["patched_in_use"] = sorted((label, n) for label, n, _ in patched_in_use)
    res["not_restored_after_use"] = sorted(
        (label, n) for label, n, o in patched_in_use
        if vars(o).get(n, ABSENT) is not before[id(o)][1].get(n, ABSENT))
    keys_after = _key_values()
    res["keys_not_restored_after_use"] = sorted(k for k in keys_before if keys_after[k] is not keys_before[k])
    res["cuda_from_project_after_use"] = _cuda_from("megatron_smd.learner.runner", t)

    # active(): on inside the block, off after it; left on when it was applied before the block
    with cpu_shim.active() as on:
        res["active_inside"] = (on, cpu_shim.is_applied(), _cuda_from("megatron.core.utils", t)[0])
    res["active_after"] = (cpu_shim.is_applied(), [k for k in keys_before if _key_values()[k] is not keys_before[k]])
    cpu_shim.apply()
    with cpu_shim.active() as on:
        pass
    res["active_when_already_applied"] = (on, cpu_shim.is_applied())
    cpu_shim.undo()
    return res


# ------------------------------------------------------------------------------------------------
# tests (pytest process)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_shim_worker, world_size=2, timeout=600)


def test_the_shim_is_needed_and_starts_off(ranks):
    for r in ranks:
        assert r["needed"] and not r["applied_at_start"]


def test_apply_undo_round_trip_restores_every_attribute(ranks):
    for r in ranks:
        assert r["apply"] is True
        assert r["keys_not_replaced"] == []  # every key attribute was replaced while on
        assert r["changed_by_apply"] == r["patched_attributes"]  # the record names every change
        assert len(r["patched_attributes"]) >= len(KEY_ATTRIBUTES)
        assert r["undo"] is True and r["undo_again"] is False and not r["applied_after_undo"]
        assert r["changed_by_round_trip"] == []  # every object in every __dict__ is the original


def test_apply_twice_is_idempotent(ranks):
    for r in ranks:
        assert r["apply_again"] is True
        assert r["changed_by_second_apply"] == []


def test_cuda_from_project_code_fails_under_the_shim(ranks):
    for r in ranks:
        same, err = r["cuda_from_project"]
        assert not same and err.startswith("RuntimeError: Tensor.cuda() called from megatron_smd.learner.runner")
        assert "without CUDA" in err
        assert r["cuda_from_test"].startswith(f"RuntimeError: Tensor.cuda() called from {r['test_module']} (")


def test_megatron_core_cuda_calls_keep_working_under_the_shim(ranks):
    for r in ranks:
        assert r["cuda_from_megatron"] == (True, None)
        same, err = r["cuda_from_megatron_after_undo"]  # undone: torch's own refusal again
        assert not same and err is not None and "Tensor.cuda() called from" not in err


def test_megatron_core_builds_and_runs_the_model_on_cpu_under_the_shim(ranks):
    assert [r["pp_rank"] for r in ranks] == [0, 1]
    assert all(r["applied_by_layout"] for r in ranks)
    # The last stage's tied output weight started at zero; megatron-core moved it with
    # weight.data.cuda() and all-reduced it with the first stage's embedding.
    first, last = ranks[0]["shared_weight"], ranks[1]["shared_weight"]
    assert first.abs().max() > 0 and torch.equal(first, last)
    for r in ranks:
        lp = r["logprobs"]
        assert lp.shape == (2, 2, 32) and torch.isfinite(lp).all() and (lp <= 0).all()
    assert torch.equal(ranks[0]["logprobs"], ranks[1]["logprobs"])


def test_undo_after_use_restores_every_patched_attribute(ranks):
    for r in ranks:
        assert r["undo_after_use"] is True
        assert r["patched_in_use"] == r["patched_attributes"]
        assert r["not_restored_after_use"] == [] and r["keys_not_restored_after_use"] == []
        same, err = r["cuda_from_project_after_use"]
        assert not same and "Tensor.cuda() called from" not in err


def test_active_context_manager(ranks):
    for r in ranks:
        assert r["active_inside"] == (True, True, True)
        assert r["active_after"] == (False, [])  # undone on exit, key attributes the originals again
        assert r["active_when_already_applied"] == (True, True)  # not undone: applied before the block
