"""Replay a rollout with a learner and measure how far its log-probs are from the sampler's.

Learner modes:

* ``dense``: the ordinary causal forward (what every RL framework's learner does). On a compressed
  rollout this is the off-policy gap.
* ``shadow``: the forward under the exported mask (``evict``). SMD's claim: this equals the sampler
  up to floating-point noise.

Metrics over completion tokens (``prompt_len <= t < seq_len``):

* ``max_abs_logprob_diff``: ``max |log p_learner - log p_sampler|``.
* ``mean_kl``: mean of the k3 estimator of ``KL(sampler || learner)``, ``r - 1 - log r`` with
  ``r = p_learner / p_sampler`` on tokens drawn from the sampler (unbiased, non-negative);
  ``mean_kl_k1`` is the plain ``log p_sampler - log p_learner`` mean.

The learner divides its logits by the sampler's temperature (``meta.json: sampling.temperature``;
greedy rollouts use 1), because the sampler's log-probs are of that distribution.
"""

from __future__ import annotations

import torch

from .rollout.io import RolloutBatch

MODES = ("dense", "shadow")


def learner_temperature(batch: RolloutBatch) -> float:
    t = float(batch.meta.get("sampling", {}).get("temperature", 1.0))
    return t if t > 0 else 1.0


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits ``[..., T, V]`` (position t predicts t+1), tokens ``[..., T]`` -> ``[..., T]`` log-probs of
    ``tokens[t]`` given the prefix, with 0 at ``t = 0``."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    out = torch.zeros(tokens.shape, dtype=torch.float32)
    out[..., 1:] = lp[..., :-1, :].gather(-1, tokens[..., 1:].unsqueeze(-1)).squeeze(-1)
    return out


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
    }


@torch.no_grad()
def torch_replay_logprobs(model, batch: RolloutBatch, mode: str, *, packed: bool = False) -> torch.Tensor:
    """Log-probs ``[N, T]`` of the rollout's tokens under the pure-torch model.

    ``packed=True`` lays all trajectories end to end in one row with absolute ``evict`` (THD style)
    and per-sequence RoPE positions, which is how the learner packs micro-batches.
    """
    from .mask import never_evicted, pack

    if mode not in MODES:
        raise ValueError(f"unknown learner mode {mode!r} (modes: {MODES})")
    temp = learner_temperature(batch)
    N, T = batch.tokens.shape
    L = model.arch.num_layers
    out = torch.zeros(N, T)
    masks = []
    for n in range(N):
        s = int(batch.seq_lens[n])
        ev = batch.evict_of(n) if mode == "shadow" else never_evicted(L, s)
        if mode == "dense" and batch.per_head:
            ev = ev.unsqueeze(1).expand(-1, batch.evict.shape[2], -1).contiguous()
        masks.append(ev)
    if packed:
        ev, cu = pack(masks)
        toks = torch.cat([batch.tokens_of(n) for n in range(N)]).unsqueeze(0)
        pos = torch.cat([torch.arange(int(batch.seq_lens[n])) for n in range(N)]).unsqueeze(0)
        logits = model(toks, evict=ev.unsqueeze(0), positions=pos)[0]
        for n in range(N):
            a, b = int(cu[n]), int(cu[n + 1])
            out[n, : b - a] = token_logprobs(logits[a:b], toks[0, a:b], temp)
        return out
    for n in range(N):
        toks = batch.tokens_of(n).unsqueeze(0)
        logits = model(toks, evict=masks[n].unsqueeze(0))[0]
        out[n, : toks.shape[1]] = token_logprobs(logits, toks[0], temp)
    return out


def replay_torch(batch: RolloutBatch, model_dir=None, *, packed: bool = False) -> dict:
    """``smd replay`` with the pure-torch learner: ``{mode: metrics}``."""
    from .model.transformer import RefTransformer

    from .rollout.engine import torch_dtype

    # replayed in the dtype the rollout was sampled in (meta.json: dtype; float32 when absent)
    model = RefTransformer.from_pretrained(model_dir or batch.meta["model_path"],
                                           dtype=torch_dtype(batch.meta.get("dtype") or "float32"))
    a = model.arch
    if batch.evict.shape[1] != a.num_layers:
        from .errors import MaskError

        raise MaskError(f"evict has {batch.evict.shape[1]} layers, the model at {model_dir or batch.meta['model_path']} has {a.num_layers}")
    return {mode: gap_metrics(torch_replay_logprobs(model, batch, mode, packed=packed), batch) for mode in MODES}
