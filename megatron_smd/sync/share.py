"""Two threads on one tensor's pieces without waiting for each other: :class:`Helper`.

The resharder writes and checks a large CPU tensor in cache-sized pieces. Handing half of them to a
helper thread and joining it makes the sender wait for that thread to be scheduled, once per
tensor: on a busy machine (more runnable threads than cores) a wake-up can take a time slice, and
a sync has hundreds of tensors. Here the pieces are *shared*: both threads take the next piece in
turn from one counter, so the sender's thread never waits for a helper that has not started (it
simply takes every piece itself); it waits only for the pieces the helper has taken and not yet
finished (at most one). With a free second core the helper takes about half of them, as a plain
two-thread copy does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class _Task:
    """``fn(i)`` for ``i in range(n)``, each index taken once by whichever thread asks first."""

    __slots__ = ("n", "fn", "next", "busy", "ok", "error", "cv")

    def __init__(self, n: int, fn: Callable[[int], bool]):
        self.n, self.fn = n, fn
        self.next = self.busy = 0
        self.ok = True
        self.error: BaseException | None = None
        self.cv = threading.Condition(threading.Lock())

    def work(self) -> None:
        fn, cv = self.fn, self.cv
        while True:
            with cv:
                if self.next >= self.n or self.error is not None:
                    return
                i = self.next
                self.next += 1
                self.busy += 1
            try:
                ok = fn(i)
            except BaseException as e:  # raised by the sender's thread in wait()
                ok = True
                with cv:
                    self.error = self.error or e
            with cv:
                self.ok = self.ok and bool(ok)
                self.busy -= 1
                if not self.busy:
                    cv.notify_all()

    def wait(self) -> bool:
        with self.cv:
            while self.busy:
                self.cv.wait()
        if self.error is not None:
            raise self.error
        return self.ok


class Helper:
    """One helper thread that shares pieces with the calling thread (see the module docstring)."""

    def __init__(self, name: str = "smd-sync-helper"):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (task := self._q.get()) is not None:
            task.work()

    def run(self, n: int, fn: Callable[[int], bool]) -> bool:
        """Call ``fn(i)`` for every ``i < n``, on this thread and the helper; returns whether every
        call returned true. An exception of any call is raised here, after the others finished."""
        task = _Task(n, fn)
        self._q.put(task)
        task.work()
        return task.wait()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
