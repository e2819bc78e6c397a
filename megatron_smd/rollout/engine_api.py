"""What the trainer needs of a rollout engine.

Two engines sample for ``smd train``: the in-process
:class:`~megatron_smd.rollout.engine.ReferenceEngine` (``rollout.backend: reference``) and the client of
the patched SGLang servers, :class:`~megatron_smd.rollout.sglang_client.SGLangClient`
(``rollout.backend: sglang``). Both are a :class:`RolloutEngine`; the client is also a
:class:`RemoteRolloutEngine` (servers that can fail, be re-targeted and be checked for their policy).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .engine import RolloutStats, SamplingParams, Trajectory


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int = 1, sampling: SamplingParams | None = None
                 ) -> tuple[list[Trajectory], RolloutStats]:
        """Sample ``n`` completions per prompt (token ids); trajectories ordered prompt-major, each
        with its sampler log-probs and shadow mask."""
        ...


@runtime_checkable
class RemoteRolloutEngine(RolloutEngine, Protocol):
    urls: list[str]
    """The servers requests go to (the trainer narrows it to the healthy ones after a fault)."""
    invalid_outputs: int
    """Outputs that failed validation and were re-requested, so far."""

    def check_policy(self, expected: dict) -> None:
        """Refuse servers whose eviction policy is not ``expected`` (``PolicyConfig`` as JSON)."""
        ...
