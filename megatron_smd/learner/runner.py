"""Forward (and backward) of the learner over micro-batches, with Megatron's pipeline schedules.

:func:`run_microbatches` is the one entry point. Inside an initialized
:class:`~megatron_smd.parallel.layout.ParallelLayout` it hands the micro-batches to
``megatron.core.pipeline_parallel.get_forward_backward_func()`` (no pipelining for PP=1, the 1F1B
schedule for PP>1) and returns the per-token log-probs of the targets.

Data contract (why it looks like this):

* Every rank is called with the **same, full** list of micro-batches. Each stage's forward step
  reads its own copy of the current micro-batch from the iterator, so ``position_ids`` and the
  shadow mask reach every stage and every TP rank through the model call itself: nothing rides in
  a global (under 1F1B the backward of micro-batch k runs after the forward of k+n, so a global
  "current mask" would be wrong), and nothing is sent over p2p except hidden states.
* Under context parallelism each rank cuts ``tokens`` / ``position_ids`` / ``targets`` / ``extras``
  to its two chunks (:func:`~megatron_smd.parallel.cp.local_positions`); ``evict`` stays
  global (the attention needs global key positions).
* Losses are **token sums**: ``loss_fn(logprobs, batch) -> (loss_sum, num_tokens)``. The model is
  built with ``calculate_per_token_loss=True``, so Megatron does not divide by the micro-batch
  count; the gradient left in ``param.grad`` is ``d(sum over micro-batches of loss_sum)/d theta``.
  (Megatron DDP's ``finalize_model_grads`` divides by the global token count when used.)
* Under CP each rank's backward covers its own tokens only; for a model not wrapped in Megatron
  DDP the runner sums the gradients over the CP group (DDP does it in its DP x CP reduction), and
  the reported losses are summed over CP too.
* Tied embeddings under PP>1 exist twice (first stage's embedding, last stage's output layer). For
  a model that is not wrapped in Megatron DDP the runner all-reduces their gradients over the
  embedding group afterwards, as ``finalize_model_grads`` would, so both copies hold the full
  gradient.

The returned log-probs are assembled (CP chunks put back in order) on the last stage and
broadcast along the pipeline, so every rank, rank 0 included, can report them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..parallel.cp import local_positions
from ..parallel.layout import ParallelLayout
from ..parallel.vocab_parallel import vocab_parallel_token_logprobs
from ..quant.cache import KVReplay


@dataclass
class MicroBatch:
    """One micro-batch, global (not CP-sliced), identical on every rank.

    Attributes:
        tokens: ``[b, S]`` int64 input ids. Packed rows are sbhd rows with ``b = 1`` per row.
        position_ids: ``[b, S]`` int64, each token's position in its own sequence (restarting at 0
            for every packed sequence); RoPE uses these.
        targets: ``[b, S]`` int64, the token whose log-prob is wanted at each position (the next
            token); any valid id where ``loss_mask`` is 0.
        evict: the shadow mask ``[b, L, S]`` / ``[b, L, H_kv, S]`` int32 (absolute positions in the
            row), or ``None`` for plain causal attention.
        extras: further per-token ``[b, S]`` tensors for ``loss_fn`` (advantages, old log-probs,
            loss mask, ...); CP-sliced like ``tokens``.
        kv_quant: the FP8 K/V rounding its rows replay (:class:`~megatron_smd.quant.cache.KVReplay`,
            an FP8 rollout's shadow rows), or None. Like ``evict`` it reaches the core attention
            through the model call (Megatron's per-call ``attention_bias`` argument, which its
            recompute paths capture rather than save), never through a global.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    evict: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    kv_quant: KVReplay | None = None


LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, torch.Tensor | int]]


@dataclass
class RunResult:
    """``logprobs[k]``: ``[b, S]`` fp32 log-probs of micro-batch ``k`` (global order, detached).
    ``losses[k]``: the ``loss_sum`` ``loss_fn`` returned for it (0 when no ``loss_fn``)."""

    logprobs: list[torch.Tensor]
    losses: list[float]


def _local_view(mb: MicroBatch, pos: torch.Tensor | None) -> MicroBatch:
    if pos is None:
        return mb
    return MicroBatch(tokens=mb.tokens[:, pos], position_ids=mb.position_ids[:, pos], targets=mb.targets[:, pos],
                      evict=mb.evict, extras={k: v[:, pos] for k, v in mb.extras.items()}, kv_quant=mb.kv_quant)


def _loss_step(output: torch.Tensor, *, mb: MicroBatch, vocab_size: int, temperature: float,
               loss_fn: LossFn | None):
    """Megatron loss callback on the last stage: output ``[b, s, Vp/tp]`` -> (loss_sum, ntok, data)."""
    logp = vocab_parallel_token_logprobs(output, mb.targets, vocab_size=vocab_size, temperature=temperature)
    if loss_fn is None:
        loss, ntok = logp.sum() * 0.0, torch.tensor(0, dtype=torch.int)
    else:
        # a loss that needs the whole distribution (the full-vocabulary distillation KL) gets this
        # rank's vocab-parallel logits as well
        loss, ntok = loss_fn(logp, mb, logits=output) if getattr(loss_fn, "wants_logits", False) else loss_fn(logp, mb)
        ntok = torch.as_tensor(ntok, dtype=torch.int)
    return loss, ntok, {"logprobs": logp.detach(), "loss": loss.detach().reshape(())}


