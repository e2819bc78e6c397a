"""The main job: every correction mode runs, SMD is on-policy at the first micro-step, resume is exact,
and failures (bad config, NaN, a killed run) end with clear messages and intact checkpoints.

Small sizes: 2 prompts x 2 samples, 4 new tokens, H2O at a 12-token budget on ~45-token prompts.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_smd.config import load_config
from megatron_smd.errors import ConfigError, SMDError
from megatron_smd.trainer import train

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5


def _cfg(tmp, model_dir, **over):
    base = [f"model.path={model_dir}", f"output_dir={tmp}", "sft.enabled=false",
            "task.name=kv_recall", "task.num_pairs=6", "task.num_queries=1", "task.key_digits=2", "task.value_digits=1",
            "rollout.num_prompts=2", "rollout.group_size=2", "rollout.max_new_tokens=4",
            "rollout.policy.name=h2o", "rollout.policy.budget=12", "rollout.policy.window=4",
            "train.steps=2", "train.eval_every=2", "train.eval_prompts=2", "train.save_every=0",
            "learner.micro_batch_size=4", "logging.progress_bar=false", "logging.mask_images=1"]
    base += [f"{k}={v}" for k, v in over.items()]
    return load_config(REPO / "configs" / "tiny-cpu.yaml", base)


@pytest.mark.parametrize("mode", ["dense", "naive", "tis", "sparse_rl", "smd"])
def test_every_mode_runs_and_logs(mode, tmp_path, tiny_qwen2_dir):
    res = train(_cfg(tmp_path, tiny_qwen2_dir, **{"algorithm.correction": mode}), resume="none")
    h = res["history"]
    assert [r["step"] for r in h] == [0, 1, 2]  # step 0: the eval of the starting weights
    assert "reward/eval_dense" in h[0] and "reward/eval_compressed" in h[0]
    assert "reward/eval_dense" in h[-1] and "reward/eval_compressed" in h[-1]
    h = h[1:]
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "checkpoints" / "latest").is_file()
    if mode == "sparse_rl":
        assert "correction/rejection_rate" in h[0]


def test_both_rollout_engines_are_what_the_trainer_asks_for(tiny_qwen2_dir):
    """The reference engine and the SGLang client are RolloutEngines with the same generate()
    signature; only the client is a RemoteRolloutEngine (servers to re-target and check)."""
    import inspect

    from megatron_smd.rollout.engine import ReferenceEngine
    from megatron_smd.rollout.engine_api import RemoteRolloutEngine, RolloutEngine
    from megatron_smd.rollout.sglang_client import SGLangClient

    ref, client = ReferenceEngine.from_pretrained(tiny_qwen2_dir), SGLangClient(["http://127.0.0.1:9"], 4)
    assert isinstance(ref, RolloutEngine) and not isinstance(ref, RemoteRolloutEngine)
    assert isinstance(client, RemoteRolloutEngine)
    want = list(inspect.signature(RolloutEngine.generate).parameters)
    assert list(inspect.signature(ReferenceEngine.generate).parameters) == want
    assert list(inspect.signature(SGLangClient.generate).parameters) == want


def test_smd_is_on_policy_and_naive_is_not(tmp_path, tiny_qwen2_dir):
    """First micro-step of every update: SMD's gap sits at the fp32 floor and its ratio is 1; naive's does not."""
    smd = train(_cfg(tmp_path / "smd", tiny_qwen2_dir, **{"algorithm.correction": "smd"}), resume="none")["history"][1:]
    naive = train(_cfg(tmp_path / "naive", tiny_qwen2_dir, **{"algorithm.correction": "naive"}), resume="none")["history"][1:]
    for rec in smd:
        assert rec["mismatch/max_abs_logprob_diff"] <= TOL, rec
        assert rec["ratio_first/max_abs_dev"] <= 10 * TOL, rec
        # the dense view of the same compressed rollout is off-policy
        assert rec["mismatch_dense/max_abs_logprob_diff"] > 100 * TOL
    for rec in naive:
        assert rec["mismatch/max_abs_logprob_diff"] > 100 * TOL, rec
    print(f"\nfirst-micro-step gap: smd {max(r['mismatch/max_abs_logprob_diff'] for r in smd):.2e}, "
          f"naive {min(r['mismatch/max_abs_logprob_diff'] for r in naive):.2e}")


def _params(ckpt_root):
    from megatron_smd.export import export_hf
    from megatron_smd.model.hf import load_state_dict

    out = ckpt_root.parent / f"export-{time.monotonic_ns()}"
    export_hf(ckpt_root, out)
    return load_state_dict(out)


def test_resume_is_exact(tmp_path, tiny_qwen2_dir):
    """4 steps straight == 2 steps + resume + 2 steps (SMD's distillation term moves the weights even
    when all rewards tie, and Adam's moments must be restored for this to hold)."""
    over = {"algorithm.correction": "smd", "train.steps": 4, "train.save_every": 2, "train.eval_every": 0}
    train(_cfg(tmp_path / "a", tiny_qwen2_dir, **over), resume="none")
    over2 = dict(over, **{"train.steps": 2})
    train(_cfg(tmp_path / "b", tiny_qwen2_dir, **over2), resume="none")
    train(_cfg(tmp_path / "b", tiny_qwen2_dir, **over), resume="auto")
    a, b = _params(tmp_path / "a" / "checkpoints"), _params(tmp_path / "b" / "checkpoints")
    start = __import__("megatron_smd.model.hf", fromlist=["x"]).load_state_dict(tiny_qwen2_dir)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-4, "training did not change the weights; the resume test would prove nothing"
    assert diff <= 1e-6, diff


def test_bad_layout_and_missing_model_are_clear(tmp_path, tiny_qwen2_dir):
    with pytest.raises(ConfigError, match=r"tp.*3|3.*tp"):
        train(_cfg(tmp_path, tiny_qwen2_dir, **{"resources.tp": 3}), resume="none")
    cfg = _cfg(tmp_path, tmp_path / "no-such-model")
    cfg.model.init = None
    with pytest.raises(SMDError, match="no-such-model"):
        train(cfg, resume="none")


def test_divergence_stops_with_clear_message_and_no_checkpoint(tmp_path, tiny_qwen2_dir):
    # an absurd learning rate blows the weights up after one Adam step; whichever phase meets the
    # non-finite numbers first (engine logits, synced weights, learner loss) must stop with a message
    cfg = _cfg(tmp_path, tiny_qwen2_dir, **{"algorithm.correction": "smd", "learner.lr": "1e30", "train.steps": 3})
    with pytest.raises(SMDError, match=r"non-finite|weight sync after step"):
        train(cfg, resume="none")
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").glob("step_*"))


def test_sigterm_swallowed_by_a_callback_still_stops_the_loop(monkeypatch):
    """Python ignores an exception raised while it runs a fork handler or a finaliser; the SIGTERM
    is recorded as well, and the loop's per-step check raises it then."""
    import gc

    from megatron_smd import trainer

    monkeypatch.setattr(trainer, "_STOP_SIGNAL", None)
    old = signal.getsignal(signal.SIGTERM)
    try:
        trainer.install_signal_handlers()
        trainer.raise_if_stop_requested()  # nothing recorded yet: no-op

        class _Finalised:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here; its raise is "ignored"

        _Finalised()
        gc.collect()
        assert trainer._STOP_SIGNAL == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            trainer.raise_if_stop_requested()
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.mark.slow  # a subprocess run, killed and resumed
def test_killed_run_keeps_complete_checkpoints_and_resumes(tmp_path, tiny_qwen2_dir):
    args = [sys.executable, "-m", "megatron_smd.cli", "train", "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
            f"model.path={tiny_qwen2_dir}", f"output_dir={tmp_path}", "sft.enabled=false", "task.name=kv_recall", "task.num_pairs=6",
            "task.num_queries=1", "task.key_digits=2", "task.value_digits=1", "rollout.num_prompts=2",
            "rollout.group_size=2", "rollout.max_new_tokens=4", "rollout.policy.budget=12", "rollout.policy.window=4",
            "train.steps=400", "train.save_every=1", "train.eval_every=0", "logging.progress_bar=false",
            "learner.micro_batch_size=4"]
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    from megatron_smd.checkpoint import complete_checkpoints

    ck = tmp_path / "checkpoints"
    deadline = time.time() + 240
    # wait for a *complete* checkpoint (an in-progress step_N.tmp-<nonce> directory does not count)
    while time.time() < deadline and not complete_checkpoints(ck):
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "--resume auto" in err
    from megatron_smd.checkpoint import LOOP_STATE

    final_named = [d for d in ck.glob("step_*") if ".tmp-" not in d.name]
    assert final_named and all((d / LOOP_STATE).is_file() for d in final_named), "a half-written checkpoint"
    done = complete_checkpoints(ck)
    reached = int(done[-1].name.split("_")[1])
    assert 1 <= reached < 400
    res = train(_cfg(tmp_path, tiny_qwen2_dir, **{"algorithm.correction": "smd", "train.steps": reached + 1,
                                                  "train.eval_every": 0}), resume="auto")
    assert res["history"][-1]["step"] == reached + 1


@pytest.mark.slow  # torchrun with 2 gloo ranks
@pytest.mark.parametrize("layout", [["resources.tp=2"], ["resources.dp=2"]], ids=["tp2", "dp2"])
def test_two_rank_training_matches_single_process(layout, tmp_path, tiny_qwen2_dir):
    """torchrun with 2 gloo ranks (TP=2, or DP=2 splitting each mini-batch) trains the same weights as one
    process: the loss is normalised over the whole mini-batch before DDP's sum-reduction."""
    common = [f"model.path={tiny_qwen2_dir}", "sft.enabled=false", "task.name=kv_recall", "task.num_pairs=6", "task.num_queries=1",
              "task.key_digits=2", "task.value_digits=1", "rollout.num_prompts=2", "rollout.group_size=2",
              "rollout.max_new_tokens=4", "rollout.policy.budget=12", "rollout.policy.window=4", "train.steps=2",
              "train.eval_every=0", "logging.progress_bar=false", "learner.micro_batch_size=2",
              "algorithm.correction=smd"]
    single = _cfg(tmp_path / "one", tiny_qwen2_dir, **{"algorithm.correction": "smd", "train.steps": 2,
                                                       "train.eval_every": 0, "learner.micro_batch_size": 2})
    train(single, resume="none")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    from _dist import free_port

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "megatron_smd.cli", "train", "--config",
                           str(REPO / "configs" / "tiny-cpu.yaml"), f"output_dir={tmp_path / 'two'}", *common, *layout],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _params(tmp_path / "one" / "checkpoints"), _params(tmp_path / "two" / "checkpoints")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, diff


