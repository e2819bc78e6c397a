"""Replay a rollout with a learner and measure how far its log-probs are from the sampler's.

Learner modes (:data:`MODES`):

* ``dense``: the ordinary causal forward (what every RL framework's learner does). On a compressed
  rollout this is the off-policy gap.
* ``shadow``: the forward under the exported mask (``evict``). SMD's claim: this equals the sampler
  up to floating-point noise.

Metrics over completion tokens (``prompt_len <= t < seq_len``), :func:`gap_metrics`:

* ``max_abs_logprob_diff``: ``max |log p_learner - log p_sampler|``; ``frac_within_tol``: the share
  of tokens with ``|log p_learner - log p_sampler| <= 1e-5`` (``gap.REPLAY_TOL``).
* ``mean_kl``: mean of the k3 estimator of ``KL(sampler || learner)``, ``r - 1 - log r`` with
  ``r = p_learner / p_sampler`` on tokens drawn from the sampler (unbiased, non-negative);
  ``mean_kl_k1`` is the plain ``log p_sampler - log p_learner`` mean.

The learner divides its logits by the sampler's temperature (``meta.json: sampling.temperature``;
greedy rollouts use 1), because the sampler's log-probs are of that distribution.

Learners:

* :mod:`.reference`: the pure-torch model in this process (``smd replay``, the default);
* :mod:`.megatron`: the Megatron learner under TP x PP x CP, launched with torchrun
  (``smd replay --learner megatron``); each rank runs :mod:`.worker`.
"""

from __future__ import annotations

from .gap import MODES, gap_metrics, learner_temperature
from .megatron import replay_megatron, rollout_precision
from .reference import replay_torch, sequence_logprobs, torch_replay_logprobs

__all__ = ["MODES", "gap_metrics", "learner_temperature", "replay_megatron", "replay_torch", "rollout_precision",
           "sequence_logprobs", "torch_replay_logprobs"]