def _forward_step(data_iterator, model, *, vocab_size: int, temperature: float, loss_fn: LossFn | None,
                  cp_pos: torch.Tensor | None):
    mb = _local_view(next(data_iterator), cp_pos)
    device = next(model.parameters()).device
    kw = {} if mb.kv_quant is None else {"extra_block_kwargs": {"attention_bias": mb.kv_quant}}
    output = model(mb.tokens.to(device), mb.position_ids.to(device),
                   mb.evict.to(device) if mb.evict is not None else None, **kw)
    return output, partial(_loss_step, mb=mb, vocab_size=vocab_size, temperature=temperature, loss_fn=loss_fn)


def allreduce_tied_embedding_grads(model: torch.nn.Module) -> None:
    """Sum the gradients of the two copies of a tied embedding (first and last stage), in place.

    The same reduction as Megatron's ``finalize_model_grads._allreduce_word_embedding_grads``, on
    ``param.grad`` instead of DDP's ``main_grad``. No-op for PP=1 or untied embeddings.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not getattr(model, "share_embeddings_and_output_weights", False):
        return
    if not (model.pre_process or model.post_process):
        return
    w = model.shared_embedding_or_output_weight()
    grad = w.grad if w.grad is not None else torch.zeros_like(w)
    dist.all_reduce(grad, group=parallel_state.get_embedding_group())
    w.grad = grad


def allreduce_context_parallel_grads(model: torch.nn.Module, layout: ParallelLayout) -> None:
    """Sum ``param.grad`` over the CP group: each CP rank's backward only saw its own tokens' loss.

    Megatron DDP does this as part of its data-parallel reduction (over DP x CP); for a bare model
    the runner does it so every CP rank holds the full gradient. No-op for CP=1.
    """
    if layout.cp == 1:
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=layout.cp_group)


def run_microbatches(model: torch.nn.Module, layout: ParallelLayout, microbatches: Sequence[MicroBatch], *,
                     vocab_size: int, forward_only: bool = True, loss_fn: LossFn | None = None,
                     temperature: float = 1.0) -> RunResult:
    """Run forward (and backward unless ``forward_only``) over ``microbatches`` on this rank.

    Args:
        model: this rank's GPTModel (or Megatron DDP wrapping it).
        layout: the initialized layout.
        microbatches: all micro-batches, the same on every rank; all of one shape ``[b, S]``.
        vocab_size: the real vocabulary (padded logits are excluded from the softmax).
        forward_only: skip the backward pass.
        loss_fn: ``(logprobs [b, s_local], local micro-batch) -> (loss_sum, num_tokens)``; required
            for a backward pass. Runs on the last stage, once per micro-batch. A ``loss_fn`` with
            a true ``wants_logits`` attribute is called ``loss_fn(logprobs, mb, logits=...)`` with
            this rank's vocab-parallel logits ``[b, s_local, Vp / tp]`` as well.
        temperature: sampling temperature the log-probs are taken at.
    Returns:
        :class:`RunResult` on every rank.
    """
    if not microbatches:
        raise ValueError("run_microbatches: no micro-batches")
    if not forward_only and loss_fn is None:
        raise ValueError("run_microbatches: a backward pass needs a loss_fn")
    b, S = microbatches[0].tokens.shape
    for k, mb in enumerate(microbatches):
        for name in ("tokens", "position_ids", "targets"):
            if getattr(mb, name).shape != (b, S):
                raise ValueError(f"run_microbatches: micro-batch {k} {name} has shape "
                                 f"{list(getattr(mb, name).shape)}, micro-batch 0 tokens {[b, S]}")
    layout.validate_seq_len(S)
    cp_pos = local_positions(S, layout.cp_rank, layout.cp) if layout.cp > 1 else None

    step = partial(_forward_step, vocab_size=vocab_size, temperature=temperature, loss_fn=loss_fn, cp_pos=cp_pos)
    fb = get_forward_backward_func()
    with torch.no_grad() if forward_only else contextlib.nullcontext():  # no graph kept for scoring
        outputs = fb(forward_step_func=step, data_iterator=iter(microbatches), model=[model],
                     num_microbatches=len(microbatches), seq_length=S, micro_batch_size=b,
                     forward_only=forward_only)

    if not forward_only and not hasattr(model, "finish_grad_sync"):
        allreduce_tied_embedding_grads(model)
        allreduce_context_parallel_grads(model, layout)

    n = len(microbatches)
    device = next(model.parameters()).device
    logp = torch.zeros((n, b, S), dtype=torch.float32, device=device)
    losses = torch.zeros((n,), dtype=torch.float64, device=device)
    if layout.is_last_stage:
        local = torch.stack([o["logprobs"] for o in outputs])  # [n, b, s_local]
        losses = torch.stack([o["loss"].double() for o in outputs])
        if cp_pos is None:
            logp = local
        else:  # each CP rank holds its two chunks and summed the loss over its own tokens only
            dist.all_reduce(losses, group=layout.cp_group)
            parts = [torch.empty_like(local) for _ in range(layout.cp)]
            dist.all_gather(parts, local.contiguous(), group=layout.cp_group)
            for r, part in enumerate(parts):
                logp[:, :, local_positions(S, r, layout.cp).to(device)] = part
    if layout.pp > 1:
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(logp, src=src, group=layout.pp_group)
        dist.broadcast(losses, src=src, group=layout.pp_group)
    return RunResult(logprobs=list(logp.cpu().unbind(0)), losses=[float(x) for x in losses.cpu()])
