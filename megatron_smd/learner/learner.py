"""The learner: a Megatron-Core GPT (+ DDP + Megatron optimizer) that scores and trains on rollouts.

One :class:`Learner` per process, inside an initialized :class:`ParallelLayout`. It knows how to

* turn a :class:`~megatron_smd.learner.batch.TrainBatch` into micro-batches (padded rows, targets
  shifted by one, the shadow mask or the dense mask per row, and for an FP8 rollout the K/V
  rounding its shadow rows replay),
* compute per-token log-probs of a batch under the ``dense`` or ``shadow`` mask (forward only),
* run one optimizer step over micro-batches with a loss callback (gradient accumulation over
  micro-batches, DDP reduction over DP x CP, global-norm clipping, Adam from Megatron-Core),
* gather its weights as full HF-named tensors (for weight sync and HF export).

Alignment: per-token tensors in and out go with the batch they describe. For a ``TrainBatch`` that is
the model's alignment (entry ``t`` is the prediction made at ``t``, of ``tokens[t + 1]``): log-probs
come out and per-token extras go in as they are. A :class:`~megatron_smd.rollout.io.RolloutBatch`
(tools that compare with a rollout file) is converted by
:func:`~megatron_smd.learner.batch.from_rollout`, and its per-token tensors are in the file's
alignment (entry ``t`` about ``tokens[t]``), shifted at this boundary.

Padding: rows are padded to a common length ``S`` (a multiple of ``2 * cp``). Padded positions form
their own "document": their ``evict`` is ``S`` (visible only to later padded queries), so real
queries never see them and padded queries always see at least themselves (finite softmax).

Loss normalisation: Megatron is configured with ``calculate_per_token_loss=True`` and a
``finalize_model_grads`` that does *not* divide by a token count. Loss callbacks return
``sum_t c_t * loss_t`` where the coefficients ``c_t`` are already normalised over the whole
mini-batch (every micro-batch on every DP rank), so DDP's sum-reduction yields exactly the
token-mean or sequence-mean gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..mask import EVICT_DTYPE
from ..model.hf import ModelArch
from ..parallel.layout import ParallelLayout
from ..rollout.io import RolloutBatch
from .batch import TrainBatch, as_train_batch, to_file_alignment, to_model_alignment
from .runner import MicroBatch, run_microbatches
from .settings import PRECISIONS, LearnerSettings, learner_settings  # noqa: F401  (the learner's names)

Mode = str  # "dense" | "shadow"


def _finalize_without_token_scaling(model, num_tokens=None, **kw):
    """DDP / embedding grad reductions, but no division by a token count (losses arrive normalised)."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, **kw)


