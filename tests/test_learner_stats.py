"""Training statistics are reduced over the whole mini-batch, and the full-vocabulary distillation KL.

* ``train/clip_frac`` and ``train/distill_kl`` from :func:`megatron_smd.trainer.learn` equal a
  hand-computed value over *all* micro-batches (every DP rank's share), for PP=1 (DP=2) and PP=2,
  with 1 and with 4 micro-batches per rank: action tokens where PPO's clipped branch is taken over
  all action tokens, and the coefficient-weighted distillation KL over the mini-batch. The
  reference uses the learner's forward-only log-probs at the same weights (the statistics are of
  the first, pre-update forward) and plain torch over the whole batch. Tolerance: clip_frac exact
  (a count ratio), distill_kl 1e-6 relative (fp32 sums in a different order).
* ``estimator: full``: :func:`~megatron_smd.parallel.vocab_parallel.vocab_parallel_distill_kl`
  equals an fp64 dense KL of the full vocabulary (padded columns excluded, temperature applied)
  at <= 1e-6, value and gradient, for every direction, with the vocabulary split over TP=1 and
  TP=2; and ``learn()`` with ``estimator: full`` logs that KL under TP=2 and PP=2.

One 2-rank gloo launch covers everything.
"""

from pathlib import Path

import pytest
import torch

from megatron_smd.policies import PolicyConfig
from megatron_smd.rollout.engine import ReferenceEngine, SamplingParams
from megatron_smd.rollout.io import RolloutBatch

from _dist import run_distributed

pytestmark = pytest.mark.slow  # gloo ranks

REPO = Path(__file__).resolve().parent.parent
N_TRAJ = 8
TEMP = 0.9


def _rollout(model_dir) -> RolloutBatch:
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (9, 14, 17, 21)]
    eng = ReferenceEngine.from_pretrained(model_dir, PolicyConfig(name="h2o", budget=10, window=3))
    trajs, _ = eng.generate(prompts, n=2, sampling=SamplingParams(max_new_tokens=12, seed=4, temperature=TEMP))
    b = RolloutBatch.from_trajectories(trajs, {"sampling": {"temperature": TEMP}, "rewards": [0.0] * len(trajs)})
    # sampler log-probs off the learner's, so that PPO clips some tokens at the first micro-step
    noise = torch.randn(b.sampler_logprobs.shape, generator=g) * 0.3
    b.sampler_logprobs = b.sampler_logprobs + noise * (b.sampler_logprobs != 0)
    b.meta["rewards"] = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0]).tolist()
    return b


def _cfg(model_dir, estimator, mbs, tp=1, pp=1, dp=1):
    from megatron_smd.config import load_config

    return load_config(REPO / "configs" / "tiny-cpu.yaml", [
        f"model.path={model_dir}", "sft.enabled=false", "algorithm.correction=smd", "algorithm.epochs=1",
        "algorithm.minibatches=1", "algorithm.distill.coef=0.5", f"algorithm.distill.estimator={estimator}",
        "algorithm.distill.direction=sparse_to_dense", f"learner.micro_batch_size={mbs}", "learner.lr=1e-3",
        f"resources.tp={tp}", f"resources.pp={pp}", f"resources.dp={dp}"])


def _reference(learner, batch, adv, cfg):
    """clip_frac and the k3 distillation KL by hand over the whole batch (token mean)."""
    from megatron_smd.rollout.io import completion_mask as action_mask

    alg = cfg.algorithm
    mask = action_mask(batch)
    lp_sh = learner.logprobs(batch, "shadow", temperature=TEMP).double()
    lp_de = learner.logprobs(batch, "dense", temperature=TEMP).double()
    lp_s = batch.sampler_logprobs.double()
    ratio = (lp_sh - lp_s).exp()
    a = adv.double().view(-1, 1)
    clipped = (ratio.clamp(1 - alg.clip_low, 1 + alg.clip_high) * a) < ratio * a
    clip_frac = float((clipped & mask).sum()) / float(mask.sum())
    log_r = lp_de - lp_sh
    k3 = (log_r.exp() - 1 - log_r)[mask].mean().item()
    return clip_frac, k3


def _fp64_full_kl(ls, ld, V, direction):
    """KL over the first V columns at temperature TEMP, fp64, with autograd."""
    ps, pd = torch.log_softmax(ls[..., :V].double() / TEMP, -1), torch.log_softmax(ld[..., :V].double() / TEMP, -1)
    lt, lst = (pd, ps) if direction == "dense_to_sparse" else (ps, pd)
    if direction != "both":  # the teacher is detached
        lt = lt.detach()
    return (lt.exp() * (lt - lst)).sum(-1)


