"""Rollout-server faults against real patched SGLang CPU servers on loopback.

* two servers, one SIGKILLed for good during step 2's rollout: the run finishes on the other, every
  step replaying at <= 1e-5 (the failed attempt's samples are discarded, the survivor re-synced);
* one server killed mid-run with no restart: after ``rollout.faults.max_attempts`` the run stops
  with an error naming the URL and the last checkpoint; with a server back on that URL,
  ``--resume auto`` continues from that checkpoint with no lost or repeated step;
* a post-sync probe further from the learner than ``rollout.faults.probe_atol`` fails the sync;
* an answer whose mask fails validation (an out-of-range entry) is re-requested
  (``rollout.faults.mask_retries``), counted, and never returned; past the retries the request fails;
* the supervisor gives up after ``--max-restarts`` failures and says so.

(The supervised single-server path, SIGKILL in a rollout and in a sync and a SIGSTOP hang, runs
through ``launch/local.sh`` in ``test_sglang_train.py``.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("sglang", reason="sglang is not installed (README test command installs it)")

from megatron_smd.config import load_config  # noqa: E402
from megatron_smd.errors import SMDError  # noqa: E402
from megatron_smd.plan import policy_flags  # noqa: E402
from megatron_smd.rollout import drills as faults  # noqa: E402
from megatron_smd.trainer import train  # noqa: E402
from megatron_smd.rollout.engine import SamplingParams  # noqa: E402
from megatron_smd.rollout.faults import ServerFault  # noqa: E402
from megatron_smd.rollout.sglang_client import SGLangClient  # noqa: E402
from sglang_patch.eviction import decode_mask, encode_mask  # noqa: E402
from sglang_patch.patch import META_KEY  # noqa: E402
from sglang_patch.server_process import PatchedServer, start_all, stop_all  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5


def _cfg(out: Path, model_dir: Path, urls: list[str], *extra: str):
    return load_config(REPO / "configs" / "tiny-cpu.yaml", [
        f"model.path={model_dir}", f"output_dir={out}", "sft.enabled=false", "task.name=kv_recall", "task.num_pairs=6",
        "task.num_queries=1", "task.key_digits=2", "task.value_digits=1", "rollout.num_prompts=2",
        "rollout.group_size=4", "rollout.max_new_tokens=6", "rollout.policy.name=h2o", "rollout.policy.budget=12",
        "rollout.policy.window=4", "train.eval_every=0", "train.eval_prompts=2", "learner.micro_batch_size=4",
        "logging.progress_bar=false", "logging.mask_images=0", "logging.tensorboard=false",
        "rollout.backend=sglang", "sync.transport=sglang", f"rollout.sglang_urls=[{','.join(urls)}]", *extra])


def _server(model_dir: Path, cfg, log: Path, port: int | None = None) -> PatchedServer:
    return PatchedServer(model_dir, [*policy_flags(cfg.rollout.policy), "--skip-tokenizer-init"], port=port,
                         log_path=log, start_timeout_s=400)


def _drill(monkeypatch, tmp_path: Path, spec: str, pid: int) -> None:
    pid_file = tmp_path / f"drill-{pid}.pid"
    pid_file.write_text(f"{pid}\n")
    monkeypatch.setenv(faults.DRILL_ENV, spec)
    monkeypatch.setenv(faults.DRILL_PID_ENV, str(pid_file))


class CorruptingProxy:
    """Loopback proxy in front of a real server: the first ``bad`` /generate answers get one mask
    entry out of range (a key visible past its own position's eviction bound), the rest pass."""

    def __init__(self, target: str, bad: int):
        self.target, self.bad, self.answers = target, bad, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = urllib.request.Request(proxy.target + self.path, data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    out = json.loads(r.read())
                proxy.answers += 1
                if proxy.bad > 0:
                    proxy.bad -= 1
                    for item in out if isinstance(out, list) else [out]:
                        ex = item["meta_info"][META_KEY][-1]
                        ev = decode_mask(ex["evict"])
                        ev[0, 0] = ev.shape[1] + 7  # past the sequence end
                        ex["evict"] = encode_mask(ev)
                raw = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _invalid_masks_are_retried_then_fail(srv: PatchedServer, num_layers: int) -> None:
    sp = SamplingParams(max_new_tokens=4, temperature=1.0)
    proxy = CorruptingProxy(srv.url, bad=1)
    try:
        client = SGLangClient([proxy.url], num_layers, timeout_s=60, mask_retries=1)
        trajs, _ = client.generate([[5, 6, 7, 8, 9]], n=2, sampling=sp)
        assert len(trajs) == 2 and client.invalid_outputs == 1 and proxy.answers == 2
        proxy.bad = 1
        strict = SGLangClient([proxy.url], num_layers, timeout_s=60, mask_retries=0)
        with pytest.raises(ServerFault, match=r"smd_evict.*1 tries; the group is never trained on") as ei:
            strict.generate([[5, 6, 7, 8, 9]], n=2, sampling=sp)
        assert ei.value.url == proxy.url and strict.invalid_outputs == 1
    finally:
        proxy.close()


def _gaps(res: dict) -> dict[int, tuple[float, float]]:
    return {h["step"]: (h["mismatch/max_abs_logprob_diff"], h["sync/probe_max_abs_logprob_diff"])
            for h in res["history"] if "mismatch/max_abs_logprob_diff" in h}


def test_a_dead_server_is_left_out_and_an_exhausted_run_resumes(tmp_path, tiny_qwen2_dir, monkeypatch, capfd):
    probe_cfg = _cfg(tmp_path / "x", tiny_qwen2_dir, ["http://127.0.0.1:1"])
    a = _server(tiny_qwen2_dir, probe_cfg, tmp_path / "a.log")
    b = _server(tiny_qwen2_dir, probe_cfg, tmp_path / "b.log")
    servers = [a, b]
    try:
        start_all(servers)

        # 1. two servers; B dies for good while step 2's requests are in flight: A carries on
        _drill(monkeypatch, tmp_path, "rollout@2", b.proc.pid)
        res = train(_cfg(tmp_path / "two", tiny_qwen2_dir, [a.url, b.url], "train.steps=4", "train.save_every=0"),
                    resume="none")
        err = capfd.readouterr().err
        assert "fault drill rollout@2: SIGKILL" in err and "step 2: rollout attempt 1/4 failed" in err, err[-3000:]
        assert f"left out until they answer again: {b.url}" in err, err[-3000:]
        gaps = _gaps(res)
        assert sorted(gaps) == [1, 2, 3, 4], gaps
        assert all(g <= TOL and p <= TOL for g, p in gaps.values()), gaps
        last = res["history"][-1]
        assert last["faults/active_servers"] == 1 and last["faults/rollout_failures"] == 1
        print(f"\ntwo servers, one killed at step 2: 4 steps on the survivor, max gaps (replay, probe) "
              f"{max(g for g, _ in gaps.values()):.2e}, {max(p for _, p in gaps.values()):.2e}")

        # a probe gap above rollout.faults.probe_atol fails the sync (fp32 replays at ~5e-7: 1e-9 fails)
        with pytest.raises(SMDError, match=r"rollout.faults.probe_atol 1e-09\): it does not hold") as ei:
            train(_cfg(tmp_path / "atol", tiny_qwen2_dir, [a.url], "train.steps=1", "rollout.faults.probe_atol=1e-9",
                       "rollout.faults.max_attempts=1"), resume="none")
        assert a.url in str(ei.value)

        # invalid masks: re-requested (rollout.faults.mask_retries), counted, never returned
        from megatron_smd.model.hf import read_arch

        _invalid_masks_are_retried_then_fail(a, read_arch(tiny_qwen2_dir).num_layers)

        # 2. one server killed at step 3, no restart: the run stops naming it and the last checkpoint
        out = tmp_path / "one"
        extra = ["train.steps=5", "train.save_every=1", "rollout.faults.max_attempts=2",
                 "rollout.faults.wait_healthy_s=3"]
        _drill(monkeypatch, tmp_path, "rollout@3", a.proc.pid)
        with pytest.raises(SMDError) as ei:
            train(_cfg(out, tiny_qwen2_dir, [a.url], *extra), resume="none")
        msg = str(ei.value)
        assert a.url in msg and re.search(r"Last checkpoint: \S*step_0*2\b", msg) and "--resume auto" in msg, msg
        print(f"exhausted: {msg[:300]}")

        # 3. a server back on that URL: --resume auto continues from step 2, no step lost or repeated
        monkeypatch.delenv(faults.DRILL_ENV)
        back = _server(tiny_qwen2_dir, probe_cfg, tmp_path / "a2.log", port=a.port)
        servers.append(back)
        back.start()
        res = train(_cfg(out, tiny_qwen2_dir, [a.url], *extra), resume="auto")
        steps = [h["step"] for h in res["history"]]
        assert steps == [0, 1, 2, 3, 4, 5] or steps == [1, 2, 3, 4, 5], steps
        gaps = _gaps(res)
        assert sorted(gaps) == [1, 2, 3, 4, 5] and all(g <= TOL and p <= TOL for g, p in gaps.values()), gaps
    finally:
        stop_all(servers)


def test_supervisor_gives_up_after_its_restart_budget(tmp_path):
    """A server command that keeps failing: restarted --max-restarts times with back-off, then the
    supervisor exits 1 naming the health URL; every failure is logged with its exit status."""
    cmd = [sys.executable, "-m", "sglang_patch.supervise", "--max-restarts", "2", "--backoff-s", "0.1",
           "--server-log", str(tmp_path / "server.log"), "--pid-file", str(tmp_path / "server.pid"), "--",
           sys.executable, "-c", "import sys; print('boom'); sys.exit(3)", "--port", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout.count("exited with status 3 during start-up; log: ") == 3, p.stdout
    assert "restart 1/2 in 0.1 s" in p.stdout and "restart 2/2 in 0.2 s" in p.stdout, p.stdout
    assert "giving up: 3 failures" in p.stdout and "http://127.0.0.1:1/health stays down" in p.stdout, p.stdout
    assert (tmp_path / "server.log").read_text().count("\nboom\n") == 3
    assert not (tmp_path / "server.pid").exists()


HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
"""


def test_supervisor_replaces_a_hung_server_within_the_timeout(tmp_path):
    """A process that answers /health, then is stopped (SIGSTOP): the supervisor kills its group
    within --hang-timeout-s of the last answer and starts it again (a new PID, healthy again)."""
    import os
    import signal
    import time

    from sglang_patch.server_process import free_port

    port, pid_file, log, hang = free_port(), tmp_path / "server.pid", tmp_path / "supervise.log", 3.0
    cmd = [sys.executable, "-m", "sglang_patch.supervise", "--hang-timeout-s", str(hang), "--health-interval-s", "1",
           "--probe-timeout-s", "5", "--backoff-s", "0.1", "--pid-file", str(pid_file), "--",
           sys.executable, "-c", HEALTH_SERVER, "--port", str(port)]
    with open(log, "w") as out:
        sup = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        def wait_for(cond, what, limit=60.0):
            end = time.monotonic() + limit
            while time.monotonic() < end:
                if cond():
                    return
                time.sleep(0.05)
            pytest.fail(f"{what} within {limit} s:\n{log.read_text()}")

        wait_for(lambda: log.read_text().count("healthy after") == 1, "healthy")  # the supervisor saw it up
        first = int(pid_file.read_text())
        os.kill(first, signal.SIGSTOP)
        t0 = time.monotonic()
        wait_for(lambda: log.read_text().count("healthy after") == 2, "replaced and healthy again", limit=30)
        replaced_after = time.monotonic() - t0
    finally:
        sup.terminate()
        sup.wait(60)
    out = log.read_text()
    assert sup.returncode == 0, out
    m = re.search(r"hung: no /health answer for ([\d.]+) s \(limit 3 s\); killed \(SIGKILL\)", out)
    assert m and float(m.group(1)) <= hang + 1.5, out  # + scheduling slack on a busy machine
    assert replaced_after <= hang + 5.0, (replaced_after, out)  # detection + back-off + the restart itself
    assert "restart 1/5" in out and "stopped" in out and int(pid_file.read_text() if pid_file.exists() else 0) != first
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # the hung process is gone, not left stopped
    print(f"\nhung process replaced (healthy again) {replaced_after:.1f} s after SIGSTOP (hang limit {hang:.0f} s)")
