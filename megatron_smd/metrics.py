"""One metrics logger: ``log(dict, step)``, plus images, histograms and text; ``close()``.

Keys look like ``group/name`` (``reward/train``, ``mismatch/max_abs_logprob_diff``,
``kv/peak_bytes``). Only one rank writes (the caller passes ``enabled = is_writer``); every other
rank gets the :class:`NullLogger`, so call sites never branch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


class NullLogger:
    """Accepts everything, writes nothing."""

    def log(self, scalars: dict, step: int) -> None:
        pass

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        pass

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Writes TensorBoard event files under ``log_dir``. Non-finite scalars are written as-is (so a
    NaN is visible on the plot) but never crash the logger."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._w = SummaryWriter(str(self.log_dir))

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, (int, float)):
                self._w.add_scalar(k, float(v), step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        v = values.detach().float().flatten()
        v = v[torch.isfinite(v)]
        if v.numel():
            self._w.add_histogram(tag, v, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        """img ``[H, W]`` in [0, 1] (grayscale) or ``[3, H, W]``."""
        if img.dim() == 2:
            img = img.unsqueeze(0)
        self._w.add_image(tag, img.float().clamp(0, 1), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._w.add_text(tag, text, step)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def make_logger(kind: str, log_dir: str | Path, enabled: bool = True) -> NullLogger:
    if not enabled or kind == "none":
        return NullLogger()
    if kind == "tensorboard":
        return TensorBoardLogger(log_dir)
    raise ValueError(f"unknown logger {kind!r} (tensorboard | none)")


def mask_image(evict: torch.Tensor, max_side: int = 256) -> torch.Tensor:
    """Render one layer's shadow mask ``[T]`` as a ``[T', T']`` image (1 = visible), downsampled by
    block-averaging so long sequences stay small. Rows are queries, columns keys."""
    from .mask import layer_dense

    T = evict.shape[-1]
    dense = layer_dense(evict.view(-1)[:T] if evict.dim() == 1 else evict).float()
    f = max(1, math.ceil(T / max_side))
    if f > 1:
        pad = f * math.ceil(T / f) - T
        dense = torch.nn.functional.pad(dense, (0, pad, 0, pad))
        dense = torch.nn.functional.avg_pool2d(dense[None, None], f)[0, 0]
    return dense
