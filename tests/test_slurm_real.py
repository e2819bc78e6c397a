"""The Slurm launcher under a real single-node Slurm: munged, slurmctld and slurmd started by this module.

Everything lives in a temporary directory: a fresh munge key and socket, a minimal ``slurm.conf``
(one partition with this host as its only node, linuxproc process tracking, no cgroups, no
accounting, free ports, every daemon bound to 127.0.0.1), the state, spool, log and PID files. The
daemons are stopped by the PIDs from their PID files. Jobs are submitted the way a user would,
``launch/slurm/submit.sh CONFIG ...`` from another directory with a relative config path, on a CPU
cluster (``resources.gpus_per_node=0``); the learner must be started through ``SMD_PYTHON`` (this
interpreter; a virtualenv's ``bin`` is taken off ``PATH``). Short runs: a tiny pre-made model, no SFT
warm start, a few RL steps.

Skips, saying why, without the Slurm and munge programs (Debian/Ubuntu: ``apt-get install -y
slurm-wlm slurm-client munge``; ``.ci/run`` installs them) or without root (slurmd runs job steps as
their user). Multi-node argv shapes, which one machine cannot host, stay in ``tests/test_launch.py``
against a fake ``srun``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
JOB_TIMEOUT = 150  # seconds a short job may take, start to end (they take 15-25 s on 2 cores)

# the daemons live in sbin, which a user's PATH often lacks
_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
BIN = {p: shutil.which(p, path=_SEARCH) for p in PROGRAMS}
_missing = [p for p, path in BIN.items() if path is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_missing), reason=f"Slurm/munge not installed (not found: {', '.join(_missing)}; "
                       "Debian/Ubuntu: apt-get install -y slurm-wlm slurm-client munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a real slurmd needs root (it starts job steps as their user)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes (its parent has not reaped it yet)
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait(pred, timeout: float, interval: float = 0.25) -> bool:
    """Poll ``pred`` until true; bounded in time and in count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if pred():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return bool(pred())


class Cluster:
    """munged + slurmctld + slurmd with every file under ``root``; stop() kills them by their PID files."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        d = {k: root / k for k in ("etc", "munge", "state", "spool", "log", "run")}
        for p in d.values():
            p.mkdir(parents=True, exist_ok=True)
        self.dirs = d
        self.conf = d["etc"] / "slurm.conf"
        self.munge_socket = d["munge"] / "munge.socket"
        self.pidfiles = {"slurmd": d["run"] / "slurmd.pid", "slurmctld": d["run"] / "slurmctld.pid",
                         "munged": d["run"] / "munged.pid"}

    def write_config(self) -> None:
        d, cpus = self.dirs, os.cpu_count() or 1
        self.conf.write_text(f"""\