def _init_empty_adam_state(optimizer) -> None:
    """Give a fresh (never stepped) torch Adam behind the DistributedOptimizer its state tensors,
    ``step`` included, before a checkpoint is loaded into it: without apex/TE, Megatron 0.16's
    ``DistributedOptimizer.state_dict`` reads ``step`` from every parameter's state (and asserts
    they agree), and its own ``init_state_fn`` creates only the moments. The loaded values then
    overwrite all of it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)


def _checkpoint_fully_reshardable(optimizer) -> None:
    """Checkpoints of the DistributedOptimizer in Megatron's ``fully_reshardable`` format: the fp32
    main parameters and Adam moments as whole per-parameter tensors (gathered on DP rank 0 to save,
    sliced per rank on load), so a checkpoint loads under any TP / PP / DP layout, like the rest of
    the checkpoint. (Megatron 0.16's default, ``fully_sharded_model_space``, writes
    ``flattened_range`` tensors its own ``torch_dist`` strategy refuses.)"""
    orig = optimizer.sharded_state_dict

    def sharded_state_dict(model_sharded_state_dict, is_loading: bool = False, metadata=None, **kw):
        if is_loading:
            _init_empty_adam_state(optimizer)
        metadata = {"distrib_optim_sharding_type": "fully_reshardable", **(metadata or {})}
        return orig(model_sharded_state_dict, is_loading=is_loading, metadata=metadata, **kw)

    optimizer.sharded_state_dict = sharded_state_dict
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        _restore_without_step(opt)


def _restore_without_step(dopt) -> None:
    """Two fixes to Megatron 0.16's DistributedOptimizer checkpoint load with torch's Adam.

    Without apex/TE the inner optimizer is torch's Adam, which keeps ``step`` in every
    parameter's state. Megatron restores it from the checkpoint's param groups, but its
    ``fully_reshardable`` loader then copies every state key of the parameter from the saved
    per-parameter tensors, which have no ``step`` (KeyError). Leave ``step`` out of that copy."""
    orig = dopt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        gi, go = dopt.model_param_group_index_map[model_param]
        st = dopt.optimizer.state[dopt.optimizer.param_groups[gi]["params"][go]]
        step = st.pop("step", None) if "step" not in tensors else None
        try:
            orig(model_param, tensors)
        finally:
            if step is not None:
                st["step"] = step

    dopt._set_main_param_and_optimizer_states = set_states

    # Megatron's non-apex load path gives every parameter the *same* ``step`` tensor, and torch's
    # Adam increments each parameter's ``step`` in place: after one more step the count would be
    # off by the number of parameters (a wrong bias correction, so no exact resume). Un-share it.
    orig_load = dopt.load_state_dict

    def load_state_dict(state_dict):
        out = orig_load(state_dict)
        for st in dopt.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
        return out

    dopt.load_state_dict = load_state_dict


class Learner:
    def __init__(self, arch: ModelArch, layout: ParallelLayout, settings: LearnerSettings,
                 weights: str | dict | None = None, *, train: bool = True):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from .convert import load_hf_into_model
        from .model import build_gpt_model

        self.arch, self.layout, self.settings = arch, layout, settings
        extra = dict(settings.megatron or {})
        if "calculate_per_token_loss" in extra:  # transformer_config sets it; the normalisation relies on it
            from ..errors import ConfigError

            raise ConfigError("learner.megatron.calculate_per_token_loss cannot be overridden: losses arrive "
                              "pre-normalised over the whole mini-batch (see megatron_smd.learner.learner)")
        dtype = settings.params_dtype
        self.model = build_gpt_model(arch, attention_backend=settings.attention_backend, params_dtype=dtype, **extra)
        if weights is not None:
            load_hf_into_model(self.model, weights, layout)
        self.optimizer = None
        self.ddp = self.model
        if train:
            cfg = self.model.config
            dist_opt = bool(settings.distributed_optimizer)
            # fp32 main gradients in every precision (grad_reduce_in_fp32); the bf16 optimizer keeps
            # fp32 main parameters and Adam moments (Megatron's Float16OptimizerWithFloat16Params, or
            # the DistributedOptimizer's sharded fp32 copies)
            ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                    use_distributed_optimizer=dist_opt)
            self.ddp = DistributedDataParallel(config=cfg, ddp_config=ddp_cfg, module=self.model)
            opt_cfg = OptimizerConfig(optimizer="adam", lr=settings.lr, min_lr=settings.lr,
                                      weight_decay=settings.weight_decay, adam_beta1=settings.adam_beta1,
                                      adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
                                      clip_grad=settings.grad_clip, bf16=dtype == torch.bfloat16, fp16=False,
                                      params_dtype=dtype, use_distributed_optimizer=dist_opt)
            self.optimizer = get_megatron_optimizer(opt_cfg, [self.ddp])
            if dist_opt:
                _checkpoint_fully_reshardable(self.optimizer)
            cfg.finalize_model_grads_func = _finalize_without_token_scaling
            cfg.no_sync_func = self.ddp.no_sync
            cfg.grad_scale_func = None

    # ----------------------------------------------------------------------------- batching
    def row_length(self, seq_len: int) -> int:
        """Padded row length: a multiple of ``2 * cp`` (CP chunks) and of 8."""
        m = 2 * self.layout.cp
        m = m * 8 // math.gcd(m, 8)
        return int(math.ceil(seq_len / m) * m)

    def microbatches(self, batch: TrainBatch | RolloutBatch, idx: Sequence[int], modes: Sequence[Mode],
                     extras: dict[str, torch.Tensor] | None = None, S: int | None = None) -> list[MicroBatch]:
        """Micro-batches over trajectories ``idx``; every trajectory appears once per entry of
        ``modes`` in the same micro-batch (rows ``[m * b, (m + 1) * b)`` hold mode ``m``), so a
        distillation loss sees the shadow and the dense forward of the same tokens side by side.

        extras: per-token ``[N, T]`` tensors in the batch's alignment (module docstring), or
        per-trajectory ``[N]`` values (an advantage), spread over the trajectory's predictions.
        """
        extras = extras or {}
        if isinstance(batch, RolloutBatch):
            extras = {k: v if v.dim() == 1 else to_model_alignment(v) for k, v in extras.items()}
        batch = as_train_batch(batch)
        S = S or self.row_length(int(batch.seq_lens.max()))
        L = self.arch.num_layers
        per_head = batch.per_head
        H = batch.evict.shape[2] if per_head else None
        mbs = []
        b = self.settings.micro_batch_size
        for k in range(0, len(idx), b):
            ids = list(idx[k:k + b])
            n = len(ids)
            rows = n * len(modes)
            tokens = torch.zeros(rows, S, dtype=torch.int64)
            targets = torch.zeros(rows, S, dtype=torch.int64)
            pos = torch.arange(S).expand(rows, S).clone()
            ev_shape = (rows, L, H, S) if per_head else (rows, L, S)
            evict = torch.full(ev_shape, S, dtype=EVICT_DTYPE)
            ex = {name: torch.zeros(rows, S, dtype=v.dtype) for name, v in extras.items()}
            for m, mode in enumerate(modes):
                for r, i in enumerate(ids):
                    row = m * n + r
                    s = int(batch.seq_lens[i])
                    tokens[row, :s] = batch.tokens[i, :s]
                    targets[row, : s - 1] = batch.tokens[i, 1:s]
                    if mode == "shadow":
                        evict[row, ..., :s] = batch.evict[i, ..., :s]
                    elif mode == "dense":
                        evict[row, ..., :s] = s
                    else:
                        raise ValueError(f"unknown learner mode {mode!r}")
                    for name, v in extras.items():
                        ex[name][row, : s - 1] = v[i] if v.dim() == 1 else v[i, : s - 1]
            mbs.append(MicroBatch(tokens=tokens, position_ids=pos, targets=targets, evict=evict, extras=ex,
                                  kv_quant=batch.kv_replay([mode for mode in modes for _ in ids])))
        return mbs

    def packed_microbatches(self, batch: TrainBatch | RolloutBatch, idx: Sequence[int], mode: Mode
                            ) -> tuple[list[MicroBatch], list[list[tuple[int, int, int]]]]:
        """THD-style packing: ``micro_batch_size`` trajectories end to end in one row of length ``S``.

        ``evict`` becomes absolute in the row ("never evicted" = the end of the key's own sequence),
        so causal + document + eviction masking is the one vector; RoPE positions restart at 0 for
        every sequence. Returns the micro-batches and, per micro-batch, ``(trajectory, start, len)``.
        """
        batch = as_train_batch(batch)
        b = self.settings.micro_batch_size
        groups = [list(idx[k:k + b]) for k in range(0, len(idx), b)]
        S = self.row_length(max(int(batch.seq_lens[g].sum()) for g in groups))
        L = self.arch.num_layers
        lead = (L, batch.evict.shape[2]) if batch.per_head else (L,)
        mbs, where = [], []
        for g in groups:
            tokens = torch.zeros(1, S, dtype=torch.int64)
            targets = torch.zeros(1, S, dtype=torch.int64)
            pos = torch.zeros(1, S, dtype=torch.int64)
            evict = torch.full((1, *lead, S), S, dtype=EVICT_DTYPE)
            off, spans = 0, []
            for i in g:
                s = int(batch.seq_lens[i])
                tokens[0, off:off + s] = batch.tokens[i, :s]
                targets[0, off:off + s - 1] = batch.tokens[i, 1:s]
                pos[0, off:off + s] = torch.arange(s)
                ev = batch.evict[i, ..., :s] if mode == "shadow" else torch.full((*lead, s), s, dtype=EVICT_DTYPE)
                evict[0, ..., off:off + s] = ev + off
                spans.append((i, off, s))
                off += s
            # the padded tail is its own document (see module docstring)
            pos[0, off:] = torch.arange(S - off)
            mbs.append(MicroBatch(tokens=tokens, position_ids=pos, targets=targets, evict=evict,
                                  kv_quant=batch.kv_replay([mode])))
            where.append(spans)
        return mbs, where

    # ----------------------------------------------------------------------------- forward
    @torch.no_grad()
    def logprobs(self, batch: TrainBatch | RolloutBatch, mode: Mode, idx: Sequence[int] | None = None,
                 temperature: float = 1.0, packed: bool = False) -> torch.Tensor:
        """``[len(idx), T]`` log-probs of the batch's tokens, in the batch's alignment (module
        docstring): for a ``TrainBatch`` entry ``t`` is ``log p(tokens[t + 1] | tokens[<= t])`` (0 from
        ``seq_len - 1`` on); for a ``RolloutBatch`` the file's (0 at ``t = 0``)."""
        if isinstance(batch, RolloutBatch):
            return to_file_alignment(self.logprobs(as_train_batch(batch), mode, idx, temperature, packed))
        idx = list(range(len(batch))) if idx is None else list(idx)
        b = self.settings.micro_batch_size
        if packed:
            mbs, where = self.packed_microbatches(batch, idx, mode)
        else:
            mbs = self.microbatches(batch, idx, [mode])
            where = [[(i, r * 0, int(batch.seq_lens[i])) for r, i in enumerate(idx[k:k + b])]
                     for k in range(0, len(idx), b)]
        self.model.eval()
        res = run_microbatches(self.ddp, self.layout, mbs, vocab_size=self.arch.vocab_size, forward_only=True,
                               temperature=temperature)
        T = batch.tokens.shape[1]
        out = torch.zeros(len(idx), T)
        row_of = {i: n for n, i in enumerate(idx)}
        for lp, spans in zip(res.logprobs, where):
            for r, (i, off, s) in enumerate(spans):
                row = 0 if packed else r
                out[row_of[i], : s - 1] = lp[row, off:off + s - 1]
        return out

    # ----------------------------------------------------------------------------- update
    def step(self, microbatches: list[MicroBatch], loss_fn: Callable, temperature: float = 1.0, *,
             term_grads: bool = False) -> dict:
        """One optimizer step: forward+backward over the micro-batches, then clip and update.

        ``term_grads`` (``logging.term_grad_norms``): also return ``term_grad_norms``, the gradient
        norm of each loss term (:meth:`_with_term_grads`); the update is the same either way."""
        assert self.optimizer is not None, "learner was built with train=False"
        self.model.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        acc: dict[str, list[torch.Tensor]] = {}
        if term_grads:
            loss_fn = self._with_term_grads(loss_fn, acc)
        res = run_microbatches(self.ddp, self.layout, microbatches, vocab_size=self.arch.vocab_size,
                               forward_only=False, loss_fn=loss_fn, temperature=temperature)
        term_norms = {name: float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs))) for name, gs in acc.items()}
        ok, grad_norm, _ = self.optimizer.step()
        loss = torch.tensor(sum(res.losses), dtype=torch.float64)
        if self.layout.dp > 1:
            dist.all_reduce(loss, group=self.layout.dp_group)
        return {"loss": float(loss), "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "update_ok": bool(ok), "logprobs": res.logprobs, "term_grad_norms": term_norms}

    def _with_term_grads(self, loss_fn: Callable, acc: dict[str, list[torch.Tensor]]) -> Callable:
        """``loss_fn`` that also sums, over the step's micro-batches, the gradient of each term of
        :func:`~megatron_smd.losses.correction_loss` (``ppo``, ``kl_ref``, ``distill``; each with
        its coefficient) on this rank's parameters, into ``acc[name]`` (one tensor per parameter).
        One extra backward per term and micro-batch (``torch.autograd.grad`` with the graph retained:
        nothing is accumulated into the parameters' gradients, the update is unchanged). The norms
        are of this rank's shard only: exact for a single-rank learner (the CPU comparison)."""
        from ..losses import capture_terms

        params = [p for p in self.model.parameters() if p.requires_grad]

        def wrapped(logp, mb, **kw):
            with capture_terms() as terms:
                out = loss_fn(logp, mb, **kw)
            for name, t in terms.items():
                if not t.requires_grad:
                    continue
                gs = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
                gs = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(gs, params)]
                if name in acc:
                    acc[name] = [a + g for a, g in zip(acc[name], gs)]
                else:
                    acc[name] = gs
            return out

        wrapped.wants_logits = getattr(loss_fn, "wants_logits", False)
        return wrapped

    def reduce_stats(self, local: dict[str, float]) -> dict[str, float]:
        """Sums of per-micro-batch statistics over the whole mini-batch. Collective.

        ``local`` holds this rank's sums over its micro-batches (filled by a loss callback, which
        runs on the last pipeline stage only, on this rank's DP share and CP tokens). The result
        is summed over the data-parallel x context-parallel group of the last stage and broadcast
        along the pipeline, so every rank (global rank 0 included) returns the same totals.
        Tensor-parallel ranks computed identical values and are not summed.
        """
        from megatron.core import parallel_state

        lay = self.layout
        names = sorted(local)
        t = torch.tensor([float(local[k]) for k in names], dtype=torch.float64)
        if not lay.is_last_stage:
            t.zero_()
        if lay.dp * lay.cp > 1:
            dist.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if lay.pp > 1:
            dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=lay.pp_group)
        return {k: float(v) for k, v in zip(names, t.tolist())}

    # ----------------------------------------------------------------------------- weights
    def local_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.named_parameters()}

    def gather_hf_state(self) -> dict[str, torch.Tensor] | None:
        """Full HF state dict on global rank 0 (None elsewhere). Collective over the world.

        Simple gather of every (tp, pp) shard to rank 0: fine for the CPU default and tests; the
        streaming, bucketed resharder for real models is :mod:`megatron_smd.sync`.
        """
        from .convert import megatron_to_hf

        lay = self.layout
        mine = None
        if lay.dp_rank == 0 and lay.cp_rank == 0:
            mine = ((lay.tp_rank, lay.pp_rank), self.local_state())
        if lay.world_size == 1:
            return megatron_to_hf(dict([mine]), self.arch, lay.tp, lay.pp)
        got = [None] * lay.world_size if lay.rank == 0 else None
        dist.gather_object(mine, got, dst=0)
        if lay.rank != 0:
            return None
        return megatron_to_hf(dict(x for x in got if x is not None), self.arch, lay.tp, lay.pp)
