"""Reference engine: dense path vs `transformers`, exact replay under the exported mask, real memory savings.

Tolerances (fp32, CPU): dense logits vs transformers <= 1e-4; shadow replay vs sampler log-probs
<= 1e-5 (the measured gap is ~5e-7, the floor of fp32 summation-order differences between the
cached decode and the parallel forward).
"""

import pytest
import torch

from megatron_smd.mask import validate_evict
from megatron_smd.model.transformer import RefTransformer
from megatron_smd.policies import PolicyConfig
from megatron_smd.replay import gap_metrics, torch_replay_logprobs
from megatron_smd.rollout.engine import ReferenceEngine, SamplingParams
from megatron_smd.rollout.io import RolloutBatch

transformers = pytest.importorskip("transformers")

REPLAY_TOL = 1e-5


def _hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def qwen(tiny_qwen2_dir):
    return RefTransformer.from_pretrained(tiny_qwen2_dir)


def _prompts(vocab, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("which", ["qwen2", "llama"])
def test_dense_logits_match_transformers(which, tiny_qwen2_dir, tiny_llama_dir):
    d = tiny_qwen2_dir if which == "qwen2" else tiny_llama_dir
    ref = RefTransformer.from_pretrained(d)
    toks = torch.tensor(_prompts(ref.arch.vocab_size, [40, 40], seed=3))
    with torch.no_grad():
        diff = (ref(toks) - _hf(d)(toks).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("which", ["qwen2", "llama"])
def test_engine_decode_logprobs_match_transformers(which, tiny_qwen2_dir, tiny_llama_dir):
    """The cached decode path (policy none) against transformers' full forward of the same tokens."""
    d = tiny_qwen2_dir if which == "qwen2" else tiny_llama_dir
    eng = ReferenceEngine.from_pretrained(d)
    trajs, _ = eng.generate(_prompts(eng.arch.vocab_size, [17, 9]), n=2,
                            sampling=SamplingParams(max_new_tokens=24, temperature=0.7, seed=5))
    hf = _hf(d)
    for t in trajs:
        toks = torch.tensor([t.tokens])
        with torch.no_grad():
            lp = torch.log_softmax(hf(toks).logits[0].float() / 0.7, -1)
        ref = lp[:-1].gather(-1, toks[0, 1:, None])[:, 0]
        diff = (ref[t.prompt_len - 1:] - t.sampler_logprobs[t.prompt_len:]).abs().max().item()
        assert diff <= 1e-4, diff


POLICIES = [
    ("none", "layer", {}),
    ("streaming", "layer", dict(budget=20, sinks=4)),
    ("h2o", "layer", dict(budget=20, window=6)),
    ("h2o", "head", dict(budget=20, window=6)),
    ("snapkv", "layer", dict(budget=16, window=4)),
    ("snapkv", "head", dict(budget=16, window=4)),
    ("rkv", "layer", dict(budget=20, window=6, buffer=6)),
    ("rkv", "head", dict(budget=20, window=6, buffer=6)),
    ("streaming", "head", dict(budget=12, sinks=2)),
]


@pytest.mark.parametrize("name,gran,kw", POLICIES, ids=[f"{p[0]}-{p[1]}" for p in POLICIES])
def test_replay_under_exported_mask_is_exact(qwen, name, gran, kw):
    cfg = PolicyConfig() if name == "none" else PolicyConfig(name=name, granularity=gran, **kw)
    eng = ReferenceEngine(qwen, cfg)
    # several prompt lengths: shorter than, close to, and longer than the budget
    prompts = _prompts(qwen.arch.vocab_size, [5, 19, 37], seed=11)
    trajs, stats = eng.generate(prompts, n=2, sampling=SamplingParams(max_new_tokens=40, seed=7))
    L, H = qwen.arch.num_layers, qwen.arch.num_kv_heads
    for t in trajs:
        validate_evict(t.evict, seq_end=t.seq_len, num_layers=L, num_kv_heads=H)
        assert t.evict.dim() == (3 if gran == "head" else 2)
    batch = RolloutBatch.from_trajectories(trajs, {"sampling": {"temperature": 1.0}})
    gaps = {}
    for packed in (False, True):
        shadow = gap_metrics(torch_replay_logprobs(qwen, batch, "shadow", packed=packed), batch)
        dense = gap_metrics(torch_replay_logprobs(qwen, batch, "dense", packed=packed), batch)
        gaps[packed] = (shadow["max_abs_logprob_diff"], dense["max_abs_logprob_diff"])
        assert shadow["max_abs_logprob_diff"] <= REPLAY_TOL, (packed, shadow)
        if name != "none":
            # the ordinary dense learner is off-policy on a compressed rollout
            assert dense["max_abs_logprob_diff"] > 100 * REPLAY_TOL, (packed, dense)
    print(f"\n{name}/{gran}: shadow gap {gaps[False][0]:.2e} (packed {gaps[True][0]:.2e}), "
          f"dense gap {gaps[False][1]:.2e}")
    if name != "none":
        assert stats.evictions > 0 or name == "snapkv"


@pytest.mark.parametrize("name,kw", [("streaming", dict(sinks=4)), ("h2o", dict(window=16)),
                                      ("rkv", dict(window=16, buffer=8))])
def test_cache_never_exceeds_budget(qwen, name, kw):
    """Every decode query saw at most budget (+1 for itself, + buffer for R-KV) keys."""
    budget = 24
    eng = ReferenceEngine(qwen, PolicyConfig(name=name, budget=budget, **kw))
    trajs, _ = eng.generate(_prompts(qwen.arch.vocab_size, [10]), n=2, sampling=SamplingParams(max_new_tokens=60))
    slack = 1 + kw.get("buffer", 0)
    for t in trajs:
        T = t.seq_len
        i = torch.arange(t.prompt_len, T).view(-1, 1)
        j = torch.arange(T).view(1, -1)
        visible = ((j <= i) & (i < t.evict.unsqueeze(1))).sum(-1)  # [L, Tq]
        assert int(visible.max()) <= budget + slack


def test_memory_really_saved_at_quarter_budget(tiny_qwen2_dir):
    """Budget = 25% of the sequence on long generations: peak held KV bytes <= 30% of dense."""
    from megatron_smd.bench.rollout import bench_rollout

    res = bench_rollout(model_dir=tiny_qwen2_dir, prompt_tokens=32, new_tokens=480, num_prompts=2, group_size=2,
                        policies=("streaming", "h2o", "rkv"))
    print("\n", {k: round(v["kv_bytes_ratio_vs_none"], 3) for k, v in res["policies"].items()})
    assert res["budget_frac"] <= 0.25
    for name in ("streaming", "h2o", "rkv"):
        assert res["policies"][name]["kv_bytes_ratio_vs_none"] <= 0.30, (name, res["policies"][name])


def test_group_shares_one_prefill_and_samples_differ(qwen, monkeypatch):
    eng = ReferenceEngine(qwen, PolicyConfig(name="h2o", budget=16, window=4))
    calls = []
    orig = eng._prefill
    monkeypatch.setattr(eng, "_prefill", lambda p, s: calls.append(len(p)) or orig(p, s))
    prompts = _prompts(qwen.arch.vocab_size, [12, 30])
    trajs, _ = eng.generate(prompts, n=4, sampling=SamplingParams(max_new_tokens=12, seed=3))
    assert calls == [12, 30], "each prompt must be prefilled exactly once per group"
    assert len(trajs) == 8 and [t.prompt_index for t in trajs] == [0, 0, 0, 0, 1, 1, 1, 1]
    comps = {tuple(t.tokens[t.prompt_len:]) for t in trajs[:4]}
    assert len(comps) > 1, "samples of a group should differ at temperature 1"
    # the same call twice is deterministic
    again, _ = ReferenceEngine(qwen, PolicyConfig(name="h2o", budget=16, window=4)).generate(
        prompts, n=4, sampling=SamplingParams(max_new_tokens=12, seed=3))
    assert [t.tokens for t in again] == [t.tokens for t in trajs]


def test_stop_token_ends_sample_and_is_kept(qwen):
    eng = ReferenceEngine(qwen)
    trajs, _ = eng.generate(_prompts(qwen.arch.vocab_size, [8]), n=1,
                            sampling=SamplingParams(max_new_tokens=5, temperature=0))
    first = trajs[0].tokens[8]
    trajs, _ = eng.generate(_prompts(qwen.arch.vocab_size, [8]), n=1,
                            sampling=SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=(first,)))
    assert trajs[0].tokens[8:] == [first] and trajs[0].finish_reason == "stop"
