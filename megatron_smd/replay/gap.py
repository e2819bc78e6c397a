"""What every learner's replay is measured with: the modes, the temperature, the gap metrics
(see the package docstring)."""

from __future__ import annotations

import torch

from ..rollout.io import RolloutBatch

MODES = ("dense", "shadow")
#: the exact-replay tolerance (fp32) the ``frac_within_tol`` metric counts against
REPLAY_TOL = 1e-5


def learner_temperature(batch: RolloutBatch) -> float:
    t = float(batch.meta.get("sampling", {}).get("temperature", 1.0))
    return t if t > 0 else 1.0


def gap_metrics(learner_lp: torch.Tensor, batch: RolloutBatch) -> dict:
    """Compare ``[N, T]`` learner log-probs with the sampler's on completion tokens."""
    T = batch.tokens.shape[1]
    t = torch.arange(T).view(1, T)
    m = (t >= batch.prompt_lens.view(-1, 1)) & (t < batch.seq_lens.view(-1, 1))
    d = (learner_lp - batch.sampler_logprobs)[m].double()
    log_r = d  # log p_learner - log p_sampler
    k3 = torch.expm1(log_r) - log_r
    return {
        "max_abs_logprob_diff": float(d.abs().max()) if d.numel() else 0.0,
        "mean_abs_logprob_diff": float(d.abs().mean()) if d.numel() else 0.0,
        "mean_kl": float(k3.mean()) if d.numel() else 0.0,
        "mean_kl_k1": float((-log_r).mean()) if d.numel() else 0.0,
        "num_tokens": int(m.sum()),
        # share of tokens within the exact-replay tolerance (FP8 rollouts: the criterion of
        # megatron_smd.quant.cache.fp8_replay_check)
        "frac_within_tol": float((d.abs() <= REPLAY_TOL).double().mean()) if d.numel() else 1.0,
    }