ClusterName=smdtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation={d['state']}
SlurmdSpoolDir={d['spool']}
SlurmctldPidFile={self.pidfiles['slurmctld']}
SlurmdPidFile={self.pidfiles['slurmd']}
SlurmctldLogFile={d['log'] / 'slurmctld.log'}
SlurmdLogFile={d['log'] / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # KillWait stays at Slurm's default (30 s): the 10 s teardown checks below measure the job
        # script's own teardown, not Slurm's SIGKILL.

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SMD_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _run(self, *cmd: str) -> None:
        r = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted(self.dirs["log"].glob("*.log")):
            out.append(f"--- {f.name} (last lines)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def start(self) -> None:
        key = self.dirs["munge"] / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.dirs["munge"].chmod(0o700)
        # --force: munged refuses a socket directory that is not world-executable; this one is private
        self._run(BIN["munged"], "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                  f"--log-file={self.dirs['log'] / 'munged.log'}", f"--pid-file={self.pidfiles['munged']}",
                  f"--seed-file={self.dirs['munge'] / 'munged.seed'}")
        self.write_config()
        self._run(BIN["slurmctld"], "-f", str(self.conf))  # each daemonises and writes its PID file
        self._run(BIN["slurmd"], "-f", str(self.conf))
        ok = _wait(lambda: self.node_state() == "idle", timeout=30, interval=0.5)
        assert ok, f"the node never became idle (sinfo: {self.node_state()!r})\n{self.logs()}"

    def node_state(self) -> str:
        r = subprocess.run([BIN["sinfo"], "-h", "-N", "-o", "%t"], env=self.env(), capture_output=True, text=True,
                           timeout=30)
        return r.stdout.strip()

    def pids(self) -> dict[str, int]:
        out = {}
        for name, f in self.pidfiles.items():
            try:
                out[name] = int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return out

    def stop(self) -> None:
        """SIGTERM each daemon by the PID in its PID file (slurmd, slurmctld, then munged), SIGKILL after
        15 s; then SIGKILL whatever of this cluster is left (a job a failed test never saw end: its
        slurmstepd and steps carry this cluster's SLURM_CONF in their environment)."""
        pids = self.pids()
        for name in ("slurmd", "slurmctld", "munged"):
            pid = pids.get(name)
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            if not _wait(lambda: not _alive(pid), timeout=15):
                os.kill(pid, signal.SIGKILL)
                _wait(lambda: not _alive(pid), timeout=5)
        for pid in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover_processes(self) -> list[int]:
        """PIDs (not this test process) whose environment carries this cluster's SLURM_CONF."""
        want = f"SLURM_CONF={self.conf}".encode()
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if want in (p / "environ").read_bytes().split(b"\0") and _alive(int(p.name)):
                    out.append(int(p.name))
            except OSError:
                continue
        return out

    # ------------------------------------------------------------------ jobs
    def job(self, job_id: str) -> dict[str, str]:
        r = subprocess.run([BIN["scontrol"], "show", "job", "-o", job_id], env=self.env(), capture_output=True,
                           text=True, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait_job(self, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        _wait(lambda: self.job(job_id).get("JobState") in TERMINAL, timeout=timeout, interval=0.5)
        return self.job(job_id)

    def job_processes(self, job_id: str) -> dict[int, str]:
        """PID -> command line of every process of this job: those whose environment carries this
        cluster's SLURM_CONF and the job id, and the job's slurmstepd."""
        want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CONF={self.conf}".encode()}
        stepd = re.compile(rf"^slurmstepd: \[{job_id}\.")
        out = {}
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                env = set((p / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if (want <= env or stepd.match(cmd)) and _alive(int(p.name)):
                out[int(p.name)] = cmd
        return out


def listening_ports(pids=None) -> set[int]:
    """TCP ports in LISTEN state (of these processes only, when given)."""
    inodes = None
    if pids is not None:
        inodes = set()
        for pid in pids:
            try:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
            except OSError:
                continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and (inodes is None or f[9] in inodes):
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()
    left = {n: pid for n, pid in c.pids().items() if _alive(pid)}
    assert not left, f"daemons still running after stop(): {left}"


SHORT_RUN = ["resources.gpus_per_node=0", "sft.enabled=false", "task.name=kv_recall", "task.num_pairs=6", "task.num_queries=1",
             "task.key_digits=2", "task.value_digits=1", "rollout.num_prompts=2", "rollout.group_size=2",
             "rollout.max_new_tokens=4", "rollout.policy.budget=12", "rollout.policy.window=4",
             "train.eval_every=0", "train.save_every=1", "logging.progress_bar=false", "learner.micro_batch_size=4"]


class Submitter:
    """``launch/slurm/submit.sh configs/tiny-cpu.yaml ...`` from another directory, as a user would."""

    def __init__(self, cluster: Cluster, root: Path, model_dir: Path):
        self.c, self.root, self.model = cluster, root, model_dir
        self.cwd = root / "user"
        self.cwd.mkdir(exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)  # sbatch does not create the directory of --output
        env = cluster.env()
        if sys.prefix != sys.base_prefix:  # a virtualenv: only SMD_PYTHON may lead the job to it
            env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                          if not p.startswith(sys.prefix))
        env.update(SMD_PYTHON=sys.executable, SMD_LOG_ROOT=str(root / "logs"), SMD_STOP_GRACE="10",
                   SMD_RDZV_PORT=str(_free_port()), SMD_SBATCH_ARGS=f"--output={root / 'logs'}/smd-%j.out")
        self.env = env

    def submit(self, out: Path, *args: str) -> str:
        cfg = os.path.relpath(REPO / "configs" / "tiny-cpu.yaml", self.cwd)
        r = subprocess.run([str(REPO / "launch" / "slurm" / "submit.sh"), cfg, *args, *SHORT_RUN,
                            f"model.path={self.model}", f"output_dir={out}"],
                           env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=60)
        m = re.search(r"Submitted batch job (\d+)", r.stdout)
        assert r.returncode == 0 and m, r.stdout + r.stderr
        return m.group(1)

    def output(self, job_id: str) -> str:
        f = self.root / "logs" / f"smd-{job_id}.out"
        text = f.read_text(errors="replace") if f.exists() else f"(no {f})"
        learner = self.root / "logs" / job_id / f"learner-{self.c.host}.log"
        if learner.exists():
            text += f"\n--- {learner.name} (last lines)\n" + "\n".join(learner.read_text().splitlines()[-25:])
        return text


@pytest.fixture
def user(slurm, tmp_path, tiny_qwen2_dir):
    return Submitter(slurm, tmp_path, tiny_qwen2_dir)


def _checkpoints(out: Path) -> list[Path]:
    ck = out / "checkpoints"
    return sorted(d for d in ck.glob("step_*") if ".tmp-" not in d.name and (d / "loop_state.json").is_file()) \
        if ck.is_dir() else []


@pytest.mark.parametrize("tp", [1, 2])
def test_a_short_job_completes(slurm, user, tmp_path, tp):
    out = tmp_path / "run"
    t0 = time.monotonic()
    job = user.submit(out, f"resources.tp={tp}", "train.steps=2")
    info = slurm.wait_job(job)
    took = time.monotonic() - t0
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), user.output(job)
    assert "learner exited with status 0" in user.output(job)
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert [d.name for d in _checkpoints(out)] == ["step_00000001", "step_00000002"]
    print(f"\ntp={tp}: job {job} COMPLETED in {took:.1f} s (submit to end)")


def test_scancel_tears_the_job_down_and_resume_continues(slurm, user, tmp_path):
    out = tmp_path / "run"
    job = user.submit(out, "train.steps=60")
    # mid-training: at least one complete checkpoint, and the job still running
    _wait(lambda: _checkpoints(out) or slurm.job(job).get("JobState") in TERMINAL, timeout=JOB_TIMEOUT, interval=0.5)
    assert slurm.job(job).get("JobState") == "RUNNING" and _checkpoints(out), user.output(job)
    procs = slurm.job_processes(job)
    ports = listening_ports(procs)
    assert int(user.env["SMD_RDZV_PORT"]) in ports, (procs, ports)  # the c10d rendezvous store
    t0 = time.monotonic()
    subprocess.run([BIN["scancel"], job], env=slurm.env(), check=True, timeout=30)
    gone = _wait(lambda: not slurm.job_processes(job), timeout=10, interval=0.2)
    teardown = time.monotonic() - t0
    assert gone, f"still running 10 s after scancel: {slurm.job_processes(job)}\n{user.output(job)}"
    assert not ports & listening_ports(), f"still listening: {ports & listening_ports()}"
    info = slurm.wait_job(job, timeout=30)
    assert info.get("JobState") == "CANCELLED", info
    done = _checkpoints(out)
    assert done, "no complete checkpoint survived the cancel"
    last = done[-1]
    reached, inode = int(last.name.split("_")[1]), last.stat().st_ino
    print(f"\nscancel: job {job} CANCELLED, {len(procs)} processes gone {teardown:.1f} s after scancel; "
          f"last checkpoint {last.name}")

    job2 = user.submit(out, "--resume", "auto", f"train.steps={reached + 1}")
    info = slurm.wait_job(job2)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), user.output(job2)
    after = _checkpoints(out)
    # continued from the checkpoint: it was read, not rewritten by a fresh run, and one more step was taken
    assert [d.name for d in after] == [last.name, f"step_{reached + 1:08d}"], after
    assert after[0].stat().st_ino == inode, "the last checkpoint was rewritten: the job did not resume from it"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{reached + 1:08d}"


def test_a_failing_learner_fails_the_job_with_its_status_and_log(slurm, user, tmp_path):
    out = tmp_path / "run"
    job = user.submit(out, "--resume", str(tmp_path / "no-such-checkpoint"), "train.steps=2")
    info = slurm.wait_job(job)
    text = user.output(job)
    m = re.search(r"learner exited with status (\d+)", text)
    assert m and m.group(1) != "0", text
    assert (info.get("JobState"), info.get("ExitCode")) == ("FAILED", f"{m.group(1)}:0"), (info, text)
    log = tmp_path / "logs" / job / f"learner-{slurm.host}.log"
    assert f"learner log ({slurm.host}): {log}" in text
    # and the cause, from that log
    assert re.search(rf"\[{slurm.host}\] error: .*no-such-checkpoint: not a complete checkpoint", text), text


def _scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_a_cpu_job_with_a_colocated_sglang_server(slurm, user, tmp_path):
    """rollout.backend=sglang on a one-node CPU cluster: the job starts one patched SGLang CPU server
    on its node (next to the learner's ranks), health-checks it, trains against it (rollout from the
    server, weights pushed to it after every step), and stops it at the end."""
    pytest.importorskip("sglang", reason="sglang is not installed")
    steps, port = 2, _free_port()
    user.env.update(SMD_SERVER_PORT=str(port), SMD_HEALTH_INTERVAL="1", SMD_HEALTH_TIMEOUT="120")
    out = tmp_path / "run"
    t0 = time.monotonic()
    job = user.submit(out, "rollout.backend=sglang", f"train.steps={steps}", "train.save_every=0",
                      "logging.mask_images=0")
    info = slurm.wait_job(job, timeout=JOB_TIMEOUT + 60)
    took = time.monotonic() - t0
    text = user.output(job)
    server_log = tmp_path / "logs" / job / f"sglang-{slurm.host}-{port}.log"
    server_text = server_log.read_text(errors="replace") if server_log.is_file() else f"(no {server_log})"
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), text + server_text[-3000:]
    assert f"sglang http://127.0.0.1:{port} is healthy" in text, text
    assert "learner exited with status 0" in text
    assert "smd eviction active" in server_text
    assert _wait(lambda: not slurm.job_processes(job), timeout=10, interval=0.2), slurm.job_processes(job)
    with socket.socket() as s:  # the job stopped its server
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the SGLang server is still listening after the job"
    assert port not in listening_ports()
    gap = _scalars(out / "tensorboard")["mismatch/max_abs_logprob_diff"]
    assert sorted(gap) == list(range(1, steps + 1)), gap
    print(f"\nsglang on CPU: job {job} COMPLETED in {took:.1f} s (submit to end); per-step replay gap: "
          + ", ".join(f"step {s}: {gap[s]:.2e}" for s in sorted(gap)))
    assert max(gap.values()) <= 1e-5, gap
