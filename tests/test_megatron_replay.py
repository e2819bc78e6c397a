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
    from megatron_smd.learner.replay import replay_megatron

    with pytest.raises(SMDError, match="3"):
        replay_megatron(rollout_dirs[0], tp=3)
