"""Keep one rollout server running: restart it when it exits, kill and restart it when it hangs.

The launchers run every SGLang server they start under this supervisor::

    python -m sglang_patch.supervise --server-log LOG --pid-file PID [options] -- \\
        python -m sglang_patch.launch_server --model-path M --device cpu --port 30000 ...

- A server that **exits** (OOM kill, a kernel fault, a crash) is started again with the same
  command after a back-off (``--backoff-s``, doubled per consecutive failure, at most 60 s).
- A server that stops answering ``GET /health`` for ``--hang-timeout-s`` after it was healthy
  (a hung scheduler, a stopped process) is killed with SIGKILL, by the process group it was started
  in (the supervisor's own child, identified by its PID), and started again.
- Restarts are bounded: more than ``--max-restarts`` within ``--restart-window-s`` and the
  supervisor gives up, stops, and exits 1; the trainer then names the dead URL when its own retries
  run out.

Each failure is logged on stdout with the reason, the exit status and the server's log path. A
restarted server loads ``--model-path`` again, so it holds the *initial* weights: the trainer
notices the failed request or sync, waits for ``/health``, re-sends its current weights in full and
checks them with a probe before it samples again (:mod:`megatron_smd.rollout.faults`).

SIGTERM or SIGINT to the supervisor stops the server (SIGTERM, then SIGKILL of its group after
30 s) and exits 0. The server also gets SIGTERM if the supervisor itself dies (Linux
``PR_SET_PDEATHSIG``), so no server outlives its supervisor.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path

MAX_BACKOFF_S = 60.0


def log(msg: str) -> None:
    print(f"[supervise {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def health_url_of(cmd: Sequence[str]) -> str:
    """``http://HOST:PORT/health`` from a launch command's ``--host``/``--port`` (SGLang's defaults
    127.0.0.1:30000; a wildcard host is probed on loopback)."""
    host, port = "127.0.0.1", "30000"
    for i, a in enumerate(cmd[:-1]):
        if a == "--host":
            host = cmd[i + 1]
        elif a == "--port":
            port = cmd[i + 1]
    for a in cmd:
        if a.startswith("--host="):
            host = a.split("=", 1)[1]
        elif a.startswith("--port="):
            port = a.split("=", 1)[1]
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}/health"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class Supervisor:
    """Run ``cmd`` until stopped, restarting it on exit or hang (see the module docstring)."""

    def __init__(self, cmd: Sequence[str], *, health_url: str | None = None, server_log: str | None = None,
                 pid_file: str | None = None, max_restarts: int = 5, restart_window_s: float = 3600.0,
                 hang_timeout_s: float = 120.0, health_interval_s: float = 5.0, probe_timeout_s: float = 10.0,
                 startup_timeout_s: float = 900.0, backoff_s: float = 2.0, stop_grace_s: float = 30.0):
        if not cmd:
            raise ValueError("supervise: no server command given (put it after --)")
        self.cmd = list(cmd)
        self.health_url = health_url or health_url_of(self.cmd)
        self.server_log = Path(server_log) if server_log else None
        self.pid_file = Path(pid_file) if pid_file else None
        self.max_restarts, self.restart_window_s = int(max_restarts), float(restart_window_s)
        self.hang_timeout_s, self.health_interval_s = float(hang_timeout_s), float(health_interval_s)
        self.probe_timeout_s = min(float(probe_timeout_s), self.hang_timeout_s)
        self.startup_timeout_s, self.backoff_s, self.stop_grace_s = float(startup_timeout_s), backoff_s, stop_grace_s
        self.proc: subprocess.Popen | None = None
        self.restarts: deque[float] = deque()
        self.starts = 0
        self._stopping = False

    # ----------------------------------------------------------------------------------- process
    def _log_where(self) -> str:
        return str(self.server_log) if self.server_log else "the supervisor's output"

    def _start(self) -> None:
        self.starts += 1
        out = None
        if self.server_log:
            self.server_log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.server_log, "ab")
            out.write(f"\n===== [supervise] start {self.starts}: {' '.join(self.cmd)}\n".encode())
            out.flush()
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                         preexec_fn=_die_with_parent)
        finally:
            if out is not None:
                out.close()
        if self.pid_file:
            tmp = self.pid_file.with_name(self.pid_file.name + ".tmp")
            tmp.write_text(f"{self.proc.pid}\n")
            os.replace(tmp, self.pid_file)
        log(f"start {self.starts}: server PID {self.proc.pid}, health {self.health_url}, log {self._log_where()}")

    def _kill_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group the child created (setsid): the server and its children
        except (ProcessLookupError, PermissionError):
            pass

    def stop_server(self) -> None:
        """SIGTERM the server (SGLang drains and stops its children), SIGKILL the group after the grace."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def healthy(self, timeout_s: float | None = None) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=timeout_s or self.probe_timeout_s) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError, ValueError):
            return False

    # -------------------------------------------------------------------------------------- loop
    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    def _run_once(self) -> str | None:
        """Start the server and watch it; return why it had to be restarted (None: asked to stop).

        Once healthy, a server is declared hung when no ``/health`` answered for
        ``hang_timeout_s``: probes and waits are cut to that deadline, so a hang is acted on within
        the timeout of the last good answer, not a probe timeout and an interval later."""
        self._start()
        t0 = time.monotonic()
        up = False
        last_ok = t0
        while not self._stopping:
            rc = self.proc.poll()
            if rc is not None:
                self._kill_group(signal.SIGKILL)  # children the dead leader left behind
                return f"exited with status {rc}" + ("" if up else " during start-up")
            left = last_ok + self.hang_timeout_s - time.monotonic() if up else self.probe_timeout_s
            ok = self.healthy(timeout_s=max(0.2, min(self.probe_timeout_s, left)))
            now = time.monotonic()
            if ok:
                if not up:
                    log(f"server PID {self.proc.pid} healthy after {now - t0:.1f} s")
                up, last_ok = True, now
                self._sleep(self.health_interval_s)
            elif not up and now - t0 > self.startup_timeout_s:
                self._kill_group(signal.SIGKILL)
                self.proc.wait(30)
                return f"not healthy within {self.startup_timeout_s:.0f} s of its start; killed (SIGKILL)"
            elif up and now - last_ok >= self.hang_timeout_s:
                self._kill_group(signal.SIGKILL)
                self.proc.wait(30)
                return (f"hung: no /health answer for {now - last_ok:.1f} s (limit {self.hang_timeout_s:.0f} s); "
                        f"killed (SIGKILL)")
            else:
                self._sleep(min(self.health_interval_s, max(0.1, last_ok + self.hang_timeout_s - now)) if up else 0.5)
        return None

    def run(self) -> int:
        def _stop(signum, frame):
            self._stopping = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        failures = 0
        try:
            while not self._stopping:
                t_start = time.monotonic()
                why = self._run_once()
                if why is None:
                    break
                now = time.monotonic()
                failures = failures + 1 if now - t_start < max(self.hang_timeout_s, 60.0) else 1
                self.restarts.append(now)
                while self.restarts and now - self.restarts[0] > self.restart_window_s:
                    self.restarts.popleft()
                log(f"server PID {self.proc.pid} {why}; log: {self._log_where()}")
                if len(self.restarts) > self.max_restarts:
                    log(f"giving up: {len(self.restarts)} failures within {self.restart_window_s:.0f} s "
                        f"(--max-restarts {self.max_restarts}); {self.health_url} stays down")
                    return 1
                wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1))
                log(f"restart {len(self.restarts)}/{self.max_restarts} in {wait:.1f} s")
                self._sleep(wait)
        finally:
            self.stop_server()
            if self.pid_file:
                self.pid_file.unlink(missing_ok=True)
        log("stopped")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m sglang_patch.supervise [options] -- SERVER COMMAND ...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m sglang_patch.supervise",
                                description="Restart a rollout server when it exits or hangs.")
    p.add_argument("--health-url", help="default: http://HOST:PORT/health from the command's --host/--port")
    p.add_argument("--server-log", help="append the server's output here (default: this process's output)")
    p.add_argument("--pid-file", help="keep the running server's PID here")
    p.add_argument("--max-restarts", type=int, default=5, help="restarts allowed within --restart-window-s")
    p.add_argument("--restart-window-s", type=float, default=3600.0)
    p.add_argument("--hang-timeout-s", type=float, default=120.0,
                   help="a healthy server that answers no /health for this long is killed and restarted")
    p.add_argument("--health-interval-s", type=float, default=5.0)
    p.add_argument("--probe-timeout-s", type=float, default=10.0, help="timeout of one /health request")
    p.add_argument("--startup-timeout-s", type=float, default=900.0)
    p.add_argument("--backoff-s", type=float, default=2.0, help="first restart delay; doubles per failure")
    a = p.parse_args(argv[:cut])
    for k in ("max_restarts", "restart_window_s", "hang_timeout_s", "health_interval_s", "probe_timeout_s",
              "startup_timeout_s"):
        if getattr(a, k) <= 0 and not (k == "max_restarts" and a.max_restarts == 0):
            p.error(f"--{k.replace('_', '-')} must be > 0")
    try:
        sup = Supervisor(argv[cut + 1:], health_url=a.health_url, server_log=a.server_log, pid_file=a.pid_file,
                         max_restarts=a.max_restarts, restart_window_s=a.restart_window_s,
                         hang_timeout_s=a.hang_timeout_s, health_interval_s=a.health_interval_s,
                         probe_timeout_s=a.probe_timeout_s, startup_timeout_s=a.startup_timeout_s,
                         backoff_s=a.backoff_s)
    except ValueError as e:
        p.error(str(e))
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
