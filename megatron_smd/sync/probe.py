"""The learner's side of the post-sync probe: its full-vocabulary logits on a probe batch, from a
plain pipelined forward of one model replica, which the engine's logits on the staged weights are
compared with (:mod:`megatron_smd.sync.staging`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.hf import ModelArch
from ..parallel.layout import ParallelLayout


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's DDP / Float16Module wrappers (``.module`` chains)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


@torch.no_grad()
def learner_logits(model: torch.nn.Module, layout: ParallelLayout, arch: ModelArch,
                   tokens: torch.Tensor) -> torch.Tensor | None:
    """The learner's full-vocabulary logits ``[B, T, V]`` (fp32) on global rank 0; None elsewhere.

    A plain pipelined forward of the ``dp_rank 0 / cp_rank 0`` replica (causal attention,
    positions ``0..T-1``): stage ``p`` receives the hidden states ``[T, B, D]`` from stage ``p-1``
    over the pipeline group, the last stage all-gathers its vocabulary shards ``[B, T, Vp/tp]``
    over TP and trims the padding, and its ``tp_rank 0`` sends the result to global rank 0. Every
    rank of the world may call it (non-participants return at once); every participant must.
    Needs ``cp == 1`` and no sequence parallelism (a probe is a few short rows).
    """
    if layout.cp != 1:
        raise ValueError("learner_logits: context parallelism splits the sequence; run the probe with cp=1 "
                         "(or verify by checksums)")
    if not (layout.dp_rank == 0 and layout.cp_rank == 0):
        return None
    m = unwrap_model(model)
    if getattr(m.config, "sequence_parallel", False):
        raise ValueError("learner_logits: sequence parallelism is not supported by the probe forward")
    was_training = m.training
    m.eval()
    try:
        B, T = tokens.shape
        p = next(m.parameters())
        dev = p.device
        tok = tokens.to(dev)
        pos = torch.arange(T, device=dev).expand(B, T).contiguous()
        pp, stage = layout.pp, layout.pp_rank
        if stage > 0:
            h = torch.empty(T, B, arch.hidden_size, dtype=m.config.params_dtype, device=dev)
            dist.recv(h, group=layout.pp_group, group_src=stage - 1)
            m.set_input_tensor(h)
        out = m(tok, pos, None)
        if stage < pp - 1:
            dist.send(out.contiguous(), group=layout.pp_group, group_dst=stage + 1)
            if stage > 0 or layout.tp_rank != 0:
                return None
            full = torch.empty(B, T, arch.vocab_size, dtype=torch.float32, device=dev)
            dist.recv(full, group=layout.pp_group, group_src=pp - 1)
            return full.cpu()
        shard = out.float().contiguous()  # [B, T, Vp/tp]
        if layout.tp > 1:
            parts = [torch.empty_like(shard) for _ in range(layout.tp)]
            dist.all_gather(parts, shard, group=layout.tp_group)
            shard = torch.cat(parts, dim=-1)
        full = shard[..., :arch.vocab_size].contiguous()
        if layout.tp_rank != 0:
            return None
        if pp > 1:
            dist.send(full, group=layout.pp_group, group_dst=0)
            return None
        return full.cpu()
    finally:
        if layout.pp > 1 and layout.pp_rank > 0:
            m.set_input_tensor(None)
        m.train(was_training)
