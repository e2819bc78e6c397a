"""Rollout-server faults survived: detect, wait for healthy servers, re-sync, retry.

With ``rollout.backend: sglang`` the trainer samples from remote servers and pushes its weights to
them after every step. A server can die (OOM, a bad node), hang, or be restarted by the launchers'
supervisor (:mod:`sglang_patch.supervise`), after which it holds the *initial* weights.
:class:`ServerFaults` turns each of these into a retry:

- **rollout**: a failed generate request (unreachable, reset, timed out, HTTP 5xx, a mask that
  keeps failing validation) fails the step's whole rollout: every trajectory of that attempt is
  discarded, never half-used. The trainer then waits for healthy servers, re-sends the learner's
  current weights in full, checks them with the probe trajectory, and samples the step again from
  the same prompts.
- **weight sync**: a failed sync, or a probe whose log-probs differ from the learner's by more
  than ``rollout.faults.probe_atol``, is retried the same way.
- **several servers**: those that answer ``/health`` carry on; a server that does not come back is
  left out, and re-admitted (with a full sync) before a later sync once it answers again.
- **bounded**: ``rollout.faults.max_attempts`` tries per rollout and per sync, then the run stops
  with the URL, the reason and the last checkpoint (``--resume auto`` continues from there).

All of it is collective: rank 0 talks to the servers and broadcasts what happened, every rank
takes the same branch (the weight sync is a collective of the whole learner).

Fault drills: ``SMD_FAULT_DRILL="rollout@3,sync@5,rollout@7:stop"`` with
``SMD_FAULT_DRILL_PID_FILE=FILE`` makes rank 0 SIGKILL the process group whose PID is in FILE (the
supervisor's ``--pid-file``) while step 3's rollout requests are in flight and during the weight
sync after step 5, and SIGSTOP it (a hang) during step 7's rollout: a rehearsal of the failure
handling on a real deployment. Each drill fires once. The drills live in :mod:`.drills` (the
weight-sync transports fire them without importing this module).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable

from ..errors import SMDError
from .drills import DRILL_ENV, DRILL_PID_ENV, drill_point, say, set_drill_step  # noqa: F401  (importable here too)


class ServerFault(SMDError):
    """A rollout server failed a request, a sync or the probe; ``url`` names it when known."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url


