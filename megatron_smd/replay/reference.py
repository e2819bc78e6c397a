"""``smd replay`` with the pure-torch learner (:class:`~megatron_smd.model.transformer.RefTransformer`)."""

from __future__ import annotations

import torch

from ..learner.logprobs import token_logprobs
from ..rollout.io import RolloutBatch
from .gap import MODES, gap_metrics, learner_temperature


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits ``[..., T, V]`` (position t predicts t+1), tokens ``[..., T]`` -> ``[..., T]`` fp32 log-probs of
    ``tokens[t]`` given the prefix, with 0 at ``t = 0`` (:func:`~megatron_smd.learner.logprobs.token_logprobs`
    of the shifted pairs)."""
    out = torch.zeros(tokens.shape, dtype=torch.float32)
    out[..., 1:] = token_logprobs(logits[..., :-1, :], tokens[..., 1:], temperature=temperature)
    return out


@torch.no_grad()
def torch_replay_logprobs(model, batch: RolloutBatch, mode: str, *, packed: bool = False) -> torch.Tensor:
    """Log-probs ``[N, T]`` of the rollout's tokens under the pure-torch model.

    ``packed=True`` lays all trajectories end to end in one row with absolute ``evict`` (THD style)
    and per-sequence RoPE positions, which is how the learner packs micro-batches. An FP8 rollout
    (``meta.json: kv_cache``) is replayed with its K/V rounding in the ``shadow`` mode.
    """
    from ..mask import never_evicted, pack

    if mode not in MODES:
        raise ValueError(f"unknown learner mode {mode!r} (modes: {MODES})")
    temp = learner_temperature(batch)
    rkv = batch.kv_cache.replay([True]) if mode == "shadow" and batch.kv_cache is not None else None
    kv = None if rkv is None else (lambda li, k, v: rkv.apply(li, k, v, batch_dim=0))
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
        logits = model(toks, evict=ev.unsqueeze(0), positions=pos, kv=kv)[0]
        for n in range(N):
            a, b = int(cu[n]), int(cu[n + 1])
            out[n, : b - a] = sequence_logprobs(logits[a:b], toks[0, a:b], temp)
        return out
    for n in range(N):
        toks = batch.tokens_of(n).unsqueeze(0)
        logits = model(toks, evict=masks[n].unsqueeze(0), kv=kv)[0]
        out[n, : toks.shape[1]] = sequence_logprobs(logits, toks[0], temp)
    return out


def replay_torch(batch: RolloutBatch, model_dir=None, *, packed: bool = False) -> dict:
    """``smd replay`` with the pure-torch learner: ``{mode: metrics}``."""
    from ..model.transformer import RefTransformer
    from ..rollout.engine import torch_dtype

    from ..rollout.io import check_kv_scales_weights

    check_kv_scales_weights(batch, model_dir or batch.meta["model_path"])  # FP8 scales: calibrated on these weights
    # replayed in the dtype the rollout was sampled in (meta.json: dtype; float32 when absent)
    model = RefTransformer.from_pretrained(model_dir or batch.meta["model_path"],
                                           dtype=torch_dtype(batch.meta.get("dtype") or "float32"))
    a = model.arch
    if batch.evict.shape[1] != a.num_layers:
        from ..errors import MaskError

        raise MaskError(f"evict has {batch.evict.shape[1]} layers, the model at {model_dir or batch.meta['model_path']} has {a.num_layers}")
    return {mode: gap_metrics(torch_replay_logprobs(model, batch, mode, packed=packed), batch) for mode in MODES}
