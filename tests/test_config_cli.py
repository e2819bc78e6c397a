"""Config layering and errors; rollout-file validation; the CLI's exit codes and messages on bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_smd.cli import main
from megatron_smd.config import ExperimentConfig, load_config
from megatron_smd.errors import ConfigError, FormatError, MaskError
from megatron_smd.rollout.io import load_rollouts

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny-cpu.yaml"


def test_layers_preset_experiment_overrides():
    cfg = load_config(TINY, ["rollout.policy.budget=48", "rollout.policy.name=streaming", "task.name=kv_recall", "task.num_pairs=9"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.init.arch == "qwen2"  # from the preset
    assert cfg.rollout.group_size == 4  # from the experiment
    assert (cfg.rollout.policy.name, cfg.rollout.policy.budget, cfg.task.num_pairs) == ("streaming", 48, 9)
    cfg = load_config(TINY, ["preset=tiny-llama"])
    assert cfg.model.init.arch == "llama"


def test_unknown_key_names_dotted_key_and_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(f"preset: {REPO}/configs/models/tiny-qwen2.yaml\nrollout:\n  group_sise: 4\n")
    with pytest.raises(ConfigError, match=rf"{f}: rollout.group_sise: unknown key"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"command line: rollout.policy.bogus: unknown key"):
        load_config(TINY, ["rollout.policy.bogus=1"])


def test_wrong_type_names_key_and_source(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(f"preset: {REPO}/configs/models/tiny-qwen2.yaml\nrollout:\n  max_new_tokens: lots\n")
    with pytest.raises(ConfigError, match=rf"{f}: rollout.max_new_tokens: .*integer.*'lots'"):
        load_config(f)
    # a preset's own mistakes are blamed on the preset file
    p = tmp_path / "bad-preset.yaml"
    p.write_text("model:\n  path: x\n  init:\n    hidden_size: big\n")
    f.write_text(f"preset: {p}\n")
    with pytest.raises(ConfigError, match=rf"{p}: model.init.hidden_size"):
        load_config(f)


def test_impossible_policy_rejected_at_config_time():
    with pytest.raises(ConfigError, match=r"rollout.policy.*budget"):
        load_config(TINY, ["rollout.policy.name=streaming", "rollout.policy.budget=3", "rollout.policy.sinks=4"])
    with pytest.raises(ConfigError, match=r"rollout.policy"):
        load_config(TINY, ["rollout.policy.budget=8", "rollout.policy.window=16"])


def test_missing_file_bad_yaml_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("rollout: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{f}: not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(TINY, ["rollout.policy.budget"])


# ------------------------------------------------------------------------------------ CLI end to end
@pytest.fixture(scope="module")
def rollout_dir(tmp_path_factory, tiny_qwen2_dir):
    out = tmp_path_factory.mktemp("ro") / "rollout"
    rc = main(["rollout", "--config", str(TINY), "--out", str(out), f"model.path={tiny_qwen2_dir}",
               "rollout.num_prompts=2", "rollout.group_size=2", "rollout.max_new_tokens=6", "task.name=kv_recall", "task.num_pairs=6"])
    assert rc == 0
    return out


def test_rollout_files_and_replay_json(rollout_dir, capsys):
    b = load_rollouts(rollout_dir)
    assert len(b) == 4 and b.evict.dtype == torch.int32 and b.evict.shape[:2] == (4, 4)
    meta = json.loads((rollout_dir / "meta.json").read_text())
    assert meta["policy"]["name"] == "h2o" and meta["stats"]["peak_kv_bytes"] > 0 and len(meta["rewards"]) == 4
    assert (rollout_dir / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["replay", "--rollouts", str(rollout_dir), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"dense", "shadow"}
    assert res["shadow"]["max_abs_logprob_diff"] <= 1e-5
    assert res["dense"]["max_abs_logprob_diff"] > res["shadow"]["max_abs_logprob_diff"]


def _corrupt(src: Path, dst: Path, **changes) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(str(dst / "trajectories.safetensors"))
    t.update(changes)
    save_file(t, str(dst / "trajectories.safetensors"))
    return dst


def test_bad_mask_and_corrupt_file_are_named(rollout_dir, tmp_path, capsys):
    b = load_rollouts(rollout_dir)
    ev = b.evict.clone()
    ev[1, 2, 5] = 5  # a token must see itself: evict[j] > j
    bad = _corrupt(rollout_dir, tmp_path / "badmask", evict=ev)
    with pytest.raises(MaskError, match=r"evict\[1\]: layer 2, position 5 has evict=5"):
        load_rollouts(bad)
    assert main(["replay", "--rollouts", str(bad)]) == 2
    assert "layer 2, position 5" in capsys.readouterr().err

    trunc = tmp_path / "trunc"
    shutil.copytree(rollout_dir, trunc)
    data = (trunc / "trajectories.safetensors").read_bytes()
    (trunc / "trajectories.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["replay", "--rollouts", str(trunc)]) == 2
    err = capsys.readouterr().err
    assert "trajectories.safetensors" in err and "cannot read safetensors" in err

    wrong = _corrupt(rollout_dir, tmp_path / "wrongdtype", sampler_logprobs=b.sampler_logprobs.double())
    with pytest.raises(FormatError, match="'sampler_logprobs' has dtype torch.float64"):
        load_rollouts(wrong)
    with pytest.raises(FormatError, match="rollout directory does not exist"):
        load_rollouts(tmp_path / "nothing")


def test_malformed_model_dir_and_impossible_policy_exit_nonzero(tmp_path, tiny_qwen2_dir, capsys):
    bad = tmp_path / "badmodel"
    shutil.copytree(tiny_qwen2_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 5  # weights have 4
    (bad / "config.json").write_text(json.dumps(cfg))
    rc = main(["rollout", "--config", str(TINY), "--out", str(tmp_path / "o"), f"model.path={bad}"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "model.layers.4" in err
    (bad / "config.json").write_text("{not json")
    assert main(["rollout", "--config", str(TINY), "--out", str(tmp_path / "o"), f"model.path={bad}"]) == 2
    assert "config.json: not valid JSON" in capsys.readouterr().err
    rc = main(["rollout", "--config", str(TINY), "rollout.policy.name=streaming", "rollout.policy.budget=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "rollout.policy" in err and "budget" in err


def test_init_model_cli_and_console_script(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "megatron_smd.cli", "init-model", "--out", str(out), "--arch", "llama",
                           "--hidden-size", "32", "--num-layers", "2", "--seed", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from megatron_smd.model.hf import read_arch

    a = read_arch(out)
    assert (a.arch, a.hidden_size, a.num_layers, a.tie_word_embeddings) == ("llama", 32, 2, False)
    assert (out / "tokenizer.json").is_file()


def test_scientific_notation_is_a_float(tmp_path):
    cfg = load_config(TINY, ["learner.lr=1e-5", "sft.lr=3E-3"])
    assert cfg.learner.lr == 1e-5 and cfg.sft.lr == 3e-3
    f = tmp_path / "e.yaml"
    f.write_text(f"preset: {REPO}/configs/models/tiny-qwen2.yaml\nlearner:\n  lr: 2e-4\n")
    assert load_config(f).learner.lr == 2e-4
