"""The parallel layout of the learner: TP x PP x CP x DP, validated, and the one place groups are built.

``ParallelLayout`` owns the degrees (``dp`` is derived from the world size), checks them against the
model and the sequence length with errors that name the numbers, and :meth:`~ParallelLayout.initialize`
sets up ``torch.distributed`` (gloo on CPU, nccl on GPU) and Megatron's
``parallel_state.initialize_model_parallel``. Nothing else in the project reads ``WORLD_SIZE`` /
``RANK`` / ``LOCAL_RANK`` or builds process groups: code that needs a rank or a group asks the
layout, and code that must know about the launcher before a layout exists uses this module's
helpers (:func:`env_rank`, :func:`launched_by_torchrun`, :func:`clean_launcher_env`,
:func:`one_process_env`; ``tests/test_structure.py`` checks this).

Megatron's rank order is ``tp-cp-ep-dp-pp`` (TP fastest): with ``world=4, tp=2, pp=2`` ranks 0,1
are stage 0 and ranks 2,3 are stage 1.

Usage (inside each process, e.g. under ``torchrun``)::

    layout = ParallelLayout.from_env(tp=2, pp=1)
    layout.validate(arch, seq_len=4096)
    layout.initialize(seed=1234)
    ...
    layout.destroy()
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import ConfigError
from ..model.hf import ModelArch
from . import cpu_shim


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS has free on ``host`` now (``""``: every interface), for a rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- the launcher's environment
#: What ``torchrun`` tells each process about its place in the job.
LAUNCHER_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def env_rank() -> int:
    """This process's global rank as the launcher set it (``RANK``; 0 when not launched by
    ``torchrun``). For decisions taken before the layout is initialized (who creates a shared
    directory); afterwards use :attr:`ParallelLayout.rank`."""
    return int(os.environ.get("RANK", "0"))


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a launcher's job (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def clean_launcher_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` for a child that runs its own launcher: without this process's rank
    variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and rendezvous port (``MASTER_PORT``),
    which the child's ``torchrun`` sets for its own ranks."""
    return {k: v for k, v in env.items() if k not in (*LAUNCHER_RANK_VARS, "MASTER_PORT")}


