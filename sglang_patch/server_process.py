"""A patched SGLang server as a child process: start, wait until healthy, read its pool, stop by PID.

Used by the tests, the benchmarks and ``smd rollout``-style tooling that needs a server of its own::

    with PatchedServer(model_dir, ["--smd-policy", "h2o", "--smd-budget", "16"], device="cpu") as srv:
        SGLangClient([srv.url], num_layers=4).generate(...)

The server listens on 127.0.0.1 only (a free port unless given), runs in its own session so that
:meth:`PatchedServer.stop` can stop exactly the process group this object started (SGLang's
scheduler and detokenizer are its children), identified by the child's PID, never by a name
pattern. Every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from megatron_smd.errors import SMDError
from megatron_smd.rollout.faults import healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, payload: dict | None = None, *, timeout_s: float = 30.0, method: str | None = None):
    """GET (or POST ``payload``) ``url`` and decode its JSON answer. Raises ``OSError`` subclasses."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read() or b"null")


class PatchedServer:
    """One ``python -m sglang_patch.launch_server`` (or, with ``patched=False``, plain
    ``sglang.launch_server`` with the same CPU settings) on 127.0.0.1.

    Args:
        model_dir: the Hugging Face model directory.
        args: extra launcher arguments (``--smd-policy ...``; SGLang flags).
        device: ``"cpu"`` adds ``--device cpu`` (the launcher then supplies the CPU settings).
        log_path: where the server's stdout/stderr go (default: a file next to nothing, discarded).
        start_timeout_s: how long :meth:`start` waits for ``/health``.
    """

    def __init__(self, model_dir: str | os.PathLike, args: Sequence[str] = (), *, device: str | None = "cpu",
                 port: int | None = None, patched: bool = True, log_path: str | os.PathLike | None = None,
                 start_timeout_s: float = 300.0, env: dict | None = None):
        self.model_dir, self.args, self.device, self.patched = str(model_dir), list(args), device, patched
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else None
        self.start_timeout_s = start_timeout_s
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "sglang_patch.launch_server" if self.patched else "sglang.launch_server",
               "--model-path", self.model_dir, "--host", "127.0.0.1", "--port", str(self.port)]
        if self.device:
            cmd += ["--device", self.device]
        cmd += self.args
        if not self.patched and self.device == "cpu":
            from .launch_server import cpu_defaults

            cmd += cpu_defaults(cmd[3:])
        return cmd

    def start(self, *, wait: bool = True) -> "PatchedServer":
        env = dict(os.environ if self.env is None else self.env)
        if not self.patched and self.device == "cpu":
            from .cpu_standins import prepare_cpu_environment

            prepare_cpu_environment(env)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._log_offset = self.log_path.stat().st_size if self.log_path and self.log_path.is_file() else 0
        self._t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        if wait:
            self.wait_healthy()
        return self

    #: what SGLang's HTTP server logs when its port was taken between :func:`free_port` and its bind
    BIND_FAILED = b"error while attempting to bind on address"

    def _bind_failed(self) -> bool:
        if not self.log_path or not self.log_path.is_file():
            return False
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return self.BIND_FAILED in f.read()

    def wait_healthy(self, timeout_s: float | None = None, *, port_retries: int = 3) -> None:
        """Block until ``/health`` answers 200; raise with the log's tail if the process dies or time runs out.

        A free port can be taken by another process before the server binds it (SGLang starts its HTTP
        server a minute after the port was chosen): the server is then restarted on a new port, at most
        ``port_retries`` times (seen in the log, so only with ``log_path``)."""
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        t0 = self._t0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SMDError(f"SGLang server exited with status {self.proc.returncode} before it was healthy "
                               f"({' '.join(self.command())}){self._log_tail()}")
            if self.healthy():
                self.startup_s = time.monotonic() - t0
                return
            if port_retries > 0 and self._bind_failed():
                self.stop()
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                port_retries -= 1
                self.start(wait=False)
            time.sleep(0.5)
        self.stop()
        raise SMDError(f"SGLang server at {self.url} was not healthy within {timeout_s or self.start_timeout_s:.0f} s"
                       f"{self._log_tail()}")

    def healthy(self, timeout_s: float = 2.0) -> bool:
        return healthy(self.url, timeout_s)

    def pool_state(self) -> dict:
        """The patch's pool counters (``/server_info`` → ``internal_states[0]["smd"]``)."""
        info = http_json(self.url + "/server_info", timeout_s=30)
        states = info.get("internal_states") or [{}]
        if "smd" not in states[0]:
            raise SMDError(f"{self.url}/server_info has no 'smd' state: is this a patched server?")
        return states[0]["smd"]

    def _log_tail(self, n: int = 25) -> str:
        if not self.log_path or not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(lines)

    def terminate(self) -> None:
        """SIGTERM the server process this object started (by its PID); do not wait. SGLang's own
        handler then drains and stops its scheduler and detokenizer children; :meth:`stop` SIGKILLs
        whatever of the process group is left."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the server (by the child's PID), SIGKILL its process group after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # children that outlived the leader (same group): never leave them behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode

    def __enter__(self) -> "PatchedServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_all(servers) -> None:
    """Start several servers at once: every process first, then wait for each to be healthy (a
    start-up takes about a minute on CPU; one after the other that time adds up). A server that
    does not come up raises (:meth:`PatchedServer.wait_healthy`); the caller stops them all."""
    servers = list(servers)
    for s in servers:
        s.start(wait=False)
    for s in servers:
        s.wait_healthy()


def stop_all(servers, timeout_s: float = 30.0) -> None:
    """Stop several servers at once: SIGTERM to every one first, then wait for each (SGLang's
    shutdown takes seconds; one after the other that time adds up)."""
    servers = list(servers)
    for s in servers:
        s.terminate()
    for s in servers:
        s.stop(timeout_s)
