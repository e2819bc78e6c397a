"""Every setting does what it says, on every path, or is refused.

Two parts:

* **What each field does** (:data:`megatron_smd.config.SETTINGS`): every field of the schema is
  classified there as affecting the run or as planning/launch only, planning/launch-only fields say
  so in their docstrings, and each field is seen to take effect. A run field is changed and the run
  compared bit for bit with the unchanged one (the TensorBoard scalars of every step, the SFT weights,
  the files written) or seen refused with its reason; a planning field is changed and `smd plan`'s
  result or the launchers' variables compared. A new field without a class or a probe fails here.
* **Settings that used to be ignored**, one test each: optimizer settings on ``--resume``,
  ``learner.grad_clip`` in SFT, ``model.max_seq_len``, ``model.arch`` against config.json, the
  broadcast transport in `smd train`, ``sync.verify``'s probe, ``resources.rollout_tp``,
  ``resources.cpu_threads`` in `smd rollout`, ``stop_at_eos`` / ``kv_growth`` in the periodic evals,
  the GPU presets and launchers, resuming another model or layout, the SFT cache's fingerprint and
  ``learner.megatron.params_dtype``.

All runs are in process on the tiny model (1-2 RL steps, 2 prompts x 4 samples, 4 new tokens), from
a briefly warmed-up copy (40 SFT steps) so that rewards, and with them advantages, are not all zero.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from megatron_smd.config import PLAN, RUN, SETTINGS, ConfigError, load_config, schema_fields
from megatron_smd.errors import SMDError

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny-cpu.yaml"
# wall-clock and throughput scalars are not part of a run's result
NOISE = re.compile(r"^(time/|perf/|sync/seconds|sync/gb_per_s)")


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # ~140 short training runs


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory, tiny_qwen2_dir):
    """The tiny model after 40 SFT steps: it answers with a digit and <eos>, about 1 time in 5."""
    from megatron_smd.model.hf import read_arch
    from megatron_smd.sft import run_sft
    from megatron_smd.trainer import init_layout

    out = tmp_path_factory.mktemp("warm") / "model"
    cfg = load_config(TINY, [f"model.path={tiny_qwen2_dir}", "sft.steps=40", "sft.batch_size=16", "sft.lr=3e-3",
                             "sft.warmup_steps=10", "sft.eval_every=40", *(f"{k}={v}" for k, v in KV_TASK.items())])
    layout = init_layout(cfg, read_arch(tiny_qwen2_dir))
    try:
        run_sft(cfg, layout, Path(tiny_qwen2_dir), out, log=lambda *_: None)
    finally:
        layout.destroy()
    return out


def _overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in d.items()]


# The probes run on key-value recall with an 8-token H2O budget (prompts of ~27 tokens, so every
# eviction setting has something to evict); the pair_recall fields are probed on pair_recall.
KV_TASK = {"task.name": "kv_recall", "task.num_pairs": 4, "task.key_digits": 1, "task.value_digits": 1,
           "rollout.policy.budget": 8}


def base_overrides(model_dir, out) -> dict:
    return {**KV_TASK, "model.path": str(model_dir), "output_dir": str(out), "sft.enabled": False,
            "rollout.num_prompts": 2,
            "rollout.group_size": 4, "rollout.max_new_tokens": 4, "train.steps": 2, "train.eval_every": 0,
            "train.eval_prompts": 4, "train.save_every": 0, "logging.progress_bar": False,
            "logging.mask_images": 1, "logging.sample_text": 1}


def run_train(model_dir, out, over: dict, resume="none"):
    from megatron_smd.trainer import train

    cfg = load_config(TINY, _overrides({**base_overrides(model_dir, out), **over}))
    return train(cfg, resume=resume)["history"]


def scalars(history) -> list[dict]:
    return [{k: v for k, v in rec.items() if not NOISE.match(k)} for rec in history]


# ====================================================================== what every field does
def test_every_field_is_classified_once():
    fields = set(schema_fields())
    assert fields - set(SETTINGS) == set(), "fields without a class in megatron_smd.config.SETTINGS"
    assert set(SETTINGS) - fields == set(), "SETTINGS names fields the schema does not have"
    assert {c for c, _ in SETTINGS.values()} <= {RUN, PLAN}


def test_planning_fields_say_so_in_their_docstrings():
    fields = schema_fields()
    for name, (cls, _) in SETTINGS.items():
        doc = (fields[name].description or "").lower()
        if cls == PLAN:
            assert "launch only" in doc, f"{name}: a planning/launch-only field must say so in its docstring"
        else:
            assert "planning/launch only" not in doc, f"{name}: a run field documented as planning/launch only"


# A probe: (change, base, check). `change` is applied on top of `base` (both on top of
# base_overrides); `check` is "scalars" (the TensorBoard scalars of every step differ bit for bit),
# "sft" (the written SFT weights differ), "refused:REGEX" (the run stops with a ConfigError/SMDError
# matching REGEX before training), or a function (tmp_path, base_result, changed_result) -> None.
def _files(sub):
    def check(tmp, a, b):
        assert not (a["out"] / sub).exists() and (b["out"] / sub).exists() or \
            (a["out"] / sub).exists() and not (b["out"] / sub).exists(), sub
    return check


def _ckpts(tmp, a, b):
    names = lambda r: sorted(p.name for p in (r["out"] / "checkpoints").glob("step_*"))  # noqa: E731
    assert names(a) != names(b), (names(a), names(b))


def _threads(tmp, a, b):
    assert a["threads"] == 1 and b["threads"] == 2


def _tb_count(kind):
    def count(r):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ea = EventAccumulator(str(r["out"] / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
        ea.Reload()
        return len(ea.Tags()[kind])

    def check(tmp, a, b):
        assert count(a) != count(b), kind
    return check


def _progress(tmp, a, b):
    assert "train[" not in a["stderr"] and "train[" in b["stderr"]


def _synced_to(sub):
    def check(tmp, a, b):
        files = lambda r: sorted(p.name for p in (tmp / sub).rglob("*") if r["out"].name in str(p) or True)  # noqa
        assert (tmp / sub).is_dir() and any((tmp / sub).iterdir()), sub
    return check


def _preset_llama(tmp, a, b):
    assert json.loads((tmp / "preset-llama" / "config.json").read_text())["model_type"] == "llama"
    assert scalars(a["history"]) != scalars(b["history"])


def _unreachable(tmp, a, b):
    assert "127.0.0.1:9" in b["error"], b["error"]


_TASK_ARITH = {"task.name": "arith_chain", "task.num_pairs": 8, "task.num_queries": 2, "train.steps": 1}
_ROLL = {"train.steps": 1}
_SFT = {"sft.enabled": True, "sft.steps": 2, "sft.batch_size": 4, "sft.eval_every": 2, "sft.warmup_steps": 2,
        "train.steps": 1}
_DISK = {"sync.transport": "disk"}
_ADV2 = {"rollout.num_prompts": 8, "algorithm.epochs": 2}
# R-KV compresses when the cache reaches budget + buffer: decode long enough to get there
_RKV = {"rollout.policy.name": "rkv", "rollout.policy.buffer": 2, "rollout.stop_at_eos": False}
PROBES: dict[str, tuple[dict, dict, object]] = {
    "preset": ({"preset": "tiny-llama", "model.path": "{tmp}/preset-llama"}, {"train.steps": 1}, _preset_llama),
    "model.path": ({"model.path": "{tiny}"}, {}, "scalars"),
    **{f"model.init.{k}": ({"model.path": f"{{tmp}}/init-{k}", f"model.init.{k}": v},
                           {"model.path": "{tmp}/init-base", "train.steps": 1}, "scalars")
       for k, v in dict(arch="llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                        intermediate_size=128, tie_word_embeddings=False, seed=1).items()},
    "model.max_seq_len": ({"model.max_seq_len": 12}, {}, "refused:model.max_seq_len=12"),
    **{f"task.{k}": ({f"task.{k}": v}, _ROLL, "scalars")
       for k, v in dict(name="arith_chain", num_pairs=5, num_queries=2, seed=1, key_digits=2, value_digits=2).items()},
    **{f"task.{k}": ({f"task.{k}": v}, _TASK_ARITH, "scalars")
       for k, v in dict(modulus=7, max_depth=1, literal_prob=0.9).items()},
    **{f"task.{k}": ({f"task.{k}": v}, {"task.name": "pair_recall", "rollout.policy.budget": 3, "train.steps": 1},
                     "scalars") for k, v in dict(num_keys=5, num_values=3).items()},
    # the share of SFT answers that write the value early: what the warm start learns
    "task.note_prob": ({"task.note_prob": 0.9, "sft.out": "{tmp}/sft-note"},
                       {**_SFT, "task.name": "pair_recall", "rollout.policy.budget": 3, "sft.out": "{tmp}/sft-note-base"},
                       "sft"),
    "logging.term_grad_norms": ({"logging.term_grad_norms": True}, _ROLL, "scalars"),
    "rollout.backend": ({"rollout.backend": "sglang", "sync.transport": "sglang",
                         "rollout.sglang_urls": ["http://127.0.0.1:9"]}, _ROLL, _unreachable),
    "rollout.sglang_urls": ({"rollout.sglang_urls": ["http://127.0.0.1:9"]},
                            {"rollout.backend": "sglang", "sync.transport": "sglang",
                             "rollout.sglang_urls": ["http://127.0.0.1:8"], "train.steps": 1}, _unreachable),
    **{f"rollout.{k}": ({f"rollout.{k}": v}, _ROLL, "scalars")
       for k, v in dict(num_prompts=3, group_size=2, max_new_tokens=1, temperature=0.5, top_p=0.5, top_k=3,
                        stop_at_eos=False, seed=1, kv_growth=4).items()},
    "rollout.kv_cache_dtype": ({"rollout.kv_cache_dtype": "fp8_e4m3"}, _ROLL, "scalars"),
    "rollout.policy.name": ({"rollout.policy.name": "streaming"}, _ROLL, "scalars"),
    "rollout.policy.budget": ({"rollout.policy.budget": 10}, _ROLL, "scalars"),
    "rollout.policy.granularity": ({"rollout.policy.granularity": "head"}, _ROLL, "scalars"),
    "rollout.policy.window": ({"rollout.policy.window": 4}, _ROLL, "scalars"),
    "rollout.policy.sinks": ({"rollout.policy.sinks": 1}, {**_ROLL, "rollout.policy.name": "streaming"}, "scalars"),
    "rollout.policy.pool_kernel": ({"rollout.policy.pool_kernel": 3}, {**_ROLL, "rollout.policy.name": "snapkv"},
                                   "scalars"),
    "rollout.policy.pooling": ({"rollout.policy.pooling": "avg"}, {**_ROLL, "rollout.policy.name": "snapkv"},
                               "scalars"),
    "rollout.policy.buffer": ({"rollout.policy.buffer": 4}, {**_ROLL, **_RKV}, "scalars"),
    "rollout.policy.rkv_lambda": ({"rollout.policy.rkv_lambda": 0.9}, {**_ROLL, **_RKV}, "scalars"),
    "algorithm.correction": ({"algorithm.correction": "naive"}, {}, "scalars"),
    # 8 prompts: some groups have a correct sample (non-zero advantages); in the second epoch the
    # ratios move off 1, so a zero clip range clips them
    "algorithm.clip_low": ({"algorithm.clip_low": 0.0}, _ADV2, "scalars"),
    "algorithm.clip_high": ({"algorithm.clip_high": 0.0}, _ADV2, "scalars"),
    # 8 prompts: completions of different lengths (some stop at <eos> after one token)
    "algorithm.aggregation": ({"algorithm.aggregation": "seq_mean"}, {"rollout.num_prompts": 8}, "scalars"),
    "algorithm.normalize_adv_std": ({"algorithm.normalize_adv_std": False}, {}, "scalars"),
    "algorithm.epochs": ({"algorithm.epochs": 2}, {}, "scalars"),
    "algorithm.minibatches": ({"algorithm.minibatches": 2}, {}, "scalars"),
    "algorithm.kl_coef": ({"algorithm.kl_coef": 0.5}, {}, "scalars"),
    "algorithm.kl_estimator": ({"algorithm.kl_estimator": "k1"}, {"algorithm.kl_coef": 0.5}, "scalars"),
    "algorithm.tis_cap": ({"algorithm.tis_cap": 0.5}, {"algorithm.correction": "tis"}, "scalars"),
    "algorithm.sparse_rl.reject_min": ({"algorithm.sparse_rl.reject_min": 1.0}, {"algorithm.correction": "sparse_rl"},
                                       "scalars"),
    "algorithm.sparse_rl.reject_mean": ({"algorithm.sparse_rl.reject_mean": 1.0},
                                        {"algorithm.correction": "sparse_rl"}, "scalars"),
    "algorithm.sparse_rl.weight_min": ({"algorithm.sparse_rl.weight_min": 1.0},
                                       {"algorithm.correction": "sparse_rl"}, "scalars"),
    "algorithm.sparse_rl.weight_max": ({"algorithm.sparse_rl.weight_max": 0.5},
                                       {"algorithm.correction": "sparse_rl"}, "scalars"),
    "algorithm.distill.coef": ({"algorithm.distill.coef": 0.5}, {}, "scalars"),
    "algorithm.distill.direction": ({"algorithm.distill.direction": "dense_to_sparse"}, {}, "scalars"),
    "algorithm.distill.estimator": ({"algorithm.distill.estimator": "k3"}, {}, "scalars"),
    **{f"learner.{k}": ({f"learner.{k}": v}, {}, "scalars")
       for k, v in dict(lr=1e-3, weight_decay=0.5, adam_beta1=0.5, adam_beta2=0.9, adam_eps=1e-3, grad_clip=0.01,
                        micro_batch_size=1).items()},
    "learner.seed": ({"learner.seed": 1}, {"algorithm.minibatches": 2}, "scalars"),
    "learner.megatron": ({"learner.megatron": {"hidden_dropout": 0.2}}, {}, "scalars"),
    **{f"resources.{k}": ({f"resources.{k}": 2}, _ROLL, r"refused:(torchrun --nproc_per_node 2|world size 1 is not divisible by tp\*pp\*cp)")
       for k in ("tp", "pp", "cp", "dp")},
    "resources.cpu_threads": ({"resources.cpu_threads": 2}, {**_ROLL, "resources.cpu_threads": 1}, _threads),
    "train.steps": ({"train.steps": 3}, {}, "scalars"),
    "train.eval_every": ({"train.eval_every": 1}, {}, "scalars"),
    "train.eval_prompts": ({"train.eval_prompts": 8}, _ROLL, "scalars"),
    "train.save_every": ({"train.save_every": 1}, {}, _ckpts),
    "train.keep_checkpoints": ({"train.keep_checkpoints": 1}, {"train.save_every": 1}, _ckpts),
    "sft.enabled": ({"sft.enabled": False}, {**_SFT, "sft.out": "{tmp}/sft-enabled"}, "scalars"),
    "sft.out": ({"sft.out": "{tmp}/sft-out-b"}, {**_SFT, "sft.out": "{tmp}/sft-out-a"},
                lambda tmp, a, b: (tmp / "sft-out-b" / "config.json").is_file() or pytest.fail("not written")),
    **{f"sft.{k}": ({f"sft.{k}": v, "sft.out": f"{{tmp}}/sft-{k}"}, {**_SFT, "sft.out": "{tmp}/sft-base"}, "sft")
       for k, v in dict(steps=3, batch_size=8, lr=1e-2, warmup_steps=1).items()},
    "sft.target_reward": ({"sft.target_reward": 0.0, "sft.out": "{tmp}/sft-target"},
                          {**_SFT, "sft.eval_every": 1, "sft.out": "{tmp}/sft-target-base"}, "sft"),
    "sft.eval_every": ({"sft.eval_every": 1, "sft.out": "{tmp}/sft-every"},
                       {**_SFT, "sft.target_reward": 0.0, "sft.out": "{tmp}/sft-every-base"}, "sft"),
    "sync.transport": ({"sync.transport": "disk", "sync.dir": "{tmp}/sync-transport"}, _ROLL,
                       _synced_to("sync-transport")),
    "sync.dir": ({"sync.dir": "{tmp}/sync-dir-b"}, {**_ROLL, **_DISK, "sync.dir": "{tmp}/sync-dir-a"},
                 _synced_to("sync-dir-b")),
    "sync.bucket_mb": ({"sync.bucket_mb": 1}, {**_ROLL, "model.path": "{tmp}/init-wide",
                                               "model.init.hidden_size": 256}, "scalars"),
    "sync.verify": ({"sync.verify": True}, _ROLL, "scalars"),
    "logging.tensorboard": ({"logging.tensorboard": False}, _ROLL, _files("tensorboard")),
    "logging.mask_images": ({"logging.mask_images": 0}, _ROLL, _tb_count("images")),
    "logging.sample_text": ({"logging.sample_text": 0}, _ROLL, _tb_count("tensors")),
    "logging.progress_bar": ({"logging.progress_bar": True}, _ROLL, _progress),
    "output_dir": ({"output_dir": "{tmp}/elsewhere"}, _ROLL, lambda tmp, a, b: (
        (tmp / "elsewhere" / "config.yaml").is_file() or pytest.fail("nothing written under the new output_dir"))),
    "model.dtype": ({"model.dtype": "bfloat16"}, _ROLL, "scalars"),
}
#: run fields whose effect needs machinery this file does not start (live SGLang servers, a GPU,
#: several processes): the test named shows them taking effect
ELSEWHERE: dict[str, str] = {
    "learner.attention_backend": "tests/test_settings.py",  # test_attention_backend_reaches_the_learner
    "rollout.kv_scales": "tests/test_fp8_replay.py",  # calibrated scales loaded by smd rollout / replay / train
}
for _k in [k for k, (c, _) in SETTINGS.items() if k.startswith("rollout.faults.") and c == RUN]:
    ELSEWHERE.setdefault(_k, "tests/*")  # the rollout-server fault tests (live servers, injected faults)
for _k in ("learner.precision", "learner.distributed_optimizer"):
    ELSEWHERE.setdefault(_k, "tests/test_bf16.py")


def test_every_run_field_has_a_probe():
    run = {k for k, (c, _) in SETTINGS.items() if c == RUN}
    missing = run - set(PROBES) - set(ELSEWHERE)
    assert not missing, f"run fields without a test that changes them: {sorted(missing)}"
    assert not set(PROBES) - run, "probes for fields that are not run fields"
    for field, path in ELSEWHERE.items():
        files = [p for p in REPO.glob(path) if p.name != Path(__file__).name or path == "tests/test_settings.py"]
        leaf = field.rsplit(".", 1)[-1]
        assert any(leaf in p.read_text() for p in files if p.suffix == ".py"), f"{field}: no test in {path} changes it"


_cache: dict = {}


def _fill(v, tmp, tiny):
    if isinstance(v, str):
        return v.replace("{tmp}", str(tmp)).replace("{tiny}", str(tiny))
    return v


def _run_probe(over: dict, model_dir, tmp: Path, tiny, name: str, capfd) -> dict:
    key = json.dumps(over, sort_keys=True, default=str)
    if key in _cache:
        return _cache[key]
    out = tmp / f"run-{len(_cache)}-{name}"
    over = {k: _fill(v, tmp, tiny) for k, v in over.items()}
    res = {"out": Path(over.get("output_dir", out)), "error": "", "history": None}
    over.setdefault("output_dir", str(out))
    res["out"] = Path(over["output_dir"])
    capfd.readouterr()
    try:
        res["history"] = run_train(model_dir, out, over)
    except (SMDError, OSError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    res["threads"] = torch.get_num_threads()
    torch.set_num_threads(1)
    res["stderr"] = capfd.readouterr().err
    sft_out = over.get("sft.out")
    if over.get("sft.enabled") and sft_out and (Path(sft_out) / "model.safetensors").is_file():
        res["sft"] = (Path(sft_out) / "model.safetensors").read_bytes()
    _cache[key] = res
    return res


@pytest.fixture(scope="module")
def probe_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("probes")


def test_a_repeated_run_is_bit_identical(warm_dir, probe_tmp, tiny_qwen2_dir, capfd):
    """The comparisons below mean something: the same settings give the same scalars, bit for bit."""
    a = _run_probe({}, warm_dir, probe_tmp, tiny_qwen2_dir, "base", capfd)
    b = run_train(warm_dir, probe_tmp / "again", {})
    assert a["history"] is not None, a["error"]
    assert scalars(a["history"]) == scalars(b)
    rewards = [r.get("reward/train") for r in a["history"][1:]]
    assert any(r and 0 < r < 1 for r in rewards), f"all rewards tie {rewards}: the advantage probes would be empty"


@pytest.mark.parametrize("field", sorted(PROBES))
def test_run_field_changes_the_run(field, warm_dir, probe_tmp, tiny_qwen2_dir, capfd):
    change, base, check = PROBES[field]
    a = _run_probe(base, warm_dir, probe_tmp, tiny_qwen2_dir, "base", capfd)
    b = _run_probe({**base, **change}, warm_dir, probe_tmp, tiny_qwen2_dir, field, capfd)
    if isinstance(check, str) and check.startswith("refused:"):
        assert a["error"] == "", a["error"]
        assert re.search(check[len("refused:"):], b["error"]), b["error"] or "not refused"
        return
    if check != "refused" and callable(check) and check is _unreachable:
        check(probe_tmp, a, b)
        return
    assert a["error"] == "" and b["error"] == "", (a["error"], b["error"])
    if check == "scalars":
        assert scalars(a["history"]) != scalars(b["history"]), f"{field}: the run did not change"
    elif check == "sft":
        assert a.get("sft") is not None and b.get("sft") is not None
        assert a["sft"] != b["sft"], f"{field}: the SFT weights did not change"
    else:
        check(probe_tmp, a, b)


# planning/launch-only fields: each changes `smd plan`'s result or the launchers' variables
PLAN_PROBES: dict[str, object] = {
    "model.dtype": "bfloat16",
    **{f"model.arch.{k}": v for k, v in dict(arch="llama", vocab_size=152000, hidden_size=3072,
                                              intermediate_size=18000, num_layers=14, num_heads=56, num_kv_heads=2,
                                              head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                                              tie_word_embeddings=True, max_position_embeddings=4096).items()},
    "resources.nodes": 2, "resources.gpus_per_node": 16, "resources.rollout_nodes": 2,
    "resources.rollout_tp": 1, "resources.gpu_memory_gb": 40.0,
    "rollout.faults.server_max_restarts": 9, "rollout.faults.server_hang_timeout_s": 30.0,
    "sglang": {"mem_fraction_static": 0.7, "attention_backend": "triton", "page_size": 1,
               "disable_overlap_schedule": True, "cuda_graph_backend_decode": "disabled"},
}


def _arch_facts(d: dict) -> dict:
    a = d["model"]["arch"]
    return {k: a[k] for k in ("rope_theta", "rms_norm_eps", "max_position_embeddings")}


@pytest.mark.parametrize("field", sorted(k for k, (c, _) in SETTINGS.items() if c == PLAN))
def test_planning_field_changes_the_plan(field):
    from megatron_smd.plan import launch_vars, plan

    assert field in PLAN_PROBES, f"{field}: planning field without a probe"
    preset = REPO / "configs" / "models" / "qwen2.5-7b.yaml"
    base_over = ["resources.gpus_per_node=8", "resources.nodes=1"] if field.startswith("resources.") else []
    if field == "resources.rollout_tp":  # only 1 is accepted: the refusal is its effect on the plan
        with pytest.raises(ConfigError, match="rollout_tp: .*2 is not supported: the patched SGLang server"):
            load_config(preset, ["resources.rollout_tp=2"])
        return
    if field == "resources.rollout_nodes":  # more rollout nodes -> more engines
        base_over = []
    change = [f"{field}={json.dumps(PLAN_PROBES[field])}"]
    if field == "resources.nodes":
        change.append("resources.dp=4")
    a_cfg, b_cfg = load_config(preset, base_over), load_config(preset, base_over + change)
    a, b = plan(a_cfg), plan(b_cfg)
    va, vb = launch_vars(a_cfg), launch_vars(b_cfg)
    assert (a, va) != (b, vb), f"{field}: neither the plan nor the launch variables changed"


# ====================================================================== settings that used to be ignored
def _tiny_cfg(tmp, model_dir, **over):
    return load_config(TINY, _overrides({**base_overrides(model_dir, tmp), **over}))


@pytest.mark.parametrize("key, value", [("lr", 3e-3), ("weight_decay", 0.5), ("adam_beta1", 0.5),
                                        ("adam_beta2", 0.9), ("adam_eps", 1e-3)])
def test_resume_applies_changed_optimizer_settings_and_logs_them(key, value, tmp_path, warm_dir, capsys):
    """Resume a 1-step checkpoint and train 2 more steps: with a changed optimizer setting, step 3
    (which sees the weights after step 2) differs from the unchanged resume, and the change is logged."""
    from megatron_smd.trainer import train

    over = {"train.steps": 1, "train.save_every": 1}
    train(_tiny_cfg(tmp_path / "ckpt", warm_dir, **over), resume="none")
    runs = {}
    for name, extra in (("same", {}), ("changed", {f"learner.{key}": value})):
        import shutil

        shutil.copytree(tmp_path / "ckpt", tmp_path / name)
        capsys.readouterr()
        runs[name] = scalars(train(_tiny_cfg(tmp_path / name, warm_dir, **{**over, "train.steps": 3}, **extra),
                                   resume="auto")["history"])
        runs[name + "_log"] = capsys.readouterr().out
    assert runs["same"][:2] == runs["changed"][:2]  # restored history
    assert runs["same"][-1] != runs["changed"][-1], f"learner.{key} changed on resume did nothing"
    assert f"learner.{key}:" in runs["changed_log"] and "applied to the restored optimizer" in runs["changed_log"]
    assert "changed optimizer settings" not in runs["same_log"]


def test_apply_optimizer_settings_keeps_the_no_decay_groups(tmp_path, tiny_qwen2_dir):
    from megatron_smd.checkpoint import apply_optimizer_settings
    from megatron_smd.learner.learner import Learner
    from megatron_smd.model.hf import read_arch
    from megatron_smd.trainer import init_layout, learner_settings

    cfg = _tiny_cfg(tmp_path, tiny_qwen2_dir)
    arch = read_arch(tiny_qwen2_dir)
    layout = init_layout(cfg, arch)
    try:
        opt = Learner(arch, layout, learner_settings(cfg), weights=str(tiny_qwen2_dir)).optimizer
        new = cfg.learner.model_copy(update=dict(lr=0.01, weight_decay=0.3, adam_beta1=0.5, adam_beta2=0.6,
                                                 adam_eps=1e-4, grad_clip=0.25))
        lines = apply_optimizer_settings(opt, new, {"lr": cfg.learner.lr})
        assert lines == [f"learner.lr: {cfg.learner.lr!r} -> 0.01"]
        wds = sorted({g["weight_decay"] for g in opt.param_groups})
        assert wds == [0.0, 0.3]  # norms and biases keep no decay
        assert all(g["lr"] == 0.01 and g["betas"] == (0.5, 0.6) and g["eps"] == 1e-4 for g in opt.param_groups)
        assert opt.config.clip_grad == 0.25
    finally:
        layout.destroy()


def test_sft_honours_learner_grad_clip(tmp_path, tiny_qwen2_dir):
    from megatron_smd.model.hf import read_arch
    from megatron_smd.sft import run_sft
    from megatron_smd.trainer import init_layout

    outs = {}
    for clip in (1.0, 1e-3):
        cfg = _tiny_cfg(tmp_path, tiny_qwen2_dir, **{"learner.grad_clip": clip, "sft.steps": 2, "sft.batch_size": 4,
                                                    "sft.eval_every": 2})
        layout = init_layout(cfg, read_arch(tiny_qwen2_dir))
        try:
            run_sft(cfg, layout, Path(tiny_qwen2_dir), tmp_path / f"sft-{clip}", log=lambda *_: None)
        finally:
            layout.destroy()
        outs[clip] = (tmp_path / f"sft-{clip}" / "model.safetensors").read_bytes()
    assert outs[1.0] != outs[1e-3], "learner.grad_clip did not reach smd sft"


def test_sequences_longer_than_max_seq_len_are_refused(tmp_path, tiny_qwen2_dir, capsys):
    from megatron_smd import cli
    from megatron_smd.trainer import train

    cfg = _tiny_cfg(tmp_path, tiny_qwen2_dir, **{"model.max_seq_len": 20})  # tiny-cpu prompts: 25 tokens
    with pytest.raises(ConfigError, match=r"model.max_seq_len=20: .*prompts \(25 tokens at most\).*need up to 29 tokens"):
        train(cfg, resume="none")
    assert cli.main(["rollout", "--config", str(TINY), "--out", str(tmp_path / "r"), f"model.path={tiny_qwen2_dir}",
                     "model.max_seq_len=20", *(f"{k}={v}" for k, v in KV_TASK.items())]) == 2
    assert "model.max_seq_len=20" in capsys.readouterr().err
    from megatron_smd.config import check_runnable

    check_runnable(_tiny_cfg(tmp_path, tiny_qwen2_dir, **{"model.max_seq_len": 29}), "train")  # exactly enough


def _arch_of(model_dir) -> dict:
    from dataclasses import asdict

    from megatron_smd.model.hf import read_arch

    a = asdict(read_arch(model_dir))
    return {k: a[k] for k in ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                              "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                              "max_position_embeddings")}


@pytest.mark.parametrize("key, value", [("rope_theta", 12345.0), ("rms_norm_eps", 1e-3),
                                        ("max_position_embeddings", 64)])
def test_model_arch_is_checked_against_config_json(key, value, tmp_path, tiny_qwen2_dir):
    from megatron_smd.plan import plan
    from megatron_smd.trainer import train

    same = _tiny_cfg(tmp_path, tiny_qwen2_dir, **{"model.arch": _arch_of(tiny_qwen2_dir)})
    plan(same)
    bad = _tiny_cfg(tmp_path, tiny_qwen2_dir, **{"model.arch": dict(_arch_of(tiny_qwen2_dir), **{key: value})})
    pat = rf"model.arch disagrees with .*config.json: {key}: model.arch={value!r}"
    with pytest.raises(ConfigError, match=pat):
        train(bad, resume="none")
    with pytest.raises(ConfigError, match=pat):
        plan(bad)


def test_broadcast_transport_is_refused_by_smd_train_with_what_to_use(tmp_path, tiny_qwen2_dir):
    from megatron_smd.trainer import train

    with pytest.raises(ConfigError, match=r"sync.transport=broadcast: smd train has no broadcast receiver.*"
                                          r"Use sync.transport=inprocess.*sync.transport=sglang"):
        train(_tiny_cfg(tmp_path, tiny_qwen2_dir, **{"sync.transport": "broadcast"}), resume="none")
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written


def test_sync_verify_runs_the_probe_logits_and_fails_on_a_mismatch(tmp_path, warm_dir, monkeypatch):
    from megatron_smd.sync.staging import StagedUpdate
    from megatron_smd.trainer import train

    h = train(_tiny_cfg(tmp_path / "a", warm_dir, **{"sync.verify": True, "train.steps": 1}), resume="none")["history"]
    assert 0 <= h[1]["sync/probe_max_abs_logit_diff"] <= 1e-5
    h = train(_tiny_cfg(tmp_path / "b", warm_dir, **{"train.steps": 1}), resume="none")["history"]
    assert "sync/probe_max_abs_logit_diff" not in h[1]
    real = StagedUpdate.probe_logits
    monkeypatch.setattr(StagedUpdate, "probe_logits", lambda self, tokens: real(self, tokens) + 1e-3)
    with pytest.raises(SMDError, match=r"probe batch: engine logits differ"):
        train(_tiny_cfg(tmp_path / "c", warm_dir, **{"sync.verify": True, "train.steps": 1}), resume="none")


def test_rollout_tp_above_one_is_refused_and_no_preset_sets_it():
    with pytest.raises(ConfigError, match=r"resources.rollout_tp: .*2 is not supported: the patched SGLang server "
                                          r"refuses --tp-size > 1.*Use resources.rollout_tp: 1"):
        load_config(REPO / "configs" / "models" / "qwen2.5-7b.yaml", ["resources.rollout_tp=2"])
    for p in sorted((REPO / "configs" / "models").glob("*.yaml")):
        assert load_config(p).resources.rollout_tp == 1, p


def test_smd_rollout_honours_cpu_threads(tmp_path, tiny_qwen2_dir):
    from megatron_smd import cli

    torch.set_num_threads(2)
    try:
        assert cli.main(["rollout", "--config", str(TINY), "--out", str(tmp_path / "r"), f"model.path={tiny_qwen2_dir}",
                         "rollout.num_prompts=1", "rollout.group_size=1", "resources.cpu_threads=1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("over, key", [({"rollout.kv_growth": 4}, "kv/eval_dense_peak_bytes"),
                                       ({"rollout.stop_at_eos": False}, "kv/eval_dense_peak_bytes")])
def test_periodic_evals_honour_kv_growth_and_stop_at_eos(over, key, tmp_path, warm_dir):
    """The step-0 eval (greedy, dense and compressed) of the same weights with one rollout setting changed."""
    from megatron_smd.trainer import train

    base = {"train.steps": 1, "rollout.max_new_tokens": 8}
    a = train(_tiny_cfg(tmp_path / "a", warm_dir, **base), resume="none")["history"][0]
    b = train(_tiny_cfg(tmp_path / "b", warm_dir, **base, **over), resume="none")["history"][0]
    assert a[key] != b[key], (a, b)


def test_resume_refuses_another_model_or_layout(tmp_path, tiny_qwen2_dir, tiny_llama_dir):
    from megatron_smd.checkpoint import check_resume, complete_checkpoints
    from megatron_smd.model.hf import read_arch
    from megatron_smd.model.tiny import init_model_dir
    from megatron_smd.trainer import train

    train(_tiny_cfg(tmp_path, tiny_qwen2_dir, **{"train.steps": 1}), resume="none")
    other = init_model_dir(tmp_path / "other-qwen2", "qwen2", seed=5)  # same architecture, other weights
    with pytest.raises(ConfigError, match=rf"--resume: .*step_00000001 was trained from model.path="
                                          rf"{re.escape(str(Path(tiny_qwen2_dir).resolve()))}, this run has "
                                          rf"model.path={re.escape(str(other.resolve()))}"):
        train(_tiny_cfg(tmp_path, other, **{"train.steps": 2}), resume="auto")
    (ckpt,) = complete_checkpoints(tmp_path / "checkpoints")
    arch = read_arch(tiny_qwen2_dir)
    with pytest.raises(ConfigError, match=r"resources.tp: checkpoint 1, now 2: resuming the optimizer state"):
        check_resume(ckpt, _tiny_cfg(tmp_path, tiny_qwen2_dir, **{"resources.tp": 2}), arch)
    from dataclasses import replace

    with pytest.raises(ConfigError, match=r"another architecture .*hidden_size: checkpoint 64, now 32"):
        check_resume(ckpt, _tiny_cfg(tmp_path, tiny_qwen2_dir), replace(arch, hidden_size=32))
    check_resume(ckpt, _tiny_cfg(tmp_path, tiny_qwen2_dir, **{"resources.dp": 2, "learner.lr": 1.0}), arch)


def test_sft_cache_fingerprint_covers_learner_settings(tmp_path, tiny_qwen2_dir):
    from megatron_smd.trainer import train

    over = {"sft.enabled": True, "sft.out": str(tmp_path / "sft"), "sft.steps": 2, "sft.batch_size": 2,
            "sft.eval_every": 2, "train.steps": 1}
    train(_tiny_cfg(tmp_path / "a", tiny_qwen2_dir, **over), resume="none")
    train(_tiny_cfg(tmp_path / "b", tiny_qwen2_dir, **over, **{"learner.lr": 1e-3}), resume="none")  # RL only
    # the RL seed (smd experiment compare's seeds): SFT's batches and start do not depend on it
    train(_tiny_cfg(tmp_path / "s", tiny_qwen2_dir, **over, **{"learner.seed": 3}), resume="none")
    with pytest.raises(ConfigError, match=r"sft.out: .* different learner"):
        train(_tiny_cfg(tmp_path / "c", tiny_qwen2_dir, **over, **{"learner.weight_decay": 0.1}), resume="none")


def test_megatron_params_dtype_is_a_config_error_not_a_traceback(tmp_path, tiny_qwen2_dir, capsys):
    from megatron_smd import cli

    rc = cli.main(["train", "--config", str(TINY), *_overrides(base_overrides(tiny_qwen2_dir, tmp_path)),
                   "learner.megatron.params_dtype=bfloat16"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: learner.megatron.params_dtype='bfloat16': set by the run"), err
    assert "Traceback" not in err


# ====================================================================== presets and launchers
GPU_PRESETS = ["llama3.1-8b", "qwen2.5-32b", "qwen2.5-7b", "qwen3-8b", "r1-distill-qwen-7b"]


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_presets_with_rollout_nodes_use_their_servers(name):
    from megatron_smd.plan import launch_vars
    from sglang_patch.launch_server import parse_args

    cfg = load_config(REPO / "configs" / "models" / f"{name}.yaml")
    assert cfg.resources.rollout_nodes > 0
    assert (cfg.rollout.backend, cfg.sync.transport) == ("sglang", "sglang")
    args = launch_vars(cfg)["SMD_SGLANG_ARGS"]
    policy, _ = parse_args(args, env={})  # what the patched server will accept, flag for flag
    assert policy == cfg.rollout.policy


def test_plan_refuses_rollout_nodes_the_run_would_not_use():
    from megatron_smd.plan import launch_vars

    with pytest.raises(ConfigError, match=r"rollout_nodes=1 starts SGLang servers, but rollout.backend=reference"):
        launch_vars(load_config(REPO / "configs" / "models" / "qwen2.5-7b.yaml", ["rollout.backend=reference"]))
    with pytest.raises(ConfigError, match=r"(?s)the SGLang servers would refuse this config .*--page-size must be 1"):
        launch_vars(load_config(REPO / "configs" / "models" / "qwen2.5-7b.yaml", ["sglang.page_size=16"]))


def test_attention_backend_reaches_the_learner(tmp_path, tiny_qwen2_dir):
    """learner.attention_backend selects the learner's attention kernel: the log-probs of the same
    rollout under the shadow mask come from another kernel (equal to the fp32 floor, not bit for bit).
    Forward only: FlexAttention has no CPU backward, so a CPU training step with flex is not run."""
    from megatron_smd.learner.learner import Learner
    from megatron_smd.model.hf import read_arch
    from megatron_smd.rollout.run import run_rollout
    from megatron_smd.trainer import init_layout, learner_settings

    cfg = _tiny_cfg(tmp_path, tiny_qwen2_dir, **{"rollout.policy.name": "h2o"})
    batch = run_rollout(cfg, tmp_path / "r")
    arch = read_arch(tiny_qwen2_dir)
    layout = init_layout(cfg, arch)
    try:
        lp = {b: Learner(arch, layout, learner_settings(cfg, attention_backend=b), weights=str(tiny_qwen2_dir),
                         train=False).logprobs(batch, "shadow") for b in ("sdpa", "flex")}
    finally:
        layout.destroy()
    assert not torch.equal(lp["sdpa"], lp["flex"])
    assert (lp["sdpa"] - lp["flex"]).abs().max() < 1e-4
