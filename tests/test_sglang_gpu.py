"""GPU tests of the patched SGLang server (skipped with the reason where no CUDA GPU exists).

Each test starts ``python -m sglang_patch.launch_server`` on the tiny Qwen2 model (random
weights, written by ``megatron_smd.model.tiny``; ``--skip-tokenizer-init``, token ids in and out)
on a loopback port, samples GRPO groups through :class:`megatron_smd.rollout.sglang_client.SGLangClient`, stops
the server it started (by its own process id), and checks:

* every policy generates, and every returned mask passes ``validate_evict``;
* the learner's replay of the returned masks (megatron_smd's torch learner, fp32) sits at the dense
  numeric floor: its max |Δ log-prob| against SGLang's log-probs is within 2x (+1e-3) of the same
  gap for a dense (``--smd-policy none``) run, which measures the kernel-vs-reference floor;
* token-pool usage at a 25% budget: the peak number of private slots each request held
  (``peak_private_slots`` in its export) is below 0.5x of the dense run's for streaming / H2O.

A real-size preset uses the same code with ``SMD_SGLANG_TEST_MODEL=/path/to/Qwen2.5-0.5B`` (then
the tiny model is not written).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytestmark = pytest.mark.gpu

BUDGET_FRACTION = 0.25
PROMPT_LEN, NEW_TOKENS, GROUP = 32, 96, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PatchedServer:
    """One ``sglang_patch.launch_server`` subprocess on 127.0.0.1, stopped by its own pid."""

    def __init__(self, model_dir, policy_args: list[str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sglang_patch.launch_server", "--model-path", str(model_dir),
               "--attention-backend", "triton", "--page-size", "1", "--disable-overlap-schedule",
               "--disable-decode-cuda-graph", "--skip-tokenizer-init", "--host", "127.0.0.1",
               "--port", str(self.port), "--mem-fraction-static", "0.3", *policy_args]
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.close()
        raise RuntimeError("server did not become healthy in 300 s")

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this test started, by its id
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = os.environ.get("SMD_SGLANG_TEST_MODEL")
    if path:
        return path
    from megatron_smd.model.tiny import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("sglang") / "tiny-qwen2", "qwen2", seed=0,
                          hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2)


def _policy_args(name: str) -> list[str]:
    budget = int(BUDGET_FRACTION * (PROMPT_LEN + NEW_TOKENS))
    extra = {"none": [], "streaming": ["--smd-sinks", "4"], "h2o": ["--smd-window", "8"],
             "snapkv": ["--smd-window", "8"], "rkv": ["--smd-window", "8", "--smd-buffer", "8"]}[name]
    return ["--smd-policy", name] + ([] if name == "none" else ["--smd-budget", str(budget)]) + extra


def _sample(model_dir, name: str):
    from megatron_smd.model.hf import read_arch
    from megatron_smd.rollout.engine import SamplingParams
    from megatron_smd.rollout.sglang_client import SGLangClient

    arch = read_arch(model_dir)
    srv = PatchedServer(model_dir, _policy_args(name))
    try:
        client = SGLangClient([srv.url], num_layers=arch.num_layers, timeout_s=300)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, arch.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in range(2)]
        trajs, _ = client.generate(prompts, n=GROUP, sampling=SamplingParams(
            max_new_tokens=NEW_TOKENS, temperature=1.0, seed=1))
        return trajs, list(client.last_export_info)
    finally:
        srv.close()


def _replay_gap(model_dir, trajs) -> float:
    from megatron_smd.model.transformer import RefTransformer
    from megatron_smd.replay import gap_metrics, torch_replay_logprobs
    from megatron_smd.rollout.io import RolloutBatch

    batch = RolloutBatch.from_trajectories(trajs, {"sampling": {"temperature": 1.0}})
    model = RefTransformer.from_pretrained(model_dir, dtype=torch.float32)  # the learner reference, fp32
    return gap_metrics(torch_replay_logprobs(model, batch, "shadow"), batch)["max_abs_logprob_diff"]


@pytest.fixture(scope="module")
def dense_run(model_dir):
    trajs, info = _sample(model_dir, "none")
    return trajs, info, _replay_gap(model_dir, trajs)


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv", "rkv"])
def test_patched_server_generates_and_replay_sits_at_the_dense_floor(model_dir, dense_run, name):
    from megatron_smd.mask import validate_evict

    trajs, info = _sample(model_dir, name)
    assert len(trajs) == 2 * GROUP
    for t in trajs:
        validate_evict(t.evict, seq_end=t.seq_len)
    assert any(bool((t.evict < t.seq_len).any()) for t in trajs), f"{name} evicted nothing"
    gap = _replay_gap(model_dir, trajs)
    floor = dense_run[2]
    print(f"{name}: replay max|dlogp| {gap:.3e} vs dense floor {floor:.3e}")
    assert gap <= 2 * floor + 1e-3


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_token_pool_usage_at_quarter_budget(model_dir, dense_run, name):
    _, info = _sample(model_dir, name)
    dense = sum(x["peak_private_slots"] for x in dense_run[1])
    sparse = sum(x["peak_private_slots"] for x in info)
    print(f"{name}: peak private slots {sparse} vs dense {dense} ({sparse / dense:.2f}x)")
    assert sparse < 0.5 * dense
