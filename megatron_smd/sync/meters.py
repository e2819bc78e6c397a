"""What a sync measures about itself: seconds per phase (:class:`PhaseTimer`) and the bytes the
resharder holds beyond the learner's parameters (:class:`LiveBytes`)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Wall-clock seconds per phase of a sync (``with timer("convert"): ...``), summed over calls
    (from any thread: phases run on the resharder's helper thread overlap the others)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] += seconds

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seconds)


class LiveBytes:
    """Bytes of the tensors the sync holds that are not learner parameters, and their peak.

    Tensors are counted per storage (views and aliases of one allocation count once; a tensor that
    *is* a learner parameter counts zero), with a reference count so that a storage is released
    when its last holder releases it.
    """

    def __init__(self, exclude: list[torch.Tensor] = ()):  # type: ignore[assignment]
        self._excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self._live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, refs]
        self.current = 0
        self.peak = 0

    def hold(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr in self._excluded or s.nbytes() == 0:
                continue
            if ptr in self._live:
                self._live[ptr][1] += 1
            else:
                self._live[ptr] = [s.nbytes(), 1]
                self.current += s.nbytes()
                self.peak = max(self.peak, self.current)

    def release(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            entry = self._live.get(ptr)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self._live[ptr]
