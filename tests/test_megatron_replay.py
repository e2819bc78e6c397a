"""Issue-3 acceptance: the Megatron learner, under TP / PP / CP, replays the *reference engine's* rollouts.

Shadow-mode log-probs equal the sampler's (fp32, <= 1e-5) for every policy, per-layer and per-head
masks, packed and unpacked rows, with TP=2, PP=2 and CP=2 each on 2 gloo processes and TP=2 x CP=2 on
4; the dense learner on the same compressed rollouts does not (the gap is printed).
"""

import json
import subprocess
import sys

import pytest
import torch

from megatron_smd.policies import PolicyConfig
from megatron_smd.rollout.engine import ReferenceEngine, SamplingParams
from megatron_smd.rollout.io import RolloutBatch, save_rollouts

from _dist import run_distributed

pytestmark = pytest.mark.slow  # torchrun / gloo ranks

TOL = 1e-5
POLICIES = [
    ("streaming", "layer", dict(budget=14, sinks=2)),
    ("h2o", "head", dict(budget=14, window=4)),
    ("snapkv", "layer", dict(budget=12, window=4)),
    ("rkv", "head", dict(budget=14, window=4, buffer=4)),
    ("h2o", "layer", dict(budget=14, window=4)),
]


@pytest.fixture(scope="module")
def rollout_dirs(tmp_path_factory, tiny_qwen2_dir):
    out = []
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (9, 21)]
    for name, gran, kw in POLICIES:
        eng = ReferenceEngine.from_pretrained(tiny_qwen2_dir, PolicyConfig(name=name, granularity=gran, **kw))
        trajs, _ = eng.generate(prompts, n=2, sampling=SamplingParams(max_new_tokens=19, seed=3))
        d = tmp_path_factory.mktemp("ro") / f"{name}-{gran}"
        save_rollouts(d, RolloutBatch.from_trajectories(trajs, {"model_path": str(tiny_qwen2_dir), "num_layers": 4,
                                                                 "sampling": {"temperature": 1.0}}))
        out.append(str(d))
    return out


def _replay_all(rank, world, dirs, layouts):
    from megatron_smd.learner.learner import Learner, LearnerSettings
    from megatron_smd.model.hf import read_arch
    from megatron_smd.parallel.layout import ParallelLayout
    from megatron_smd.replay import gap_metrics
    from megatron_smd.rollout.io import load_rollouts

    batches = [load_rollouts(d) for d in dirs]
    model_dir = batches[0].meta["model_path"]
    arch = read_arch(model_dir)
    res = {}
    for tp, pp, cp in layouts:
        lay = ParallelLayout(world_size=world, tp=tp, pp=pp, cp=cp)
        lay.initialize(seed=1)
        learner = Learner(arch, lay, LearnerSettings(micro_batch_size=2), weights=model_dir, train=False)
        for d, b in zip(dirs, batches):
            for packed in (False, True):
                for mode in ("shadow", "dense"):
                    m = gap_metrics(learner.logprobs(b, mode, packed=packed), b)
                    res[(tp, pp, cp, d.rsplit("/", 1)[-1], packed, mode)] = m["max_abs_logprob_diff"]
        lay.destroy(process_group=False)
    return res


def _check(res):
    worst_shadow = max(v for k, v in res.items() if k[-1] == "shadow")
    best_dense = min(v for k, v in res.items() if k[-1] == "dense")
    for k, v in res.items():
        if k[-1] == "shadow":
            assert v <= TOL, (k, v)
        else:
            assert v > 100 * TOL, (k, v)
    print(f"\nshadow gap <= {worst_shadow:.2e}; dense gap >= {best_dense:.2e} over {len(res) // 2} cases")


def test_tp2_pp2_cp2_on_two_ranks(rollout_dirs):
    out = run_distributed(_replay_all, 2, (rollout_dirs, [(2, 1, 1), (1, 2, 1), (1, 1, 2)]), timeout=600)
    _check(out[0])


def test_tp2_x_cp2_on_four_ranks(rollout_dirs):
    out = run_distributed(_replay_all, 4, (rollout_dirs[:2], [(2, 1, 2)]), timeout=600)
    _check(out[0])