def test_stale_sft_cache_is_refused(tmp_path, tiny_qwen2_dir):
    """A cached warm start trained on another task must not be reused silently."""
    over = {"sft.enabled": "true", "sft.out": str(tmp_path / "sft"), "sft.steps": 2, "sft.batch_size": 2,
            "sft.eval_every": 2, "train.steps": 1, "train.eval_every": 0}
    train(_cfg(tmp_path / "a", tiny_qwen2_dir, **over), resume="none")
    assert (tmp_path / "sft" / "smd_sft.json").is_file()
    train(_cfg(tmp_path / "b", tiny_qwen2_dir, **over), resume="none")  # same settings: reused
    with pytest.raises(ConfigError, match=r"sft.out: .* different task"):
        train(_cfg(tmp_path / "c", tiny_qwen2_dir, **dict(over, **{"task.num_pairs": 5})), resume="none")


def test_failed_start_releases_the_process_group(tmp_path, tiny_qwen2_dir):
    """A start that fails after the process group is up (here: a stale SFT cache) must tear it down,
    so the next run in the same process can initialise again."""
    from megatron.core import parallel_state

    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.json").write_text((tiny_qwen2_dir / "config.json").read_text())  # no fingerprint
    with pytest.raises(ConfigError, match="sft.out"):
        train(_cfg(tmp_path / "a", tiny_qwen2_dir, **{"sft.enabled": "true", "sft.out": str(sft)}), resume="none")
    assert not parallel_state.model_parallel_is_initialized()
    train(_cfg(tmp_path / "b", tiny_qwen2_dir, **{"train.steps": 1, "train.eval_every": 0}), resume="none")


def test_per_token_loss_setting_cannot_be_overridden(tmp_path, tiny_qwen2_dir):
    cfg = _cfg(tmp_path, tiny_qwen2_dir, **{"learner.megatron": "{calculate_per_token_loss: false}"})
    with pytest.raises(ConfigError, match="learner.megatron.calculate_per_token_loss"):
        train(cfg, resume="none")