def _worker(rank, world, model_dir, batch):
    from megatron_smd.learner.learner import Learner
    from megatron_smd.model.hf import read_arch
    from megatron_smd.parallel.layout import ParallelLayout
    from megatron_smd.parallel.vocab_parallel import vocab_parallel_distill_kl
    from megatron_smd.trainer import Context, advantages, learn, learner_settings
    import torch.distributed as dist

    arch = read_arch(model_dir)
    out = {"stats": {}, "kl": {}}
    # ---- full-vocabulary KL against fp64, TP = 1 (a one-rank group) and TP = 2 (the world)
    torch.distributed.init_process_group("gloo")
    g = torch.Generator().manual_seed(3)
    V, Vp = 37, 40
    ls = torch.randn(3, 5, Vp, generator=g, dtype=torch.float64) * 2
    ld = ls + torch.randn(3, 5, Vp, generator=g, dtype=torch.float64)
    w = torch.rand(3, 5, generator=g, dtype=torch.float64)
    solo = [dist.new_group([r]) for r in range(world)][rank]
    for direction in ("sparse_to_dense", "dense_to_sparse", "both"):
        a, b = ls.clone().requires_grad_(True), ld.clone().requires_grad_(True)
        want = _fp64_full_kl(a, b, V, direction)
        (want * w).sum().backward()
        ref_ga = a.grad if a.grad is not None else torch.zeros_like(a)
        ref_gb = b.grad if b.grad is not None else torch.zeros_like(b)
        for tp, group in ((1, solo), (2, dist.group.WORLD)):
            cols = slice(rank * Vp // tp, (rank + 1) * Vp // tp) if tp == 2 else slice(0, Vp)
            xa = ls[..., cols].float().clone().requires_grad_(True)
            xb = ld[..., cols].float().clone().requires_grad_(True)
            got = vocab_parallel_distill_kl(xa, xb, vocab_size=V, direction=direction, temperature=TEMP, group=group)
            (got * w.float()).sum().backward()
            ga = xa.grad if xa.grad is not None else torch.zeros_like(xa)
            gb = xb.grad if xb.grad is not None else torch.zeros_like(xb)
            out["kl"][(direction, tp)] = ((got.double() - want.detach()).abs().max().item(),
                                          (ga.double() - ref_ga[..., cols]).abs().max().item(),
                                          (gb.double() - ref_gb[..., cols]).abs().max().item(),
                                          want.detach().abs().max().item(),
                                          max(ref_ga.abs().max().item(), ref_gb.abs().max().item()))
    # ---- statistics over every micro-batch, PP=1 (DP=2) and PP=2; and estimator full under TP=2 / PP=2
    runs = [("k3", 1, 1, 2, 4), ("k3", 1, 1, 2, 1), ("k3", 1, 2, 1, 8), ("k3", 1, 2, 1, 2),
            ("full", 2, 1, 1, 2), ("full", 1, 2, 1, 2)]
    for est, tp, pp, dp, mbs in runs:
        cfg = _cfg(model_dir, est, mbs, tp, pp, dp)
        lay = ParallelLayout(world_size=world, tp=tp, pp=pp)
        lay.initialize(seed=1)
        learner = Learner(arch, lay, learner_settings(cfg), weights=model_dir)
        adv = advantages(Context(cfg=cfg, layout=lay, learner=learner, ref_learner=None, engine=None), batch)
        ref = _reference(learner, batch, adv, cfg)
        ctx = Context(cfg=cfg, layout=lay, learner=learner, ref_learner=None, engine=None)
        st = learn(ctx, batch, adv, step=0)
        out["stats"][(est, tp, pp, dp, mbs)] = (st["train/clip_frac"], st["train/distill_kl"], *ref)
        lay.destroy(process_group=False)
    return out


@pytest.fixture(scope="module")
def results(tiny_qwen2_dir):
    return run_distributed(_worker, 2, args=(str(tiny_qwen2_dir), _rollout(tiny_qwen2_dir)), timeout=600)


def test_full_kl_matches_fp64_reference_tp1_tp2(results):
    for r in results:
        for (direction, tp), (dv, dga, dgb, scale, gscale) in r["kl"].items():
            print(f"full KL {direction} TP={tp}: |value - fp64| {dv:.1e} (KL up to {scale:.2f}), "
                  f"|grad - fp64| {max(dga, dgb):.1e} (grad up to {gscale:.2f})")
            assert dv <= 1e-6 and dga <= 1e-6 and dgb <= 1e-6, (direction, tp, dv, dga, dgb)


def test_statistics_are_the_whole_minibatch_under_any_layout(results):
    stats = results[0]["stats"]
    for r in results[1:]:
        assert r["stats"] == stats  # every rank logs the same numbers (rank 0 under PP=2 included)
    k3 = {k: v for k, v in stats.items() if k[0] == "k3"}
    for (est, tp, pp, dp, mbs), (clip, kl, ref_clip, ref_kl) in k3.items():
        print(f"PP={pp} DP={dp} {N_TRAJ // dp // mbs} micro-batch(es)/rank: clip_frac {clip:.6f} (hand {ref_clip:.6f}), "
              f"distill_kl {kl:.8f} (hand {ref_kl:.8f})")
        assert 0 < ref_clip < 1 and ref_kl > 0
        assert abs(clip - ref_clip) <= 1e-12, (pp, mbs, clip, ref_clip)
        assert abs(kl - ref_kl) <= 1e-6 * ref_kl, (pp, mbs, kl, ref_kl)


def test_full_estimator_trains_under_tp2_and_pp2(results):
    stats = results[0]["stats"]
    full = [v for k, v in stats.items() if k[0] == "full"]
    assert len(full) == 2
    # the full KL >= 0 and of the size of the per-token k3 estimate on the same forward
    for clip, kl, ref_clip, ref_k3 in full:
        assert kl > 0 and 0.2 * ref_k3 < kl < 5 * ref_k3, (kl, ref_k3)
    assert abs(full[0][1] - full[1][1]) <= 1e-5 * full[0][1]  # TP=2 and PP=2 agree
