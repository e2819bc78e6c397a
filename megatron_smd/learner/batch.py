"""What the learner trains on: :class:`TrainBatch`, in the model's alignment.

A rollout file (:class:`~megatron_smd.rollout.io.RolloutBatch`) is the sampler's record; the learner
does not read it directly. :func:`from_rollout` is the one conversion (the trainer's rollouts and
any tool that reads a rollout directory go through it); SFT builds a :class:`TrainBatch` itself,
with no sampler.

Alignment (the learner's, everywhere on this side): a per-token tensor ``x [N, T]`` holds at entry
``t`` the value for the prediction made at position ``t``, i.e. about ``tokens[t + 1]`` given
``tokens[<= t]``. That is how the model's output comes out, so the learner's log-probs, the
sampler's (shifted once, here), the completion mask, the PPO inputs and every loss term line up
without further shifts. The rollout file's alignment (entry ``t`` about ``tokens[t]``) is one
position later; :func:`to_model_alignment` / :func:`to_file_alignment` convert, for the tools that
compare with a file.

FP8 rollouts: a rollout sampled with an FP8 KV cache carries it (``meta.json: kv_cache``, a
:class:`~megatron_smd.quant.cache.RolloutKV`); :func:`from_rollout` puts it on the batch
(``TrainBatch.kv_cache``), and the learner's ``shadow`` rows round K and V exactly as that cache
did (:meth:`TrainBatch.kv_replay`). ``dense`` rows are never quantised: the dense forward is the
model without the sampler's compression, neither its mask nor its rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant.cache import KVReplay, RolloutKV, fp8_replay_check
from ..rollout.io import RolloutBatch, completion_positions


def to_model_alignment(x: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` in the rollout file's alignment -> the model's (one position earlier; 0 at the end)."""
    out = torch.zeros_like(x)
    out[:, :-1] = x[:, 1:]
    return out


def to_file_alignment(x: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` in the model's alignment -> the rollout file's (one position later; 0 at ``t = 0``)."""
    out = torch.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out


@dataclass
class TrainBatch:
    """N padded sequences for the learner.

    Attributes:
        tokens: ``[N, T]`` int64, prompt + completion, 0-padded past ``seq_lens``.
        prompt_lens, seq_lens: ``[N]`` int64.
        evict: the shadow mask ``[N, L, T]`` or ``[N, L, H_kv, T]`` int32 (relative to each
            sequence start, :mod:`megatron_smd.mask`); a dense batch holds "never evicted".
        sampler_logprobs: ``[N, T]`` fp32, the sampler's log-prob of each completion token (model
            alignment), or None (SFT: no sampler).
        rewards: ``[N]`` fp32 rewards of the sequences, or None.
        group_ids: ``[N]`` int64, the GRPO group (prompt) of each sequence, or None.
        temperature: the temperature the learner scores at (the sampler's; greedy counts as 1).
        kv_cache: the FP8 KV cache the sampler kept (scales per layer), or None (model dtype):
            the shadow forward replays its rounding.
        completion_mask: ``[N, T]`` bool, computed once: True at the predictions of completion
            tokens (``prompt_len - 1 <= t < seq_len - 1``), the actions the losses train on.
    """

    tokens: torch.Tensor
    prompt_lens: torch.Tensor
    seq_lens: torch.Tensor
    evict: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    temperature: float = 1.0
    kv_cache: RolloutKV | None = None
    completion_mask: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.completion_mask = completion_positions(self.prompt_lens, self.seq_lens, self.tokens.shape[1], offset=1)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def per_head(self) -> bool:
        return self.evict.dim() == 4

    def evict_of(self, n: int) -> torch.Tensor:
        """Unpadded mask of sequence ``n``: ``[L, (H,) T_n]``."""
        return self.evict[n, ..., : int(self.seq_lens[n])].contiguous()

    def kv_replay(self, row_modes: list[str]) -> KVReplay | None:
        """The FP8 rounding a micro-batch whose rows run in ``row_modes`` replays: on its
        ``shadow`` rows, with this rollout's scales; None without an FP8 cache or shadow rows."""
        if self.kv_cache is None:
            return None
        return self.kv_cache.replay([m == "shadow" for m in row_modes])

    def replay_check(self, lp_learner: torch.Tensor, mode: str) -> dict:
        """The FP8 replay criterion of the learner's ``mode`` log-probs (model alignment) against the
        sampler's, as ``replay/fp8_*`` statistics (:func:`~megatron_smd.quant.cache.fp8_replay_check`),
        logging a warning when a step misses it. Empty unless this is an FP8 rollout replayed in the
        ``shadow`` mode (the dense forward is not a replay)."""
        if self.kv_cache is None or mode != "shadow" or self.sampler_logprobs is None:
            return {}
        r = fp8_replay_check(lp_learner, self.sampler_logprobs, self.completion_mask)
        if not r["ok"]:
            import logging

            logging.getLogger(__name__).warning(
                "FP8 replay outside tolerance: %d completion tokens beyond 1e-5 (%.4f%% within), max |d log p| %.3e",
                r["tokens_over_tol"], 100 * r["frac_within_tol"], r["max_abs_logprob_diff"])
        return {f"replay/fp8_{k}": float(v) for k, v in r.items()}


def from_rollout(batch: RolloutBatch, *, rewards: list[float] | torch.Tensor | None = None,
                 temperature: float | None = None) -> TrainBatch:
    """The one conversion of a rollout into a :class:`TrainBatch`: the sampler's log-probs shifted
    to the model's alignment, the rewards (``rewards``, else ``meta["rewards"]`` when the rollout
    has them) and the temperature (``temperature``, else ``meta["sampling"]["temperature"]``, 1 when
    absent; 0, greedy, scores at 1) typed, the groups from ``prompt_index``, the FP8 KV cache from
    ``meta["kv_cache"]``."""
    meta = batch.meta or {}
    if rewards is None:
        rewards = meta.get("rewards")
    if temperature is None:
        temperature = float((meta.get("sampling") or {}).get("temperature", 1.0))
    return TrainBatch(tokens=batch.tokens, prompt_lens=batch.prompt_lens, seq_lens=batch.seq_lens, evict=batch.evict,
                      sampler_logprobs=to_model_alignment(batch.sampler_logprobs),
                      rewards=None if rewards is None else torch.as_tensor(rewards, dtype=torch.float32),
                      group_ids=batch.prompt_index, temperature=float(temperature) or 1.0,
                      kv_cache=batch.kv_cache)


def from_trajectories(trajs, *, rewards: list[float] | None = None, temperature: float = 1.0) -> TrainBatch:
    """A :class:`TrainBatch` of sampled trajectories (padded as the rollout format pads them)."""
    return from_rollout(RolloutBatch.from_trajectories(trajs, {}), rewards=rewards, temperature=temperature)


def as_train_batch(batch: TrainBatch | RolloutBatch) -> TrainBatch:
    """``batch`` itself, or :func:`from_rollout` of a rollout."""
    return batch if isinstance(batch, TrainBatch) else from_rollout(batch)
