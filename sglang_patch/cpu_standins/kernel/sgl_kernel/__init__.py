"""Stand-in for SGLang's CPU kernel library on a machine without it (see ``sglang_patch/cpu_standins``).

Implements, in torch, only what SGLang 0.5.23's CPU path calls for a dense model with page size 1.
Any other name imports (SGLang imports dozens of kernels at module level on every path) and raises
``NotImplementedError`` naming itself when called.
"""

from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+smd-cpu-standin"
SMD_CPU_STANDIN = True

_IMPLEMENTED = ("assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu")


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """``req_to_token[row_b, start_b:end_b] = out_cache_loc[o_b : o_b + end_b - start_b]``.

    ``out_cache_loc`` holds the new slots of every request of the batch back to back, in batch
    order (``o_b`` = sum of the earlier requests' lengths), as SGLang's Triton kernel reads it.
    """
    rows = req_pool_indices.tolist()
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    o = 0
    for row, a, e in zip(rows, starts, ends):
        n = e - a
        if n <= 0:
            continue
        if e > pool_len:
            raise IndexError(f"assign_req_to_token_pool_cpu: end {e} > req_to_token width {pool_len}")
        req_to_token[row, a:e] = out_cache_loc[o:o + n].to(req_to_token.dtype)
        o += n


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor,
                                src_loc: torch.Tensor) -> None:
    """Move KV rows ``src_loc -> tgt_loc`` in every buffer of a pool (host memory).

    ``data_ptrs`` int64 ``[B]``: the base address of each K/V buffer (one per layer and K/V);
    ``strides`` int64 ``[B]``: each buffer's row size in bytes (one slot). Every source row is read
    before any target row is written, so overlapping location sets move like a gather-then-scatter.
    """
    ptrs, sizes = data_ptrs.tolist(), strides.tolist()
    tgt, src = tgt_loc.tolist(), src_loc.tolist()
    if len(tgt) != len(src):
        raise ValueError(f"copy_all_layer_kv_cache_cpu: {len(tgt)} targets for {len(src)} sources")
    for base, row in zip(ptrs, sizes):
        rows = [ctypes.string_at(base + s * row, row) for s in src]
        for t, data in zip(tgt, rows):
            ctypes.memmove(base + t * row, data, row)


class _NotOnCPU:
    """What any other ``sgl_kernel`` name resolves to: importable (SGLang imports many kernels at
    module level on every path), raising a clear error the moment the kernel is used."""

    def __init__(self, name: str):
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{self.__name__} is not available: this is megatron-smd's CPU stand-in for "
            f"SGLang's kernel library (sglang_patch/cpu_standins/kernel/sgl_kernel), which implements "
            f"only {', '.join(_IMPLEMENTED)}; the code path that needs it is not supported on CPU")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _NotOnCPU(f"{self.__name__}.{attr}")

    def __repr__(self) -> str:
        return f"<sgl_kernel CPU stand-in: {self.__name__} (not implemented)>"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _NotOnCPU(name)
