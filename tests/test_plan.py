"""`smd plan`: every preset plans; the planner's numbers agree with measured ones; bad layouts are rejected.

What is measured, and against what:

* **Learner parameters, gradients, Adam state** (one spawn of 2 gloo ranks, four layouts in turn:
  TP=1, TP=2, PP=2, CP=2): the Megatron learner model (``build_gpt_model``) of the tiny Qwen2 (tied
  embeddings) and tiny Llama (untied) is built, its parameters counted per rank; for TP=1 and TP=2
  one forward/backward of the vocab-parallel log-prob and one ``torch.optim.Adam`` step give the
  gradient and optimizer-state bytes. The planner's per-stage ``params`` must be exact; weights /
  grads / optimizer bytes within 10% (the issue's tolerance; the only slack is Adam's scalar step
  counters).
* **Learner activations**: the bytes of every tensor autograd saves during that forward
  (``saved_tensors_hooks``, deduplicated by storage, parameters excluded) vs the planner's
  activations of the same micro-batch (2 rows x 64 tokens, sdpa): within 10% (measured 0.1% for
  TP=1/2 and CP=2, 3% with full recomputation, where small per-micro-batch inputs dominate).
* **Rollout KV**: ``ReferenceEngine.generate``'s ``RolloutStats.peak_kv_bytes_used`` (live slots)
  must *equal* the planner's formula for the same shape, for every policy, with and without
  prefill compression; and ``plan()``'s per-request bytes equal the engine's for one request.
* **Architectures**: the presets' parameter counts match the sizes the model cards publish (1%).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_smd.cli import add_cli
from megatron_smd.config import ExperimentConfig, load_config
from megatron_smd.errors import ConfigError
from megatron_smd.model.hf import ModelArch
from megatron_smd.plan import (
    batch_peak_tokens,
    format_plan,
    format_shell,
    hf_param_count,
    kv_bytes_per_token,
    launch_vars,
    plan,
    request_peak_tokens,
)
from megatron_smd.policies import PolicyConfig

from _dist import run_distributed

REPO = Path(__file__).resolve().parent.parent
PRESETS = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-32b", "qwen3-8b", "llama3.1-8b",
           "r1-distill-qwen-7b"]
EXPERIMENTS = ["qwen2.5-7b-grpo", "r1-distill-qwen-7b-rkv"]
# Total parameters published on the model cards (Qwen2.5 / Qwen3 tables, Llama-3.1 and
# DeepSeek-R1-Distill Hugging Face pages).
PUBLISHED_B = {"qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.61, "qwen2.5-32b": 32.5,
               "qwen3-8b": 8.2, "llama3.1-8b": 8.03, "r1-distill-qwen-7b": 7.62}
TINY = str(REPO / "configs" / "tiny-cpu.yaml")
MEASURE_TOL = 0.10
SEQ, ROWS = 64, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ============================================================================ presets
@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_validates_and_plans(name):
    path = REPO / "configs" / "models" / f"{name}.yaml"
    assert path.read_text().startswith("# Launch: "), f"{path}: the first line must give the launch command"
    cfg = load_config(path)
    assert cfg.model.arch is not None, "real-model presets carry their architecture"
    d = plan(cfg)
    assert d["ok"], format_plan(d)
    assert d["learner"]["status"] in ("fits", "tight") and d["rollout"]["status"] in ("fits", "queued")
    assert json.loads(json.dumps(d)) == d  # JSON-serializable as is
    text = format_plan(d)
    assert "learner" in text and "rollout" in text
    # the architecture was copied right: the parameter count matches the published size
    got = hf_param_count(cfg.model.arch.to_model_arch()) / 1e9
    assert abs(got - PUBLISHED_B[name]) / PUBLISHED_B[name] < 0.01, (name, got)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_files_plan(name):
    path = REPO / "configs" / f"{name}.yaml"
    assert path.read_text().startswith("# Launch: ")
    d = plan(load_config(path))
    assert d["ok"], format_plan(d)


def test_compression_shrinks_the_rollout_and_recompute_the_learner():
    cfg = load_config(REPO / "configs" / "models" / "r1-distill-qwen-7b.yaml")
    ro = plan(cfg)["rollout"]
    # R-KV at a 2048 budget + 128 buffer vs a dense 4096 + 16384 - 1 token trajectory
    assert ro["tokens_per_request_dense"] == 4096 + 16384 - 1
    assert ro["tokens_per_request"] == 4096  # the prompt, prefilled densely, is the peak
    assert ro["concurrent_requests"] > 4 * ro["concurrent_requests_dense"]
    on = plan(cfg)["learner"]
    off = plan(load_config(REPO / "configs" / "models" / "r1-distill-qwen-7b.yaml",
                           ["learner.megatron.recompute_granularity=null"]))["learner"]
    # per layer: only the D-wide input survives (vs ~6D + QKV + attention + 5F/t per token)
    assert off["layer_activation_bytes"] > 10 * on["layer_activation_bytes"]
    assert off["stages"][0]["activations_bytes"] > 5 * on["stages"][0]["activations_bytes"]


def test_a_layout_that_does_not_fit_is_flagged():
    d = plan(load_config(REPO / "configs" / "models" / "qwen2.5-32b.yaml", ["resources.tp=1", "resources.pp=1",
                                                                          "resources.dp=16"]))
    assert not d["ok"] and d["learner"]["status"] == "does not fit"
    # 32.8 B params x 16 B (fp32 weights + grads + Adam) on one GPU
    assert d["learner"]["per_gpu_bytes"] > 32e9 * 16
    assert any("learner needs" in w for w in d["warnings"])
    d = plan(load_config(REPO / "configs" / "models" / "qwen2.5-7b.yaml", ["resources.gpu_memory_gb=8"]))
    assert not d["ok"] and d["rollout"]["status"] == "does not fit"


# ============================================================================ rejections
@pytest.mark.parametrize("override, needles", [
    ("resources.tp=3", ["num_attention_heads=28", "tp=3"]),
    ("resources.pp=5", ["num_hidden_layers=28", "pp=5"]),
    ("resources.cp=3", ["model.max_seq_len=8192", "2*cp = 6"]),
    ("resources.rollout_tp=3", ["resources.rollout_tp", "3 is not supported: the patched SGLang server"]),
    ("resources.nodes=2", ["4*1*1*2 = 8", "2*8 = 16"]),
])
def test_layouts_that_cannot_work_are_rejected_with_the_numbers(override, needles):
    with pytest.raises(ConfigError) as e:
        plan(load_config(REPO / "configs" / "models" / "qwen2.5-7b.yaml", [override]))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_a_preset_file_with_a_broken_layout_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs" / "models" / "qwen2.5-7b.yaml").read_text().replace("  tp: 4\n", "  tp: 3\n"))
    exp = tmp_path / "exp.yaml"
    exp.write_text("# Launch: smd plan --config exp.yaml\npreset: bad.yaml\n")
    with pytest.raises(ConfigError, match=r"num_attention_heads=28 is not divisible by tp=3"):
        plan(load_config(exp))
    r = subprocess.run([sys.executable, "-m", "megatron_smd.plan", "--config", str(exp)], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 2 and "error: " in r.stderr and "tp=3" in r.stderr


def test_arch_must_agree_with_the_model_directory(tiny_qwen2_dir):
    from megatron_smd.model.hf import read_arch

    a = read_arch(tiny_qwen2_dir)
    arch = dict(arch=a.arch, vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                intermediate_size=a.intermediate_size, num_layers=a.num_layers, num_heads=a.num_heads,
                num_kv_heads=a.num_kv_heads, tie_word_embeddings=a.tie_word_embeddings, head_dim=a.head_dim,
                rope_theta=a.rope_theta, rms_norm_eps=a.rms_norm_eps,
                max_position_embeddings=a.max_position_embeddings)
    ok = load_config(TINY, [f"model.path={tiny_qwen2_dir}", f"model.arch={json.dumps(arch)}"])
    assert plan(ok)["model"]["source"].endswith("config.json")
    bad = load_config(TINY, [f"model.path={tiny_qwen2_dir}", f"model.arch={json.dumps(dict(arch, num_layers=2 * a.num_layers))}"])
    with pytest.raises(ConfigError, match=rf"num_layers: model.arch={2 * a.num_layers}, config.json={a.num_layers} \(the run uses config.json"):
        plan(bad)


# ============================================================================ launch variables
def test_launch_vars_round_trip_through_bash(tmp_path):
    cfg = load_config(REPO / "configs" / "models" / "qwen2.5-32b.yaml",
                      [f"model.path={tmp_path}/dir with 'quotes' and spaces"])
    v = launch_vars(cfg)
    script = format_shell(v) + '\nprintf "%s\\n" "$SMD_NPROC_PER_NODE" "$SMD_ENGINES_PER_NODE" "${SMD_SGLANG_ARGS[@]}"\n'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:2] == ["8", "8"]  # one engine per GPU of a rollout node
    from megatron_smd.plan import policy_flags

    assert out[2:] == ["--model-path", f"{tmp_path}/dir with 'quotes' and spaces", "--tp-size", "1",
                       "--mem-fraction-static", "0.85", "--attention-backend", "triton", "--page-size", "1",
                       "--disable-overlap-schedule", "--cuda-graph-backend-decode", "disabled",
                       *policy_flags(cfg.rollout.policy)]
    # the whole policy reaches the servers, not only its name and budget
    flags = dict(zip(out[2:], out[3:]))
    p = cfg.rollout.policy
    assert (flags["--smd-policy"], flags["--smd-budget"], flags["--smd-window"]) == ("h2o", "2048", str(p.window))
    assert flags["--smd-granularity"] == "layer" and flags["--smd-sinks"] == str(p.sinks)


def test_add_cli_registers_smd_plan(capsys):
    import argparse

    p = argparse.ArgumentParser(prog="smd")
    add_cli(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["plan", "--config", str(REPO / "configs" / "models" / "qwen2.5-7b.yaml"), "--json",
                      "resources.gpu_memory_gb=141"])
    assert a.fn(a) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layout"]["gpu_memory_bytes"] == 141 * 10**9


# ============================================================================ rollout KV vs the engine
KV_CASES = [
    # (policy, prompt_len, new_tokens, num_prompts, group_size)
    (dict(name="none"), 20, 12, 2, 3),
    (dict(name="streaming", budget=16, sinks=4), 10, 20, 2, 2),
    (dict(name="h2o", budget=16, window=4), 10, 20, 2, 3),
    (dict(name="h2o", budget=16, window=4), 30, 8, 3, 2),            # compresses the prompt too
    (dict(name="h2o", budget=16, window=4, granularity="head"), 12, 16, 1, 2),
    (dict(name="snapkv", budget=16, window=4), 30, 10, 2, 2),
    (dict(name="rkv", budget=12, window=4, buffer=6), 8, 25, 2, 2),
]


@pytest.mark.parametrize("pol, P, N, n_prompts, n", KV_CASES)
def test_kv_bytes_equal_the_reference_engine(tiny_qwen2_dir, pol, P, N, n_prompts, n):
    from megatron_smd.rollout.engine import ReferenceEngine, SamplingParams

    policy = PolicyConfig(**pol)
    eng = ReferenceEngine.from_pretrained(tiny_qwen2_dir, policy, kv_growth=5)
    g = torch.Generator().manual_seed(P * 31 + N)
    prompts = [torch.randint(3, eng.arch.vocab_size, (P,), generator=g).tolist() for _ in range(n_prompts)]
    _, stats = eng.generate(prompts, n=n, sampling=SamplingParams(max_new_tokens=N, temperature=1.0, seed=1))
    per_tok = kv_bytes_per_token(eng.arch, dtype_bytes=4)
    want = batch_peak_tokens(policy, P, N, n_prompts, n) * per_tok
    assert stats.peak_kv_bytes_used == want
    dense = batch_peak_tokens(PolicyConfig(), P, N, n_prompts, n) * per_tok
    if policy.name != "none":
        assert want < dense  # the formula is not the dense one in disguise


@pytest.mark.parametrize("pol", [dict(name="none"), dict(name="h2o", budget=16, window=4),
                                 dict(name="rkv", budget=12, window=4, buffer=6)])
def test_plan_bytes_per_request_equal_one_engine_request(tiny_qwen2_dir, pol):
    from megatron_smd.rollout.engine import ReferenceEngine, SamplingParams

    P, N = 24, 20
    cfg = load_config(TINY, [f"model.path={tiny_qwen2_dir}", f"model.max_seq_len={P + N}",
                             f"rollout.max_new_tokens={N}", f"rollout.policy={json.dumps(pol)}"])
    ro = plan(cfg)["rollout"]
    eng = ReferenceEngine.from_pretrained(tiny_qwen2_dir, PolicyConfig(**pol))
    _, stats = eng.generate([list(range(3, 3 + P))], n=1, sampling=SamplingParams(max_new_tokens=N, seed=0))
    assert ro["bytes_per_request"] == stats.peak_kv_bytes_used
    assert ro["tokens_per_request"] == request_peak_tokens(PolicyConfig(**pol), P, N)


# ============================================================================ learner vs Megatron
def _tiny_cfg(tp: int = 1, pp: int = 1, cp: int = 1, recompute: bool = False, preset: str | None = None
              ) -> ExperimentConfig:
    over = [f"resources.tp={tp}", f"resources.pp={pp}", f"resources.cp={cp}", f"model.max_seq_len={SEQ}",
            f"learner.micro_batch_size={ROWS}", "algorithm.correction=dense", "rollout.max_new_tokens=16",
            "model.path=/nonexistent/tiny"]  # sized from model.init, as a fresh checkout would be
    if preset:
        over.append(f"preset={preset}")
    if recompute:
        over.append("learner.megatron={recompute_granularity: full, recompute_method: uniform, "
                    "recompute_num_layers: 1}")
    return load_config(TINY, over)


def _measure_worker(rank: int, world: int, archs: dict, layouts: list) -> dict:
    """Per layout and arch: this rank's parameter count and, where asked, grad / Adam / activation bytes."""
    from megatron.core import parallel_state as ps

    from megatron_smd.learner.model import build_gpt_model
    from megatron_smd.parallel.cp import local_positions
    from megatron_smd.parallel.layout import ParallelLayout
    from megatron_smd.parallel.vocab_parallel import vocab_parallel_token_logprobs

    torch.manual_seed(0)
    out = {}
    for name, tp, pp, cp, recompute, train in layouts:
        layout = ParallelLayout(world_size=world, tp=tp, pp=pp, cp=cp)
        layout.initialize(seed=1)
        for an, ad in archs.items():
            arch = ModelArch(**ad)
            model = build_gpt_model(arch, recompute=recompute)
            params = list(model.parameters())
            res = dict(stage=ps.get_pipeline_model_parallel_rank(), params=sum(p.numel() for p in params),
                       weights_bytes=sum(p.numel() * p.element_size() for p in params))
            if train and an == "qwen2":
                s = SEQ // cp
                pos = local_positions(SEQ, ps.get_context_parallel_rank(), cp).expand(ROWS, s)
                ids = torch.randint(0, arch.vocab_size, (ROWS, s))
                evict = torch.full((ROWS, arch.num_layers, SEQ), SEQ, dtype=torch.int32)
                storages: dict[int, int] = {}

                def pack(t):
                    st = t.untyped_storage()
                    storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    logits = model(ids, pos, attention_mask=evict)
                    lp = vocab_parallel_token_logprobs(logits, ids, vocab_size=arch.vocab_size)
                own = {p.untyped_storage().data_ptr() for p in params}
                res["activations_bytes"] = sum(v for k, v in storages.items() if k not in own)
                (-lp.sum()).backward()
                opt = torch.optim.Adam(params, lr=1e-3)
                opt.step()
                res["grads_bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in params)
                res["optimizer_bytes"] = sum(t.numel() * t.element_size() for st in opt.state.values()
                                             for t in st.values() if torch.is_tensor(t))
            out[(name, an)] = res
            del model
        layout.destroy(process_group=False)
    return out


@pytest.fixture(scope="module")
def measured():
    archs = {an: plan(_tiny_cfg(preset=preset))["model"]["arch"]
             for an, preset in (("qwen2", None), ("llama", "tiny-llama"))}
    assert archs["qwen2"]["tie_word_embeddings"] and not archs["llama"]["tie_word_embeddings"]
    layouts = [("tp1", 1, 1, 1, False, True), ("tp1_recompute", 1, 1, 1, True, True),
               ("tp2", 2, 1, 1, False, True), ("pp2", 1, 2, 1, False, False), ("cp2", 1, 1, 2, False, True)]
    return run_distributed(_measure_worker, 2, args=(archs, layouts), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name, tp, pp, cp", [("tp1", 1, 1, 1), ("tp2", 2, 1, 1), ("pp2", 1, 2, 1),
                                              ("cp2", 1, 1, 2)])
