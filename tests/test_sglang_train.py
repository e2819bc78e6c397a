"""``launch/local.sh CFG rollout.backend=sglang`` on a CPU machine, for real, end to end, with faults.

The launcher starts one patched SGLang CPU server (``--device cpu``, the config's full policy on its
command line) under its supervisor, health-checks it, runs ``smd train`` (TP=2 gloo ranks under
torchrun) against it with the ``sglang`` weight-sync transport, and stops everything by PID at exit.
Fault drills hit the server three times during the run: SIGKILL while step 3's rollout requests are
in flight, SIGKILL during the weight sync after step 4, and SIGSTOP (a hang) during step 6's
rollout. The supervisor restarts it each time (the hang is detected by ``/health`` within the
configured timeout), the trainer waits, re-sends its weights in full and redoes the step. The run's
TensorBoard scalars then show, for every step:

* the SMD replay gap of SGLang's rollout (learner under the shadow mask vs SGLang's sampled-token
  log-probs, first micro-step) <= 1e-5, while the dense view of the same rollout is off;
* after each weight sync, a probe sampled by the server replays with the learner at <= 1e-5: the
  server holds the learner's weights, restarted or not (a missed re-sync would show: a restarted
  server loads the initial weights).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang", reason="sglang is not installed (README test command installs it)")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
STEPS = 7
HANG_TIMEOUT_S = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_local_launcher_trains_against_a_patched_cpu_server(tmp_path, tiny_qwen2_dir):
    port = _free_port()
    out = tmp_path / "run"
    overrides = [f"model.path={tiny_qwen2_dir}", f"output_dir={out}", "sft.enabled=false",
                 "task.name=kv_recall", "task.num_pairs=6", "task.num_queries=1", "task.key_digits=2", "task.value_digits=1",
                 "rollout.num_prompts=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
                 "rollout.policy.name=h2o", "rollout.policy.budget=12", "rollout.policy.window=4",
                 f"train.steps={STEPS}", "train.eval_every=0", "train.eval_prompts=2", "train.save_every=0",
                 "learner.micro_batch_size=4", "logging.progress_bar=false", "logging.mask_images=0",
                 "resources.tp=2", "rollout.backend=sglang", "rollout.faults.request_timeout_s=15",
                 f"rollout.faults.server_hang_timeout_s={HANG_TIMEOUT_S}"]
    env = dict(os.environ, SMD_NUM_GPUS="0", SMD_SERVER_PORT=str(port), SMD_RDZV_PORT=str(_free_port()),
               SMD_PYTHON=sys.executable, SMD_LOG_DIR=str(tmp_path / "launch"), SMD_HEALTH_INTERVAL="1",
               SMD_HEALTH_TIMEOUT="400", SMD_FAULT_DRILL="rollout@3,sync@4,rollout@6:stop",
               SMD_FAULT_DRILL_PID_FILE=str(tmp_path / "launch" / f"sglang-{port}.pid"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.Popen(["bash", "launch/local.sh", "configs/tiny-cpu.yaml", *overrides], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = p.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        p.terminate()  # SIGTERM to the launcher (by its PID): its trap stops the server and the learner
        stdout, stderr = p.communicate(timeout=120)
        pytest.fail(f"launch/local.sh did not finish in 900 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    log = stdout[-4000:] + stderr[-4000:]
    server_log = tmp_path / "launch" / f"sglang-{port}.log"
    assert p.returncode == 0, log + (server_log.read_text()[-3000:] if server_log.is_file() else "")
    assert f"rollout on the patched SGLang CPU server http://127.0.0.1:{port}" in stdout, log
    assert "smd eviction active" in server_log.read_text()
    with socket.socket() as s:  # the launcher stopped its server
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the SGLang server is still listening after the run"

    sc = _scalars(out / "tensorboard")
    gap, dense = sc["mismatch/max_abs_logprob_diff"], sc["mismatch_dense/max_abs_logprob_diff"]
    probe = sc["sync/probe_max_abs_logprob_diff"]
    assert sorted(gap) == list(range(1, STEPS + 1)) and sorted(probe) == list(range(1, STEPS + 1))
    print("\nper step: SMD replay gap of SGLang's rollout / dense gap / post-sync probe gap")
    for s in range(1, STEPS + 1):
        print(f"  step {s}: {gap[s]:.2e} / {dense[s]:.2e} / {probe[s]:.2e}")
        assert gap[s] <= TOL and probe[s] <= TOL
    assert max(dense.values()) > 1e-3  # the same rollouts replayed densely are off-policy

    # each fault was noticed, survived, and the supervisor's log names each restart
    for drill in ("rollout@3: SIGKILL", "sync@4: SIGKILL", "rollout@6: SIGSTOP"):
        assert f"fault drill {drill}" in stderr, log
    assert "step 3: rollout attempt 1/4 failed" in stderr and "step 6: rollout attempt 1/4 failed" in stderr, log
    assert "weight sync v4: attempt 1/4 failed" in stderr, log
    sup = (tmp_path / "launch" / f"sglang-{port}.supervise.log").read_text()
    assert sup.count("exited with status -9; log: ") == 2 and "restart 3/5" in sup, sup
    hung = re.search(r"hung: no /health answer for ([\d.]+) s \(limit (\d+) s\)", sup)
    assert hung and int(hung.group(2)) == HANG_TIMEOUT_S, sup
    assert float(hung.group(1)) <= HANG_TIMEOUT_S + 2.0, sup  # within the timeout of the last answer (+ slack)
    assert sc["faults/rollout_failures"][STEPS] == 2 and sc["faults/sync_failures"][STEPS] == 1
    print(f"  supervisor: {sup.count('] start ')} starts; hang detected after {hung.group(1)} s "
          f"(limit {HANG_TIMEOUT_S} s)")