def test_cli_json(rollout_dirs):
    proc = subprocess.run([sys.executable, "-m", "megatron_smd.cli", "replay", "--rollouts", rollout_dirs[1],
                           "--learner", "megatron", "--tp", "2", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    assert res["shadow"]["max_abs_logprob_diff"] <= TOL
    assert res["dense"]["max_abs_logprob_diff"] > 100 * TOL


def test_impossible_layout_is_refused_with_numbers(rollout_dirs):
    from megatron_smd.errors import SMDError
    from megatron_smd.replay import replay_megatron

    with pytest.raises(SMDError, match="3"):
        replay_megatron(rollout_dirs[0], tp=3)


def _grads_worker(rank, world, rollout_dir, layouts):
    """Gradient of mean shadow log-prob over completion tokens, gathered to HF names on rank 0."""
    import torch.distributed as dist

    from megatron_smd.learner.convert import megatron_to_hf
    from megatron_smd.learner.learner import Learner, LearnerSettings
    from megatron_smd.learner.runner import run_microbatches
    from megatron_smd.model.hf import read_arch
    from megatron_smd.parallel.layout import ParallelLayout
    from megatron_smd.rollout.io import load_rollouts

    b = load_rollouts(rollout_dir)
    arch = read_arch(b.meta["model_path"])
    coef = _mean_coef(b)
    out = {}
    for tp, pp, cp in layouts:
        lay = ParallelLayout(world_size=world, tp=tp, pp=pp, cp=cp)
        lay.initialize(seed=1)
        learner = Learner(arch, lay, LearnerSettings(micro_batch_size=2), weights=b.meta["model_path"], train=False)
        mbs = learner.microbatches(b, list(range(len(b))), ["shadow"], {"coef": coef})
        learner.model.zero_grad(set_to_none=True)
        run_microbatches(learner.model, lay, mbs, vocab_size=arch.vocab_size, forward_only=False,
                         loss_fn=lambda logp, mb: (-(logp * mb.extras["coef"]).sum(), 1))
        mine = None
        if lay.dp_rank == 0 and lay.cp_rank == 0:
            mine = ((lay.tp_rank, lay.pp_rank), {k: p.grad.detach().clone() for k, p in learner.model.named_parameters()})
        got = [None] * world
        dist.all_gather_object(got, mine)
        out[(tp, pp, cp)] = megatron_to_hf(dict(x for x in got if x is not None), arch, tp, pp) if rank == 0 else None
        lay.destroy(process_group=False)
    return out


def _mean_coef(b):
    T = b.tokens.shape[1]
    t = torch.arange(T).view(1, T)
    m = ((t >= b.prompt_lens.view(-1, 1)) & (t < b.seq_lens.view(-1, 1))).float()
    return m / m.sum()


def test_gradients_match_independent_torch_reference(rollout_dirs):
    """Megatron's gradients under the shadow mask, for TP=2 / PP=2 / CP=2 (2 ranks) and TP=2 x CP=2
    (4 ranks), equal the pure-torch model's autograd gradients (<= 1e-5 absolute; the loss is a
    token mean, so gradients are O(0.1) and fp32 summation order stays far below the tolerance)."""
    from megatron_smd.model.transformer import RefTransformer
    from megatron_smd.replay import sequence_logprobs as token_logprobs
    from megatron_smd.rollout.io import load_rollouts

    d = rollout_dirs[1]  # per-head H2O
    b = load_rollouts(d)
    ref = RefTransformer.from_pretrained(b.meta["model_path"]).train()
    coef = _mean_coef(b)
    loss = 0.0
    for n in range(len(b)):
        s = int(b.seq_lens[n])
        toks = b.tokens_of(n).unsqueeze(0)
        lp = token_logprobs(ref(toks, evict=b.evict_of(n).unsqueeze(0))[0], toks[0])
        loss = loss - (lp * coef[n, :s]).sum()
    loss.backward()
    want = {k: p.grad for k, p in ref.named_parameters()}
    got = run_distributed(_grads_worker, 2, (d, [(2, 1, 1), (1, 2, 1), (1, 1, 2)]), timeout=600)[0]
    got.update(run_distributed(_grads_worker, 4, (d, [(2, 1, 2)]), timeout=600)[0])
    scale = max(g.abs().max().item() for g in want.values())
    for layout, g in got.items():
        worst = max((g[k] - want[k]).abs().max().item() for k in want if k != "lm_head.weight")
        print(f"\n{layout}: max |grad diff| {worst:.2e} (largest gradient {scale:.2e})")
        assert worst <= 1e-5, (layout, worst)
