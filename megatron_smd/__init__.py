"""megatron-smd: Shadow Mask Distillation for RL post-training with a compressed rollout KV cache.

The rollout records, per layer, which cached positions each token could see (the shadow mask,
:mod:`megatron_smd.mask`); the learner replays exactly that mask, so its log-probs equal the
sampler's and the update stays on-policy.
"""

__version__ = "0.1.0"
