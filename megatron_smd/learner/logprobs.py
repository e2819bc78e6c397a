"""Per-token log-probabilities from logits: the pure math (no process groups here).

The learner's output layer has ``Vp >= V`` columns: Megatron pads the vocabulary to a multiple of
``make_vocab_size_divisible_by * tp`` with zero rows, whose logits are not tokens. Log-softmax is
therefore taken over the first ``vocab_size`` columns only, so the result is the same distribution
the sampler drew from. The vocab-parallel form (each TP rank holding ``Vp / tp`` columns) is
:func:`megatron_smd.parallel.vocab_parallel.vocab_parallel_token_logprobs`; it must agree with
:func:`token_logprobs` applied to the gathered logits.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits[..., :vocab_size] / temperature)[target]`` per position.

    Args:
        logits: ``[..., Vp]`` (e.g. ``[B, T, Vp]``), any float dtype; computed in fp32.
        targets: ``[...]`` int token ids in ``[0, vocab_size)``.
        vocab_size: the real vocabulary ``V <= Vp``; padded columns are excluded. Default ``Vp``.
        temperature: the sampler's temperature (> 0); logits are divided by it, as the sampler did.
    Returns:
        fp32 ``[...]`` log-probabilities, differentiable w.r.t. ``logits``.
    """
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    V = logits.shape[-1] if vocab_size is None else vocab_size
    if V > logits.shape[-1]:
        raise ValueError(f"token_logprobs: vocab_size={V} exceeds the logits' {logits.shape[-1]} columns")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"token_logprobs: targets {list(targets.shape)} do not match logits {list(logits.shape)}")
    x = logits[..., :V].float()
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