@contextmanager
def one_process_env() -> Iterator[None]:
    """Within the block, the environment of a one-rank job (``RANK=0``, ``WORLD_SIZE=1``, the
    rendezvous at ``127.0.0.1`` on a free port), for a process group of this process alone; the
    previous values are restored on leaving it (also on an error), so that later runs in the same
    process do not mistake themselves for launcher ranks."""
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of parallelism of the learner.

    Attributes:
        world_size: number of learner processes.
        tp: tensor-parallel size (attention heads, MLP columns, vocabulary split across ranks).
        pp: pipeline-parallel size (layers split into ``pp`` equal stages).
        cp: context-parallel size (the sequence split into ``2 * cp`` chunks, two per rank).
        dp: derived, ``world_size / (tp * pp * cp)``.
    """

    world_size: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"parallel layout: {name} must be a positive integer, got {v!r}")
        mp = self.tp * self.pp * self.cp
        if self.world_size % mp:
            raise ConfigError(
                f"parallel layout: world size {self.world_size} is not divisible by "
                f"tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {mp}"
            )

    @classmethod
    def from_env(cls, tp: int = 1, pp: int = 1, cp: int = 1) -> "ParallelLayout":
        """The layout of this process group: world size from ``WORLD_SIZE`` (``torchrun``), default 1."""
        return cls(world_size=int(os.environ.get("WORLD_SIZE", "1")), tp=tp, pp=pp, cp=cp)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------

    def validate_model(self, arch: ModelArch) -> None:
        """Check that the model can be split this way (the rules Megatron enforces, as user errors)."""
        if arch.num_heads % self.tp:
            raise ConfigError(
                f"parallel layout: num_attention_heads={arch.num_heads} is not divisible by tp={self.tp}"
            )
        kv = arch.num_kv_heads
        if kv % self.tp and self.tp % kv:
            raise ConfigError(
                f"parallel layout: num_key_value_heads={kv} and tp={self.tp}: one must divide the other "
                f"(each TP rank holds whole KV heads, or a KV head is replicated on tp/kv ranks)"
            )
        if self.tp > kv:
            # Megatron splits the interleaved [q_g, k_g, v_g] block of one group across tp/kv ranks.
            rows = (arch.num_heads // kv + 2) * arch.head_dim
            if rows % (self.tp // kv):
                raise ConfigError(
                    f"parallel layout: tp={self.tp} > num_key_value_heads={kv} needs the "
                    f"{rows} QKV rows of one KV group to split over {self.tp // kv} ranks"
                )
        if arch.intermediate_size % self.tp:
            raise ConfigError(
                f"parallel layout: intermediate_size={arch.intermediate_size} is not divisible by tp={self.tp}"
            )
        if arch.num_layers % self.pp:
            raise ConfigError(
                f"parallel layout: num_hidden_layers={arch.num_layers} is not divisible by pp={self.pp}"
            )

    def validate_seq_len(self, seq_len: int) -> None:
        """Under CP the sequence is cut into ``2 * cp`` equal chunks (Megatron's causal load balance)."""
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise ConfigError(
                f"parallel layout: sequence length {seq_len} is not divisible by 2*cp = {2 * self.cp} "
                f"(context parallelism cuts each row into 2*cp equal chunks; pad the batch)"
            )

    def validate(self, arch: ModelArch | None = None, seq_len: int | None = None) -> None:
        if arch is not None:
            self.validate_model(arch)
        if seq_len is not None:
            self.validate_seq_len(seq_len)

    # ------------------------------------------------------------------------------------------
    # process groups
    # ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device of this process: ``cuda:<local rank>`` on GPU machines, else CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def initialize(self, *, seed: int = 1234, backend: str | None = None, timeout_minutes: int = 30) -> None:
        """Start ``torch.distributed`` (if not yet) and Megatron's model-parallel groups.

        Rank, world size and rendezvous come from the environment (``RANK``, ``WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT``, as ``torchrun`` sets them). On a CPU-only machine the
        Megatron CPU shim is applied first and the backend is gloo.

        ``seed`` seeds Megatron's RNG tracker (dropout / init streams per TP rank).
        """
        from megatron.core import parallel_state, tensor_parallel

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            cpu_shim.apply()
        if parallel_state.model_parallel_is_initialized():
            raise RuntimeError("Megatron model parallel state is already initialized; call destroy() first")
        if not torch.distributed.is_initialized():
            env_world = int(os.environ.get("WORLD_SIZE", "1"))
            if env_world != self.world_size:
                raise ConfigError(
                    f"parallel layout: world_size={self.world_size} but WORLD_SIZE={env_world} in the environment"
                )
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.setdefault("RANK", "0")
            if on_gpu:
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(
                backend=backend or ("nccl" if on_gpu else "gloo"),
                world_size=self.world_size,
                rank=int(os.environ["RANK"]),
                timeout=timedelta(minutes=timeout_minutes),
            )
        elif torch.distributed.get_world_size() != self.world_size:
            raise ConfigError(
                f"parallel layout: world_size={self.world_size} but torch.distributed has "
                f"{torch.distributed.get_world_size()} processes"
            )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            context_parallel_size=self.cp,
            distributed_timeout_minutes=timeout_minutes,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def destroy(self, *, process_group: bool = True) -> None:
        """Tear down Megatron's groups and, unless ``process_group=False``, the default process group.

        Keeping the process group lets the same processes initialize another layout (tests switch
        between TP, PP and CP this way). Safe to call twice.
        """
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if process_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------------------------------
    # this rank (valid after initialize)
    # ------------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def tp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_rank()

    @property
    def cp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_context_parallel_rank()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def tp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_group()

    @property
    def cp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_context_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    def pp_last_stage_global_rank(self) -> int:
        """Global rank of the last pipeline stage in this rank's pipeline (same TP/CP/DP position)."""
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_last_rank()

