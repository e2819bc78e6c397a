"""Fault drills: ``SMD_FAULT_DRILL`` fires a SIGKILL or SIGSTOP at a named phase of a named step.

``SMD_FAULT_DRILL="rollout@3,sync@5,rollout@7:stop"`` with ``SMD_FAULT_DRILL_PID_FILE=FILE`` makes
rank 0 SIGKILL the process group whose PID is in FILE (the supervisor's ``--pid-file``) while step
3's rollout requests are in flight and during the weight sync after step 5, and SIGSTOP it (a hang)
during step 7's rollout. Each drill fires once. The retries these rehearse are
:mod:`megatron_smd.rollout.faults`; the points that fire are in the rollout client and the weight-sync
transport. Standard library only, so any layer can call :func:`drill_point`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from ..errors import SMDError

DRILL_ENV = "SMD_FAULT_DRILL"
DRILL_PID_ENV = "SMD_FAULT_DRILL_PID_FILE"
_drill_step = 0
_drills_fired: set[str] = set()


def say(msg: str) -> None:
    print(f"[smd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # the supervisor's clock format


def start_drills() -> None:
    """A new training run in this process: step 0 (the syncs and probes before step 1) and no drill
    fired yet, whatever an earlier run in the same process left behind."""
    global _drill_step
    _drill_step = 0
    _drills_fired.clear()


def set_drill_step(step: int) -> None:
    """The 1-based training step now running (drills name steps)."""
    global _drill_step
    _drill_step = int(step)


def _drills() -> dict[str, str]:
    """``SMD_FAULT_DRILL`` parsed: ``{"rollout@3": "kill", "sync@5": "stop", ...}``."""
    out = {}
    for item in (os.environ.get(DRILL_ENV) or "").split(","):
        if not item.strip():
            continue
        point, _, action = item.strip().partition(":")
        if action not in ("", "kill", "stop") or "@" not in point:
            raise SMDError(f"{DRILL_ENV}: {item!r} is not PHASE@STEP[:kill|stop] (PHASE: rollout or sync)")
        out[point] = action or "kill"
    return out


def drill_point(phase: str) -> None:
    """Fire the drill ``phase@<current step>`` if ``SMD_FAULT_DRILL`` lists it (once): ``kill``
    (default) sends SIGKILL, ``stop`` SIGSTOP (a hang), to the process group of the PID in
    ``SMD_FAULT_DRILL_PID_FILE`` (the PID alone if it leads no group)."""
    if not os.environ.get(DRILL_ENV):
        return
    key = f"{phase}@{_drill_step}"
    action = _drills().get(key)
    if action is None or key in _drills_fired:
        return
    _drills_fired.add(key)
    pid_file = os.environ.get(DRILL_PID_ENV)
    if not pid_file:
        raise SMDError(f"{DRILL_ENV} needs {DRILL_PID_ENV} (a file with the PID to {action})")
    try:
        pid = int(Path(pid_file).read_text().split()[0])
    except (OSError, ValueError, IndexError) as e:
        raise SMDError(f"{DRILL_PID_ENV}={pid_file}: no PID to {action} ({e})") from None
    sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
    group = False
    try:
        group = os.getpgid(pid) == pid
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass
    say(f"fault drill {key}: {sig.name} to {'process group' if group else 'PID'} {pid}")