# ---------------------------------------------------------------------------------------- health
def healthy(url: str, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def wait_for_healthy(urls: list[str], wait_s: float, *, poll_s: float = 1.0) -> list[str]:
    """Poll every URL until at least one answers ``/health`` (then return those that do, in
    ``urls`` order) or ``wait_s`` passes (then return [])."""
    deadline = time.monotonic() + wait_s
    while True:
        up = [u for u in urls if healthy(u, timeout_s=min(5.0, max(0.5, wait_s)))]
        if up or time.monotonic() >= deadline:
            return up
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------- the policy
class ServerFaults:
    """Retry policy of one training run (see the module docstring).

    Args:
        cfg: ``rollout.faults``.
        urls: every server URL of the run.
        rank0: whether this process talks to the servers.
        bcast: broadcast of a picklable object from rank 0 (identity on one rank).
        retarget: ``retarget(urls)``, collective: point the weight sync (every rank) and the client
            (rank 0) at ``urls``.
        last_checkpoint: the path named in a final error.
    """

    def __init__(self, cfg, urls: list[str], *, rank0: bool, bcast: Callable, retarget: Callable,
                 last_checkpoint: Callable[[], str | None]):
        self.cfg, self.rank0, self.bcast, self._retarget = cfg, rank0, bcast, retarget
        self.all_urls = list(urls)
        self.active = list(urls)
        self.last_checkpoint = last_checkpoint
        self.counts: Counter = Counter()

    def metrics(self) -> dict[str, float]:
        return {"faults/rollout_failures": float(self.counts["rollout"]),
                "faults/sync_failures": float(self.counts["sync"]),
                "faults/invalid_masks": float(self.counts["invalid_masks"]),
                "faults/active_servers": float(len(self.active))}

    def _stop(self, what: str, last: BaseException | str) -> SMDError:
        url = getattr(last, "url", None)
        return SMDError(f"{what}{' (' + url + ')' if url else ''}: {last}. Servers: {', '.join(self.all_urls)}. "
                        f"Last checkpoint: {self.last_checkpoint() or 'none yet'}; once the servers answer /health "
                        f"again, continue with --resume auto")

    # ------------------------------------------------------------------------------ collective
    def rollout(self, step: int, sample: Callable, resync: Callable[[], dict]):
        """``sample()`` on rank 0 (raises :class:`ServerFault` on a server failure); returns its
        result on every rank. After a failure: wait, ``resync()`` (full weights + probe), retry."""
        last: BaseException | str = ""
        for attempt in range(1, self.cfg.max_attempts + 1):
            res = None
            if self.rank0:
                try:
                    res = ("ok", sample())
                except ServerFault as e:
                    res = ("fault", (str(e), e.url))
            kind, val = self.bcast(res)
            if kind == "ok":
                return val
            msg, url = val
            last = ServerFault(msg, url)
            self.counts["rollout"] += 1
            if self.rank0:
                say(f"step {step}: rollout attempt {attempt}/{self.cfg.max_attempts} failed, its samples are "
                    f"discarded: {msg}")
            if attempt == self.cfg.max_attempts:
                break
            try:
                self.recover(reason=msg)
                resync()
            except ServerFault as e:  # no server came back
                raise self._stop(f"step {step}: no rollout server to retry on after a failed rollout", e) from None
        raise self._stop(f"step {step}: the rollout failed {self.cfg.max_attempts} time(s) "
                         f"(rollout.faults.max_attempts)", last)

    def sync(self, version: int, do_sync: Callable[[], dict], *,
             sync_errors: tuple[type[BaseException], ...] = ()) -> dict:
        """``do_sync()`` (collective; raises the same :class:`ServerFault`, or one of ``sync_errors``
        (the weight sync's ``WeightSyncError``), on every rank) with retries; servers that came back
        are re-admitted first."""
        self.readmit()
        last: BaseException | str = ""
        for attempt in range(1, self.cfg.max_attempts + 1):
            if attempt > 1:
                try:
                    self.recover(reason=str(last))
                except ServerFault as e:
                    raise self._stop(f"weight sync v{version}: no rollout server to retry on", e) from None
            try:
                out = do_sync()
                out.update(self.metrics())
                return out
            except (ServerFault, *sync_errors) as e:
                last = e
                self.counts["sync"] += 1
                if self.rank0:
                    say(f"weight sync v{version}: attempt {attempt}/{self.cfg.max_attempts} failed: {e}")
        raise self._stop(f"weight sync v{version} failed {self.cfg.max_attempts} time(s) "
                         f"(rollout.faults.max_attempts)", last)

    def recover(self, *, reason: str) -> None:
        """Wait until a server answers ``/health`` and point everything at those that do."""
        urls = None
        if self.rank0:
            say(f"waiting up to {self.cfg.wait_healthy_s:.0f} s for healthy rollout servers "
                f"(rollout.faults.wait_healthy_s)")
            t0 = time.monotonic()
            urls = wait_for_healthy(self.all_urls, self.cfg.wait_healthy_s)
            if urls:
                gone = [u for u in self.all_urls if u not in urls]
                say(f"{len(urls)} server(s) healthy after {time.monotonic() - t0:.1f} s: {', '.join(urls)}"
                    + (f"; left out until they answer again: {', '.join(gone)}" if gone else "")
                    + "; re-sending the learner's weights in full")
        urls = self.bcast(urls)
        if not urls:
            raise ServerFault(f"no rollout server answered /health within {self.cfg.wait_healthy_s:.0f} s "
                              f"(rollout.faults.wait_healthy_s) after: {reason}",
                              self.all_urls[0] if len(self.all_urls) == 1 else None)
        self._retarget(urls)
        self.active = list(urls)

    def readmit(self) -> None:
        """Before a sync: servers left out that answer ``/health`` again join (collective)."""
        if len(self.active) == len(self.all_urls):
            return
        back = None
        if self.rank0:
            back = [u for u in self.all_urls if u not in self.active and healthy(u, timeout_s=2.0)]
            if back:
                say(f"re-admitting rollout server(s) {', '.join(back)}: they get the full weights now")
        back = self.bcast(back)
        if back:
            urls = [u for u in self.all_urls if u in self.active or u in back]
            self._retarget(urls)
            self.active = urls
