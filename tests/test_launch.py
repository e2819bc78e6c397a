"""The launch scripts, run for real against a fake Slurm (and a fake torchrun / nvidia-smi).

``launch/slurm/smd.sbatch`` runs under ``bash`` with SLURM_* variables for a 4-node job and fake
``srun`` / ``scontrol`` / ``curl`` first on PATH. The fake ``srun`` records its argv (and the
rollout variables the learner must see) as JSON lines; server and router steps stay alive until
SIGTERM, which they record, so the tests see exactly which steps teardown stopped; the learner step
exits with ``FAKE_SRUN_RC``. From the records the tests rebuild the command every node runs and
compare it with the expected argv, token for token. The dry-run mode (``SMD_DRY_RUN=1``) must print
the same steps. Everything except Slurm itself is real: the config is loaded and the layout
validated by ``python -m megatron_smd.plan --shell``, and ``shellcheck`` checks every script.
These cover multi-node argv shapes one machine cannot host; ``tests/test_slurm_real.py`` runs the
same scripts under a real single-node Slurm.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the launch scripts, each starting processes

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = [REPO / "launch" / "local.sh", REPO / "launch" / "slurm" / "smd.sbatch",
           REPO / "launch" / "slurm" / "submit.sh", REPO / "launch" / "slurm" / "common.sh"]
JOB = "4242"
HOSTS = ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]

FAKE_SRUN = r'''#!/usr/bin/env python3
import signal, sys
argv = sys.argv[1:]
long_running = "sglang_patch.launch_server" in argv or "sglang_router.launch_router" in argv


def term(*_):
    record({"prog": "srun", "terminated": argv})
    sys.exit(143)


if long_running:  # before anything slow: teardown may come at once
    signal.signal(signal.SIGTERM, term)
import json, os, time


def record(d):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps(d) + "\n")


record({"prog": "srun", "argv": argv, "pid": os.getpid(),
        "env": {k: os.environ.get(k) for k in ("SMD_ROLLOUT_URL", "SMD_ROLLOUT_SERVERS")}})
if long_running:  # now "healthy": the fake curl answers for this host:port from here on
    host = next(a for a in argv if a.startswith("--nodelist=")).split("=", 1)[1]
    if "--host" in argv and argv[argv.index("--host") + 1] == "127.0.0.1":  # a server bound to loopback
        host = "127.0.0.1"
    open(f"{os.environ['FAKE_LOG']}.ready.{host}:{argv[argv.index('--port') + 1]}", "w").close()
    time.sleep(120)
sys.exit(int(os.environ.get("FAKE_SRUN_RC", "0")))
'''
FAKE_SCONTROL = r'''#!/usr/bin/env python3
import os, sys
if sys.argv[1:] != ["show", "hostnames", os.environ["SLURM_JOB_NODELIST"]]:
    sys.exit(f"fake scontrol: unexpected arguments {sys.argv[1:]}")
print("\n".join(os.environ["FAKE_HOSTS"].split()))
'''
FAKE_CURL = r'''#!/usr/bin/env python3
import json, os, sys
from urllib.parse import urlparse
log, url = os.environ["FAKE_LOG"], sys.argv[-1]
with open(log, "a") as f:
    f.write(json.dumps({"prog": "curl", "argv": sys.argv[1:]}) + "\n")
ready = os.path.exists(f"{log}.ready.{urlparse(url).netloc}")
sys.exit(0 if ready and os.environ.get("FAKE_CURL_FAIL") != "1" else 7)
'''
FAKE_TORCHRUN = r'''#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"prog": "torchrun", "argv": sys.argv[1:], "own_session": os.getsid(0) == os.getpid(),
                        "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SMD_ROLLOUT_URL")}}) + "\n")
sys.exit(int(os.environ.get("FAKE_TORCHRUN_RC", "0")))
'''
FAKE_NVIDIA_SMI = "#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)\"; done\n"


@pytest.fixture
def fake(tmp_path):
    """A PATH with the fakes (and `python` = this interpreter), a log, and a base environment."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("curl", FAKE_CURL),
                       ("torchrun", FAKE_TORCHRUN)):
        (bin_ / name).write_text(text.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
        (bin_ / name).chmod(0o755)
    # `python` = this interpreter, exec'd by its own path: a symlink to the binary would lose a virtualenv
    # (the venv is found from the path the interpreter is started by, next to pyvenv.cfg)
    (bin_ / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (bin_ / "python").chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SMD_"))}
    env.update(PATH=f"{bin_}:{env['PATH']}", FAKE_LOG=str(log), SMD_STOP_GRACE="10", SMD_HEALTH_INTERVAL="0.1",
               SMD_LOG_ROOT=str(tmp_path / "slurm_logs"), SMD_LOG_DIR=str(tmp_path / "local_logs"), SMD_HOME=str(REPO))

    class Fake:
        root, path, logs = tmp_path, bin_, tmp_path / "slurm_logs"

        @staticmethod
        def records() -> list[dict]:
            return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

        @staticmethod
        def sbatch(config: str, *overrides: str, hosts=HOSTS, **extra) -> subprocess.CompletedProcess:
            e = dict(env, SLURM_JOB_ID=JOB, SLURM_JOB_NODELIST="gpu-[01-04]", SLURM_SUBMIT_DIR=str(REPO),
                     SLURM_CPUS_ON_NODE="64", FAKE_HOSTS=" ".join(hosts), **extra)
            return subprocess.run(["bash", str(REPO / "launch/slurm/smd.sbatch"), config, *overrides], env=e,
                                  capture_output=True, text=True, cwd=tmp_path, timeout=120)

        @staticmethod
        def run(script: str, *args: str, cwd=tmp_path, **extra) -> subprocess.CompletedProcess:
            return subprocess.run(["bash", str(REPO / script), *args], env=dict(env, **extra), capture_output=True,
                                  text=True, cwd=cwd, timeout=120)

    return Fake


SUPERVISE = ["python", "-m", "sglang_patch.supervise"]


def unsupervised(cmd: list[str]) -> list[str]:
    """Servers run under the supervisor: check its options (the config's restart settings, a PID
    file and a server log), return the server command it runs."""
    if cmd[:3] != SUPERVISE:
        return cmd
    cut = cmd.index("--")
    opts = cmd[3:cut]
    assert opts[:4] == ["--max-restarts", "5", "--hang-timeout-s", "120.0"], opts
    assert "--pid-file" in opts and "--server-log" in opts, opts
    return cmd[cut + 1:]


def split_srun(argv: list[str]) -> tuple[list[str], list[str]]:
    """srun's own options (all written --opt=value by the scripts) and the command it runs (a
    supervised server: the server command, see :func:`unsupervised`)."""
    i = next(i for i, a in enumerate(argv) if not a.startswith("-"))
    return argv[:i], unsupervised(argv[i:])


def per_node(records: list[dict]) -> dict[str, list[list[str]]]:
    """The commands each node runs: a step runs its command once on every node of its --nodelist."""
    nodes: dict[str, list[list[str]]] = {}
    for r in records:
        if r["prog"] != "srun" or "argv" not in r:
            continue
        opts, cmd = split_srun(r["argv"])
        (nodelist,) = [o.split("=", 1)[1] for o in opts if o.startswith("--nodelist=")]
        for n in nodelist.split(","):
            nodes.setdefault(n, []).append(cmd)
    return {n: sorted(c) for n, c in nodes.items()}


def assert_started_steps_were_stopped(out: str, exited: str = "learner") -> int:
    """Every step the script reports starting (by PID) was stopped by teardown and no longer exists."""
    started = dict(re.findall(r"started (\S+) \(pid (\d+)\)", out))
    stopped = dict(re.findall(r"stopping (\S+) \(kill -TERM -- (\d+)\)", out))
    assert {k: v for k, v in started.items() if k != exited} == stopped, out
    for pid in started.values():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    return len(stopped)


# the config's whole eviction policy, every field (the trainer checks it against the server's)
POLICY_2048 = ["--smd-policy", "h2o", "--smd-budget", "2048", "--smd-granularity", "layer", "--smd-sinks", "4",
               "--smd-window", "128", "--smd-pool-kernel", "7", "--smd-pooling", "max", "--smd-buffer", "64",
               "--smd-rkv-lambda", "0.1"]


# what the eviction patch requires of a GPU server (the presets' sglang: section)
PATCH_FLAGS = ["--attention-backend", "triton", "--page-size", "1", "--disable-overlap-schedule",
               "--cuda-graph-backend-decode", "disabled"]


def server_cmd(port: int, model: str = "models/Qwen2.5-32B-Instruct", host: str = "0.0.0.0") -> list[str]:
    return ["python", "-m", "sglang_patch.launch_server", "--model-path", model, "--tp-size", "1",
            "--mem-fraction-static", "0.85", *PATCH_FLAGS, *POLICY_2048, "--host", host, "--port", str(port)]


PORTS = [30000 + 10 * k for k in range(8)]  # one engine per GPU: the patched server runs TP 1
URLS_32B = [f"http://gpu-0{h}:{p}" for h in (3, 4) for p in PORTS]
ROUTER_CMD = ["python", "-m", "sglang_router.launch_router", "--worker-urls", *URLS_32B, "--host", "0.0.0.0",
              "--port", "30500"]
TORCHRUN = ["python", "-m", "torch.distributed.run"]  # the learner's launcher, under SMD_PYTHON
# the learner samples from every server and pushes its weights to them
LEARNER_32B = [*TORCHRUN, "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
               "--rdzv_endpoint=gpu-01:29500", f"--rdzv_id={JOB}", "-m", "megatron_smd.cli", "train",
               "--config", "configs/models/qwen2.5-32b.yaml", "train.steps=3",
               f"rollout.sglang_urls=[{','.join(URLS_32B)}]", "sync.transport=sglang"]
CONTAINER = ["--container-image=nvcr.io/acme/smd:1.0", f"--container-mounts={REPO}:{REPO}",
             f"--container-workdir={REPO}"]


# ============================================================================ Slurm: 4 nodes
def test_slurm_launch_runs_the_exact_commands_on_each_node(fake):
    """qwen2.5-32b: learner tp=8 x pp=2 on gpu-01,02; 8 engines (one per GPU) on each of gpu-03,04 + router."""
    r = fake.sbatch("configs/models/qwen2.5-32b.yaml", "train.steps=3", SMD_CONTAINER_IMAGE="nvcr.io/acme/smd:1.0")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = fake.records()
    assert per_node(rec) == {
        "gpu-01": [LEARNER_32B],
        "gpu-02": [LEARNER_32B],
        "gpu-03": sorted([*map(server_cmd, PORTS), ROUTER_CMD]),
        "gpu-04": sorted(map(server_cmd, PORTS)),
    }
    logs = fake.logs / JOB
    steps = [split_srun(x["argv"]) for x in rec if x["prog"] == "srun" and "argv" in x]
    for opts, cmd in steps:
        if "sglang_patch.launch_server" in cmd:
            host = opts[2].split("=")[1]
            assert opts == ["--nodes=1", "--ntasks=1", f"--nodelist={host}", "--gpus-per-task=1", "--exact",
                            "--cpus-per-task=8", f"--output={logs}/sglang-{host}-{cmd[-1]}.supervise.log", *CONTAINER]
        elif cmd == ROUTER_CMD:
            assert opts == ["--nodes=1", "--ntasks=1", "--nodelist=gpu-03", "--overlap",
                            f"--output={logs}/router-gpu-03.log", *CONTAINER]
        else:
            assert cmd == LEARNER_32B
            assert opts == ["--nodes=2", "--ntasks-per-node=1", "--nodelist=gpu-01,gpu-02", "--kill-on-bad-exit=1",
                            "--cpus-per-task=64", f"--output={logs}/learner-%N.log", *CONTAINER]
    # every server (4) and the router were health-checked before the learner started
    order = ["learner" if "torch.distributed.run" in x["argv"] else x["prog"] for x in rec if "argv" in x]
    assert order.index("learner") == len(order) - 1
    health = sorted({x["argv"][-1] for x in rec if x["prog"] == "curl"})
    assert health == sorted([f"{u}/health" for u in URLS_32B] + ["http://gpu-03:30500/health"])
    learner = next(x for x in rec if x["prog"] == "srun" and "argv" in x and "torch.distributed.run" in x["argv"])
    assert learner["env"] == {"SMD_ROLLOUT_URL": "http://gpu-03:30500", "SMD_ROLLOUT_SERVERS": " ".join(URLS_32B)}
    # teardown stopped exactly the 17 long-running steps (by PID), after the learner finished
    stopped = sorted(split_srun(x["terminated"])[1] for x in rec if "terminated" in x)
    assert stopped == sorted([*map(server_cmd, PORTS), *map(server_cmd, PORTS), ROUTER_CMD])
    assert "learner exited with status 0" in r.stdout
    assert assert_started_steps_were_stopped(r.stdout) == 17


def test_dry_run_prints_the_same_steps_and_runs_nothing(fake):
    r = fake.sbatch("configs/models/qwen2.5-32b.yaml", "train.steps=3", SMD_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert fake.records() == []  # no srun, no curl
    printed = [shlex.split(line[len("[dry-run] "):]) for line in r.stdout.splitlines() if line.startswith("[dry-run] srun ")]
    assert [split_srun(p[1:])[1] for p in printed] == [*map(server_cmd, PORTS), *map(server_cmd, PORTS),
                                                      ROUTER_CMD, LEARNER_32B]
    nodes = [next(o for o in split_srun(p[1:])[0] if o.startswith("--nodelist=")) for p in printed]
    assert nodes == ["--nodelist=gpu-03"] * 8 + ["--nodelist=gpu-04"] * 8 + ["--nodelist=gpu-03",
                                                                            "--nodelist=gpu-01,gpu-02"]
    waits = [line.split()[-1] for line in r.stdout.splitlines() if line.startswith("[dry-run] wait for ")]
    assert waits[-1] == "http://gpu-03:30500/health" and len(waits) == 17


def test_one_engine_needs_no_router_and_a_learner_failure_is_the_job_status(fake):
    """One rollout node of a CPU cluster: one engine on gpu-02, no router; the learner step fails (status 3)."""
    over = ("resources.gpus_per_node=0", "resources.rollout_nodes=1", "rollout.backend=sglang")
    r = fake.sbatch("configs/tiny-cpu.yaml", *over, hosts=HOSTS[:2], FAKE_SRUN_RC="3")
    assert r.returncode == 3, r.stdout + r.stderr
    nodes = per_node(fake.records())
    (srv,) = nodes["gpu-02"]
    assert srv[:3] == ["python", "-m", "sglang_patch.launch_server"] and srv[-4:] == ["--host", "0.0.0.0", "--port",
                                                                                      "30000"]
    assert nodes["gpu-01"] == [[*TORCHRUN, "--nnodes=1", "--nproc_per_node=1", "--rdzv_backend=c10d",
                                "--rdzv_endpoint=gpu-01:29500", f"--rdzv_id={JOB}", "-m", "megatron_smd.cli", "train",
                                "--config", "configs/tiny-cpu.yaml", *over,
                                "rollout.sglang_urls=[http://gpu-02:30000]", "sync.transport=sglang"]]
    learner = [x for x in fake.records() if "argv" in x and "torch.distributed.run" in x["argv"]][0]
    assert learner["env"] == {"SMD_ROLLOUT_URL": "http://gpu-02:30000", "SMD_ROLLOUT_SERVERS": "http://gpu-02:30000"}
    assert "learner exited with status 3" in r.stdout
    assert assert_started_steps_were_stopped(r.stdout) == 1


def test_colocated_layout_runs_only_the_learner_on_every_node(fake):
    r = fake.sbatch("configs/models/qwen2.5-7b.yaml", "resources.rollout_nodes=0", "resources.nodes=4",
                    "resources.dp=8", "rollout.backend=reference", "sync.transport=inprocess", SMD_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    printed = [shlex.split(line[len("[dry-run] "):]) for line in r.stdout.splitlines() if line.startswith("[dry-run]")]
    assert len(printed) == 1
    opts, cmd = split_srun(printed[0][1:])
    assert "--nodelist=gpu-01,gpu-02,gpu-03,gpu-04" in opts and "--nodes=4" in opts
    assert cmd[:5] == [*TORCHRUN, "--nnodes=4", "--nproc_per_node=8"]


def test_a_server_that_never_gets_healthy_stops_the_job_before_the_learner(fake):
    r = fake.sbatch("configs/models/llama3.1-8b.yaml", hosts=HOSTS[:2], FAKE_CURL_FAIL="1", SMD_HEALTH_TIMEOUT="0")
    assert r.returncode == 2
    assert "http://gpu-02:30000/health not healthy after 0s" in r.stderr
    rec = fake.records()
    assert not any("torch.distributed.run" in x.get("argv", []) for x in rec)
    assert assert_started_steps_were_stopped(r.stdout) == 8  # all eight engines, not only the one checked


def test_allocation_and_layout_errors_stop_before_any_step(fake):
    r = fake.sbatch("configs/models/qwen2.5-32b.yaml", hosts=HOSTS[:3])
    assert r.returncode == 2
    assert "the allocation has 3 node(s), the config needs resources.nodes + rollout_nodes = 2 + 2 = 4" in r.stderr
    r = fake.sbatch("configs/models/qwen2.5-7b.yaml", "resources.tp=3", hosts=HOSTS[:2])
    assert r.returncode == 2
    assert "num_attention_heads=28 is not divisible by tp=3" in r.stderr
    assert fake.records() == []


def submitted(r: subprocess.CompletedProcess) -> list[str]:
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("[dry-run] ")]
    return shlex.split(line[len("[dry-run] "):])


def test_submit_asks_for_the_nodes_and_gpus_the_config_needs(fake):
    r = fake.run("launch/slurm/submit.sh", "configs/models/qwen2.5-32b.yaml", "train.steps=3", SMD_DRY_RUN="1",
                 SMD_SBATCH_ARGS="--time=04:00:00 --account=rl", cwd=REPO)
    assert submitted(r) == [
        "sbatch", "--nodes=4", "--gpus-per-node=8", "--time=04:00:00", "--account=rl", "launch/slurm/smd.sbatch",
        f"{REPO}/configs/models/qwen2.5-32b.yaml", "train.steps=3"]


def test_submit_on_a_cpu_cluster_asks_for_no_gpu_and_takes_the_config_from_where_the_user_stands(fake):
    """resources.gpus_per_node=0: no --gpus-per-node (a CPU-only Slurm refuses any GPU request); a
    relative config path is resolved from the current directory, not from the repository root."""
    elsewhere = fake.root / "work" / "exp"
    elsewhere.mkdir(parents=True)
    (elsewhere / "my.yaml").write_text((REPO / "configs" / "tiny-cpu.yaml").read_text().replace(
        "preset: models/tiny-qwen2.yaml", f"preset: {REPO}/configs/models/tiny-qwen2.yaml"))
    rel = os.path.relpath(REPO / "configs" / "tiny-cpu.yaml", elsewhere)
    for cfg, path in ((rel, REPO / "configs" / "tiny-cpu.yaml"), ("my.yaml", elsewhere / "my.yaml")):
        r = fake.run("launch/slurm/submit.sh", cfg, "--resume", "auto", "resources.gpus_per_node=0",
                     "resources.tp=2", SMD_DRY_RUN="1", cwd=elsewhere)
        argv = submitted(r)
        assert argv[:3] == ["sbatch", "--nodes=1", "launch/slurm/smd.sbatch"]  # no --gpus-per-node
        assert argv[4:] == ["--resume", "auto", "resources.gpus_per_node=0", "resources.tp=2"]
        assert Path(argv[3]).is_absolute() and Path(argv[3]).resolve() == path.resolve()
    r = fake.run("launch/slurm/submit.sh", "no/such.yaml", SMD_DRY_RUN="1", cwd=elsewhere)
    assert r.returncode == 2 and f"config not found: no/such.yaml (a relative path is taken from the current " \
        f"directory, {elsewhere})" in r.stderr
    r = fake.run("launch/slurm/submit.sh", rel, "--epochs", "3", SMD_DRY_RUN="1", cwd=elsewhere)
    assert r.returncode == 2 and "unknown option --epochs" in r.stderr


def test_cpu_cluster_layouts(fake):
    """gpus_per_node=0: the learner's ranks are spread evenly over the nodes; rollout nodes run SGLang
    servers, so they need rollout.backend=sglang."""
    r = fake.sbatch("configs/tiny-cpu.yaml", "resources.gpus_per_node=0", "resources.nodes=2", "resources.dp=2",
                    "resources.tp=2", "--resume", "none", hosts=HOSTS[:2], SMD_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    (printed,) = [shlex.split(x[len("[dry-run] "):]) for x in r.stdout.splitlines() if x.startswith("[dry-run]")]
    opts, cmd = split_srun(printed[1:])
    assert "--nodelist=gpu-01,gpu-02" in opts and not any(o.startswith("--gpus") for o in opts)
    assert cmd == [*TORCHRUN, "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu-01:29500",
                   f"--rdzv_id={JOB}", "-m", "megatron_smd.cli", "train", "--config", "configs/tiny-cpu.yaml",
                   "--resume", "none", "resources.gpus_per_node=0", "resources.nodes=2", "resources.dp=2",
                   "resources.tp=2"]
    r = fake.sbatch("configs/tiny-cpu.yaml", "resources.gpus_per_node=0", "resources.nodes=2", hosts=HOSTS[:2])
    assert r.returncode == 2 and "1 learner ranks cannot be spread evenly over resources.nodes=2" in r.stderr
    r = fake.sbatch("configs/tiny-cpu.yaml", "resources.gpus_per_node=0", "resources.rollout_nodes=1", hosts=HOSTS[:2])
    assert r.returncode == 2 and "resources.rollout_nodes=1 starts SGLang servers, but rollout.backend=reference" \
        in r.stderr
    r = fake.sbatch("configs/tiny-cpu.yaml", "resources.gpus_per_node=0", "rollout.backend=sglang",
                    "resources.rollout_tp=2", hosts=HOSTS[:1])
    assert r.returncode == 2 and "2 is not supported: the patched SGLang server refuses --tp-size > 1" in r.stderr
    r = fake.sbatch("configs/models/llama3.1-8b.yaml", "resources.rollout_nodes=0", "rollout.backend=sglang",
                    hosts=HOSTS[:1])
    assert r.returncode == 2 and "rollout.backend=sglang with resources.rollout_nodes=0 on GPUs" in r.stderr
    assert fake.records() == []


TINY_SERVER = ["python", "-m", "sglang_patch.launch_server", "--model-path", "runs/models/tiny-qwen2",
               "--tp-size", "1", "--smd-policy", "h2o", "--smd-budget", "3"]  # configs/tiny-cpu.yaml's policy


def test_cpu_cluster_with_sglang_servers(fake):
    """rollout.backend=sglang, gpus_per_node=0. rollout_nodes=0 on one node: one CPU server on the learner's
    node (its step overlaps the learner's CPUs), bound to 127.0.0.1; rollout_nodes=1: one CPU server on the
    rollout node. The learner is pointed at the servers, after the user's overrides."""
    r = fake.sbatch("configs/tiny-cpu.yaml", "resources.gpus_per_node=0", "rollout.backend=sglang", hosts=HOSTS[:1])
    assert r.returncode == 0, r.stdout + r.stderr
    rec = fake.records()
    steps = [split_srun(x["argv"]) for x in rec if x["prog"] == "srun" and "argv" in x]
    (srv_opts, srv), (lrn_opts, lrn) = steps
    assert srv[:len(TINY_SERVER)] == TINY_SERVER and "--smd-window" in srv  # the config's whole policy
    assert srv[-7:] == ["--device", "cpu", "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", "30000"]
    assert srv_opts == ["--nodes=1", "--ntasks=1", "--nodelist=gpu-01", "--overlap", "--cpus-per-task=64",
                        f"--output={fake.logs / JOB}/sglang-gpu-01-30000.supervise.log"]
    assert not any(o.startswith("--gpus") for o in srv_opts + lrn_opts)
    assert lrn[-4:] == ["resources.gpus_per_node=0", "rollout.backend=sglang",
                        "rollout.sglang_urls=[http://127.0.0.1:30000]", "sync.transport=sglang"]
    assert {x["argv"][-1] for x in rec if x["prog"] == "curl"} == {"http://127.0.0.1:30000/health"}
    assert "rollout on gpu-01 (1 cpu engine(s)/node x tp=1)" in r.stdout
    assert assert_started_steps_were_stopped(r.stdout) == 1

    log = fake.root / "calls.jsonl"
    log.unlink()
    r = fake.sbatch("configs/tiny-cpu.yaml", "resources.gpus_per_node=0", "resources.rollout_nodes=1",
                    "rollout.backend=sglang", hosts=HOSTS[:2])
    assert r.returncode == 0, r.stdout + r.stderr
    nodes = per_node(fake.records())
    (srv,) = nodes["gpu-02"]
    assert srv[-7:] == ["--device", "cpu", "--skip-tokenizer-init", "--host", "0.0.0.0", "--port", "30000"]
    srv_opts = next(split_srun(x["argv"])[0] for x in fake.records() if "argv" in x and "--device" in x["argv"])
    assert srv_opts[:5] == ["--nodes=1", "--ntasks=1", "--nodelist=gpu-02", "--exact", "--cpus-per-task=64"]
    (lrn,) = nodes["gpu-01"]
    assert lrn[-2:] == ["rollout.sglang_urls=[http://gpu-02:30000]", "sync.transport=sglang"]
    assert assert_started_steps_were_stopped(r.stdout) == 1


def test_gpu_servers_are_handed_to_the_learner_with_rollout_backend_sglang(fake):
    r = fake.sbatch("configs/models/llama3.1-8b.yaml", hosts=HOSTS[:2])
    assert r.returncode == 0, r.stdout + r.stderr
    nodes = per_node(fake.records())
    assert all(c[-4:-2] == ["--host", "0.0.0.0"] and "--device" not in c for c in nodes["gpu-02"])
    (lrn,) = nodes["gpu-01"]
    assert lrn[-2:] == [f"rollout.sglang_urls=[{','.join(f'http://gpu-02:{p}' for p in PORTS)}]",
                        "sync.transport=sglang"]
    servers = [c for c in nodes["gpu-02"] if "sglang_patch.launch_server" in c]
    assert len(servers) == 8 and all(c[:-4] == server_cmd(0, "models/Llama-3.1-8B-Instruct")[:-4] for c in servers)  # the patch's flags and the whole policy on every server


def test_the_learner_runs_under_smd_python_and_a_failure_names_its_log(fake):
    py = fake.root / "env" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text((fake.path / "python").read_text())
    py.chmod(0o755)
    r = fake.sbatch("configs/tiny-cpu.yaml", "resources.gpus_per_node=0", hosts=HOSTS[:1], SMD_PYTHON=str(py),
                    FAKE_SRUN_RC="7")
    assert r.returncode == 7, r.stdout + r.stderr
    (step,) = [x["argv"] for x in fake.records() if "argv" in x]
    assert split_srun(step)[1][:3] == [str(py), "-m", "torch.distributed.run"]
    assert "learner exited with status 7" in r.stdout
    assert f"learner log (gpu-01): {fake.logs / JOB / 'learner-gpu-01.log'}" in r.stdout


# ============================================================================ one machine
def test_local_cpu_runs_smd_train_under_torchrun_with_the_config_world(fake):
    r = fake.run("launch/local.sh", "configs/tiny-cpu.yaml", "resources.tp=2", "train.steps=2", SMD_NUM_GPUS="0")
    assert r.returncode == 0, r.stdout + r.stderr
    (call,) = fake.records()
    assert call["argv"] == ["--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
                            "--rdzv_endpoint=127.0.0.1:29500", "-m", "megatron_smd.cli", "train", "--config",
                            "configs/tiny-cpu.yaml", "resources.tp=2", "train.steps=2"]
    assert call["own_session"]  # started under setsid: teardown can stop its whole process group
    assert call["env"] == {"CUDA_VISIBLE_DEVICES": None, "SMD_ROLLOUT_URL": None}
    r = fake.run("launch/local.sh", "configs/tiny-cpu.yaml", "resources.rollout_nodes=1", "rollout.backend=sglang",
                 SMD_NUM_GPUS="0")
    assert r.returncode == 2 and "resources.rollout_nodes=1 needs SGLang servers on GPUs" in r.stderr


def test_local_gpu_splits_the_gpus_between_learner_and_servers(fake):
    """A GPU preset with rollout nodes on one 8-GPU machine: the learner on GPUs 0-3, one patched server
    per remaining GPU with the patch's flags and the config's whole policy, a router, and smd train
    pointed at every server (rollout.sglang_urls, sync.transport=sglang)."""
    (fake.path / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (fake.path / "nvidia-smi").chmod(0o755)
    r = fake.run("launch/local.sh", "configs/models/qwen2.5-7b.yaml", "resources.dp=1", SMD_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(x[len("[dry-run] "):]) for x in r.stdout.splitlines()
             if x.startswith("[dry-run] ") and not x.startswith("[dry-run] wait")]
    lines = [ln[:2] + unsupervised(ln[2:]) if ln[0] == "env" else ln for ln in lines]
    urls = [f"http://127.0.0.1:{p}" for p in PORTS[:4]]
    assert lines == [
        *[["env", f"CUDA_VISIBLE_DEVICES={4 + k}", *server_cmd(p, "models/Qwen2.5-7B-Instruct", "127.0.0.1")]
          for k, p in enumerate(PORTS[:4])],
        ["python", "-m", "sglang_router.launch_router", "--worker-urls", *urls, "--host", "127.0.0.1", "--port",
         "30500"],
        ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "torchrun", "--nnodes=1", "--nproc_per_node=4", "--rdzv_backend=c10d",
         "--rdzv_endpoint=127.0.0.1:29500", "-m", "megatron_smd.cli", "train", "--config",
         "configs/models/qwen2.5-7b.yaml", "resources.dp=1", f"rollout.sglang_urls=[{','.join(urls)}]",
         "sync.transport=sglang"],
    ]
    r = fake.run("launch/local.sh", "configs/models/qwen2.5-7b.yaml", "resources.rollout_nodes=0", "resources.dp=1",
                 SMD_DRY_RUN="1")
    assert r.returncode == 2 and "rollout.backend=sglang with resources.rollout_nodes=0 on GPUs" in r.stderr


# ============================================================================ hygiene
def test_shellcheck_passes_on_every_script():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install -y shellcheck)")
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_never_kill_by_name_and_start_with_their_launch_command():
    for s in SCRIPTS:
        text = s.read_text()
        assert not re.search(r"\b(pkill|killall)\b", text), f"{s}: processes are stopped by PID, never by name"
        if s.name != "common.sh":
            assert text.splitlines()[1].startswith("# Launch: "), s