@pytest.mark.parametrize("arch_name", ["qwen2", "llama"])
def test_learner_params_grads_and_adam_state_match_megatron(measured, name, tp, pp, cp, arch_name):
    cfg = _tiny_cfg(tp, pp, cp, preset="tiny-llama" if arch_name == "llama" else None)
    stages = plan(cfg)["learner"]["stages"]
    for rank in range(2):
        got = measured[rank][(name, arch_name)]
        want = stages[got["stage"]]
        print(f"{name}/{arch_name} rank {rank}: measured {got}, planned params {want['params']}, "
              f"optimizer {want['optimizer_bytes']} B")
        assert got["params"] == want["params"], (rank, got, want)
        for key in ("weights_bytes", "grads_bytes", "optimizer_bytes"):
            if key in got:
                assert abs(got[key] - want[key]) <= MEASURE_TOL * want[key], (key, got[key], want[key])
    if pp == 2 and arch_name == "qwen2":  # tied embeddings: the last stage holds a synchronized copy
        assert stages[1]["params"] == stages[0]["params"] + cfg.model.init.hidden_size  # + final norm


@pytest.mark.slow
@pytest.mark.parametrize("name, tp, cp, recompute", [("tp1", 1, 1, False), ("tp1_recompute", 1, 1, True),
                                                     ("tp2", 2, 1, False), ("cp2", 1, 2, False)])
def test_learner_activations_match_the_bytes_autograd_saves(measured, name, tp, cp, recompute):
    d = plan(_tiny_cfg(tp, 1, cp, recompute))
    assert d["learner"]["rows_per_microbatch"] == ROWS and d["learner"]["seq_len"] == SEQ
    want = d["learner"]["stages"][0]["activations_bytes"]  # one micro-batch in flight (pp = 1)
    for rank in range(2):
        got = measured[rank][(name, "qwen2")]["activations_bytes"]
        print(f"{name}: measured {got} B, planned {want} B ({got / want:.4f})")
        assert abs(got - want) <= MEASURE_TOL * want, (name, got, want)
