"""``smd train``: GRPO with a Megatron-Core learner and a compressed-KV rollout engine.

Run it (CPU, the embedded default: tiny Qwen2, SFT warm start included)::

    smd train --config configs/tiny-cpu.yaml
    torchrun --nproc_per_node 2 -m megatron_smd.cli train --config configs/tiny-cpu.yaml resources.tp=2

The loop (:func:`train`) reads like the algorithm: rollout (with eviction) -> reward -> group-relative
advantages -> learner update (PPO-clip epochs x mini-batches, micro-batches, gradient accumulation,
clipping, Megatron Adam) -> weight sync (learner shards -> engine) -> periodic eval (greedy, dense and
compressed) -> periodic checkpoint. How the learner treats the sparse rollout is the correction mode
(``algorithm.correction``, see :mod:`megatron_smd.losses`).

Departures from the textbook: the PPO ratio's denominator is the *sampler's* log-prob for ``dense``,
``naive`` and ``smd`` (the rollout engine's numbers, as verl/slime do with rollout log-probs), and the
learner's own dense log-prob before the update for ``tis`` and ``sparse_rl`` (whose correction
weights then bridge dense-old to sampler). In ``smd`` the learner forward replays the rollout's
shadow mask, so that ratio starts at exactly 1.

The reference rollout engine lives on global rank 0; every rank receives the rollout batch and each
data-parallel rank trains on its share of it.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import yaml

from .config import ExperimentConfig
from .errors import ConfigError, SMDError
from .learner.batch import TrainBatch, as_train_batch, from_trajectories
from .learner.settings import learner_settings
from .losses import (apply_correction, correction_loss, distills, group_advantages, learner_mode,
                     minibatch_coefficients, mismatch_metrics)
from .mask import kept_fraction
from .metrics import NullLogger, make_logger, mask_image
from .parallel.layout import ParallelLayout, free_port, launched_by_torchrun
from .rollout.drills import set_drill_step, start_drills
from .train_display import show
from .rollout.engine import RolloutStats
from .rollout.engine_api import RemoteRolloutEngine, RolloutEngine
from .rollout.faults import ServerFault, ServerFaults
from .rollout.io import RolloutBatch
from .rollout.run import ensure_model_once, rollout_kv_cache, rollout_policy  # noqa: F401  (ensure_model_once: smd sft too)

if TYPE_CHECKING:
    from tqdm import tqdm

    from .learner.learner import Learner
    from .model.tokenizer import CharTokenizer
    from .rollout.engine import ReferenceEngine
    from .sync import WeightSync
    from .tasks import Task


# ============================================================================================ loop
def train(cfg: ExperimentConfig, *, resume: str | None = "auto") -> dict:
    """Run (or continue) the RL loop; returns the final eval metrics and history on rank 0."""
    start_drills()  # drills name this run's steps; its start-up sync is step 0
    ctx = setup(cfg, resume=resume)
    try:
        if ctx.start_step == 0:
            log_eval_only(ctx, evaluate(ctx, 0))                         # the warm start's eval: step 0
        for step in range(ctx.start_step, cfg.train.steps):
            raise_if_stop_requested()                                    # a SIGTERM whose raise was swallowed
            set_drill_step(step + 1)
            t, t0 = {}, time.perf_counter()
            ro = rollout(ctx, step)                                      # sample with eviction
            t["rollout"] = time.perf_counter() - t0
            adv = advantages(ctx, ro.batch)                              # reward -> group-relative advantages
            t1 = time.perf_counter()
            stats = learn(ctx, ro.batch, adv, step)                      # PPO/GRPO update on the learner
            t["learn"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            stats.update(sync_weights(ctx, step + 1))                    # learner shards -> rollout engine
            t["sync"] = time.perf_counter() - t2
            last = step + 1 == cfg.train.steps
            if last or (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0):
                stats.update(evaluate(ctx, step + 1))                    # greedy, dense and compressed
            log_step(ctx, step + 1, ro, stats, t)
            if last or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
                save(ctx, step + 1)                                      # model + optimizer + loop state
        return {"history": ctx.history, "final": ctx.history[-1] if ctx.history else {}}
    finally:
        ctx.close()


# ============================================================================================ setup
@dataclass
class Context:
    cfg: ExperimentConfig
    layout: ParallelLayout
    learner: Learner
    ref_learner: Learner | None  # algorithm.kl_coef > 0
    engine: RolloutEngine | None  # rank 0 only
    eval_engines: dict[str, ReferenceEngine] = field(default_factory=dict)  # rank 0 only
    task: Task | None = None
    tok: CharTokenizer | None = None
    logger: NullLogger = field(default_factory=NullLogger)  # a TensorBoardLogger on rank 0
    start_step: int = 0
    history: list[dict] = field(default_factory=list)
    ckpt_root: Path = Path(".")
    run_dir: Path = Path(".")
    bar: tqdm | None = None
    last_ckpt: str | None = None
    sync: WeightSync | None = None
    probe_tokens: torch.Tensor | None = None  # sync.verify: the probe batch of every staged sync
    faults: ServerFaults | None = None  # rollout.backend: sglang

    @property
    def rank0(self) -> bool:
        return self.layout.rank == 0

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
        if self.bar is not None:
            self.bar.close()
        self.logger.close()
        self.layout.destroy()


def init_layout(cfg: ExperimentConfig, arch) -> ParallelLayout:
    r = cfg.resources
    if r.cpu_threads is not None:
        torch.set_num_threads(r.cpu_threads)
    if not launched_by_torchrun():
        # Single process, not under torchrun: the rendezvous port only has to be free, and a port
        # inherited from a parent (or left by an earlier run in this process) may not be.
        os.environ["MASTER_PORT"] = str(free_port())
    layout = ParallelLayout.from_env(tp=r.tp, pp=r.pp, cp=r.cp)
    if layout.dp != r.dp:
        raise ConfigError(
            f"resources: tp*pp*cp*dp = {r.tp}*{r.pp}*{r.cp}*{r.dp} = {r.learner_world_size} learner ranks, but this job "
            f"has {layout.world_size} process(es) (launch with torchrun --nproc_per_node {r.learner_world_size})")
    layout.validate(arch, seq_len=None)
    layout.initialize(seed=cfg.learner.seed)
    return layout


def setup(cfg: ExperimentConfig, *, resume: str | None) -> Context:
    from .config import check_runnable
    from .model.hf import read_arch

    run_dir = Path(cfg.output_dir)
    model_dir = ensure_model_once(cfg)
    check_runnable(cfg, "train", model_dir)  # on every rank, before any group: settings a run would not honour
    arch = read_arch(model_dir)
    layout = init_layout(cfg, arch)
    try:
        return _setup_on_layout(cfg, layout, arch, model_dir, run_dir, resume)
    except BaseException:
        layout.destroy()  # a failed start must not leave process groups behind for the next run
        raise


def _setup_on_layout(cfg: ExperimentConfig, layout, arch, model_dir, run_dir: Path, resume) -> Context:
    from .checkpoint import apply_optimizer_settings, check_resume, find_checkpoint, load_checkpoint
    from .config import dump_config
    from .learner.learner import Learner
    from .model.transformer import RefTransformer
    from .rollout.engine import torch_dtype
    from .rollout.run import load_tokenizer, sglang_client, training_engine
    from .sft import ensure_sft
    from .tasks import make_task

    start = ensure_sft(cfg, layout, model_dir)
    learner = Learner(arch, layout, learner_settings(cfg), weights=str(start))
    ref = None
    if cfg.algorithm.kl_coef > 0:
        ref = Learner(arch, layout, learner_settings(cfg), weights=str(start), train=False)
    ctx = Context(cfg=cfg, layout=layout, learner=learner, ref_learner=ref, engine=None, run_dir=run_dir,
                  ckpt_root=run_dir / "checkpoints")
    ctx.task = make_task(cfg.task)
    ctx.tok = load_tokenizer(Path(model_dir))
    ckpt = find_checkpoint(ctx.ckpt_root, resume)
    if ckpt is not None:
        saved = check_resume(ckpt, cfg, arch)  # another model, architecture or TP/PP layout: refused
        state = load_checkpoint(ckpt, learner.model, learner.optimizer)
        ctx.start_step, ctx.history, ctx.last_ckpt = int(state["step"]), list(state.get("history", [])), str(ckpt)
        # this run's optimizer settings, not the checkpoint's, drive the steps from here
        changed = apply_optimizer_settings(learner.optimizer, cfg.learner, saved.get("learner"))
        if changed and layout.rank == 0:
            print(f"[smd] resuming {ckpt} with changed optimizer settings (applied to the restored optimizer): "
                  + "; ".join(changed), flush=True)
    ctx.probe_tokens = verify_probe(ctx)
    if ctx.rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        model = RefTransformer.from_pretrained(start, dtype=torch_dtype(cfg.model.dtype))  # model.dtype
        if cfg.rollout.backend == "sglang":
            ctx.engine = sglang_client(cfg, arch.num_layers, rollout_policy(cfg), rollout_kv_cache(cfg, arch.num_layers, start))
        else:
            ctx.engine = training_engine(cfg, model, start)  # policy, kv_growth, FP8 KV cache (scales vs start)
        ctx.eval_engines = eval_engines(cfg, model)
        ctx.logger = make_logger("tensorboard" if cfg.logging.tensorboard else "none", run_dir / "tensorboard")
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            ctx.bar = tqdm(total=cfg.train.steps, initial=ctx.start_step, desc=f"train[{cfg.algorithm.correction}]",
                           dynamic_ncols=True)
    ctx.sync = make_weight_sync(ctx, arch)
    if cfg.rollout.backend == "sglang":
        ctx.faults = make_server_faults(ctx)
    if ckpt is not None or cfg.rollout.backend == "sglang":
        # the engine must sample from the learner's policy: a restored checkpoint, or (servers
        # started from model.path) the warm start
        sync_weights(ctx, ctx.start_step)
    return ctx


def eval_engines(cfg: ExperimentConfig, model) -> dict:
    """The periodic evals' engines, dense and with the configured compression (eviction policy and
    FP8 KV cache; ``rollout.kv_growth`` applies to both)."""
    from .rollout.engine import ReferenceEngine, kv_cache_of

    g, kv = cfg.rollout.kv_growth, kv_cache_of(cfg, model.arch.num_layers)
    return {"dense": ReferenceEngine(model, None, kv_growth=g),
            "compressed": ReferenceEngine(model, cfg.rollout.policy, kv_growth=g, kv_cache=kv)}


def verify_probe(ctx: Context) -> torch.Tensor | None:
    """``sync.verify`` with a staged transport (``inprocess``, ``disk``): the probe batch whose logits
    the engine computes on the staged weights and compares with the learner's before it commits
    (to servers, the probe trajectory after every sync plays that part). The same tokens on every
    rank (the first eval prompt)."""
    cfg = ctx.cfg
    if not cfg.sync.verify or cfg.sync.transport not in ("inprocess", "disk"):
        return None
    ex = ctx.task.sample(1, seed=10_000_019 + cfg.task.seed)[0]
    return torch.tensor([ctx.tok.encode(ex.prompt)], dtype=torch.int64)


def make_weight_sync(ctx: Context, arch) -> WeightSync:
    from .rollout.run import sglang_urls
    from .sync import WeightSync

    cfg = ctx.cfg
    sglang = {"urls": sglang_urls(cfg)} if cfg.sync.transport == "sglang" else None
    return WeightSync.from_config(cfg.sync, ctx.learner.model, ctx.layout, arch,
                                  engine=ctx.engine if ctx.rank0 else None, sglang=sglang)


def make_server_faults(ctx: Context) -> ServerFaults:
    """Retries of failed rollouts and syncs against the servers (``rollout.faults``)."""
    from .rollout.run import sglang_urls

    def retarget(urls):
        ctx.sync.retarget(urls)  # every rank: the next sync builds a new weight-update group
        if ctx.rank0:
            engine = _remote(ctx)
            engine.urls = list(urls)
            engine.check_policy(rollout_policy(ctx.cfg).model_dump(mode="json"))

    return ServerFaults(ctx.cfg.rollout.faults, sglang_urls(ctx.cfg), rank0=ctx.rank0,
                        bcast=lambda obj: _broadcast(obj, ctx), retarget=retarget,
                        last_checkpoint=lambda: ctx.last_ckpt)


def _remote(ctx: Context) -> RemoteRolloutEngine:
    """Rank 0's engine when it is the client of rollout servers (``rollout.backend: sglang``)."""
    assert isinstance(ctx.engine, RemoteRolloutEngine), "rollout.backend sglang has a server client"
    return ctx.engine


# ============================================================================================ phases
def _broadcast(obj, ctx: Context):
    if ctx.layout.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class StepRollout:
    """One step's rollout as every rank receives it: the learner's batch and what the log shows."""

    batch: TrainBatch
    kv: RolloutStats  # the engine's KV memory and throughput
    samples: list[tuple[str, str]]  # (prompt, completion) texts for the log (logging.sample_text)


def rollout(ctx: Context, step: int) -> StepRollout:
    """Rank 0 samples ``num_prompts x group_size`` trajectories; every rank gets the batch. From
    servers, a failed attempt is discarded whole and the step's prompts sampled again after a
    re-sync (:class:`~megatron_smd.rollout.faults.ServerFaults`)."""
    if ctx.faults is None:
        return _broadcast(_sample(ctx, step) if ctx.rank0 else None, ctx)
    return ctx.faults.rollout(step + 1, lambda: _sample(ctx, step), resync=lambda: sync_weights(ctx, step))


def _sample(ctx: Context, step: int) -> StepRollout:
    from .rollout.run import generate_scored, sampling_params

    cfg = ctx.cfg
    examples = ctx.task.sample(cfg.rollout.num_prompts, seed=cfg.task.seed * 1_000_003 + step)
    sp = sampling_params(cfg, ctx.tok.eos_id)
    sp.seed = cfg.rollout.seed * 7919 + step
    try:
        trajs, st, rewards = generate_scored(ctx.engine, ctx.task, ctx.tok, examples, cfg.rollout.group_size, sp)
    finally:
        if ctx.faults is not None:
            ctx.faults.counts["invalid_masks"] = _remote(ctx).invalid_outputs
    k = cfg.logging.sample_text
    samples = list(zip([e.prompt for e in examples[:k]], [ctx.tok.decode(t.tokens[t.prompt_len:]) for t in trajs[:k]]))
    return StepRollout(batch=from_trajectories(trajs, rewards=rewards, temperature=sp.temperature), kv=st,
                       samples=samples)


def advantages(ctx: Context, batch: TrainBatch | RolloutBatch) -> torch.Tensor:
    batch = as_train_batch(batch)
    return group_advantages(batch.rewards, batch.group_ids, normalize_std=ctx.cfg.algorithm.normalize_adv_std)


def learn(ctx: Context, batch: TrainBatch | RolloutBatch, adv: torch.Tensor, step: int) -> dict:
    """PPO-clip epochs x mini-batches over the rollout with the configured correction mode
    (:func:`~megatron_smd.losses.apply_correction`, :func:`~megatron_smd.losses.correction_loss`).
    Every per-token tensor here is in the learner's alignment (:mod:`megatron_smd.learner.batch`)."""
    batch = as_train_batch(batch)
    cfg, alg, learner, lay = ctx.cfg, ctx.cfg.algorithm, ctx.learner, ctx.layout
    temp = batch.temperature
    lmode = learner_mode(alg.correction)
    mask, lp_s = batch.completion_mask, batch.sampler_logprobs
    # The learner's own view of the rollout at the parameters that sampled it (first micro-step).
    lp_mode_old = learner.logprobs(batch, lmode, temperature=temp)
    stats = {f"mismatch/{k}": v for k, v in mismatch_metrics(lp_mode_old, lp_s, mask).items()}
    lp_dense_old = lp_mode_old
    if lmode == "shadow":
        lp_dense_old = learner.logprobs(batch, "dense", temperature=temp)
        stats.update({f"mismatch_dense/{k}": v for k, v in mismatch_metrics(lp_dense_old, lp_s, mask).items()})
    corr = apply_correction(alg, lp_sampler=lp_s, lp_dense_old=lp_dense_old, mask=mask)
    stats.update(corr.stats | batch.replay_check(lp_mode_old, lmode))  # an FP8 rollout: replay/fp8_* (smd)
    extras = {"adv": adv, "lp_old": corr.lp_old, "w": corr.weights, "lp_s": lp_s}  # adv: one per trajectory
    if ctx.ref_learner is not None:
        extras["lp_ref"] = ctx.ref_learner.logprobs(batch, lmode, temperature=temp)
    distill = distills(alg)
    modes = [lmode, "dense"] if distill else [lmode]
    acc = {"clip_frac": [], "grad_norm": [], "loss": [], "distill_kl": [], "kl_ref": []}
    N = len(batch)
    first = True
    for epoch in range(alg.epochs):
        g = torch.Generator().manual_seed(cfg.learner.seed * 1_000_003 + step * 101 + epoch)
        perm = torch.randperm(N, generator=g).tolist()
        size = math.ceil(N / alg.minibatches)
        for k in range(0, N, size):
            ids = perm[k:k + size]
            ex = dict(extras, coef=minibatch_coefficients(corr.mask, ids, alg.aggregation))
            mine = ids[lay.dp_rank::lay.dp]
            mbs = learner.microbatches(batch, mine, modes, ex)
            parts = dict.fromkeys(_STAT_SUMS, 0.0)  # sums over this rank's micro-batches (last stage)
            fn = _loss_fn(alg, len(modes), parts, learner.arch.vocab_size, temp)
            st = learner.step(mbs, fn, temperature=temp, term_grads=cfg.logging.term_grad_norms)
            # every micro-batch of every DP (x CP) rank, taken from the last pipeline stage: the same
            # numbers under any layout and micro-batch split (collective)
            tot = learner.reduce_stats(parts)
            if not (math.isfinite(st["loss"]) and math.isfinite(st["grad_norm"])):
                raise SMDError(f"non-finite loss ({st['loss']}) or grad norm ({st['grad_norm']}) at step {step + 1}, "
                               f"epoch {epoch}; nothing was saved for this step (last checkpoint: {ctx.last_ckpt})")
            if first:
                stats.update(_first_step_ratio(st["logprobs"][0], mbs[0], len(modes)))
                first = False
            acc["grad_norm"].append(st["grad_norm"])
            for name, v in st["term_grad_norms"].items():  # logging.term_grad_norms: train/grad_norm_<term>
                acc.setdefault(f"grad_norm_{name}", []).append(v)
            acc["loss"].append(st["loss"])
            acc["clip_frac"].append(tot["clip_count"] / max(tot["action_tokens"], 1.0))
            if distill:
                acc["distill_kl"].append(tot["distill_sum"] / max(tot["coef_sum"], 1e-12))
            if ctx.ref_learner is not None and alg.kl_coef > 0:
                acc["kl_ref"].append(tot["kl_ref_sum"] / max(tot["coef_sum"], 1e-12))
    for name, vals in acc.items():
        if vals:
            stats[f"train/{name}"] = sum(vals) / len(vals)
    stats["train/grad_norm_max"] = max(acc["grad_norm"])
    r = batch.rewards
    resp = (batch.seq_lens - batch.prompt_lens).float()
    stats.update({"reward/train": float(r.mean()), "accuracy/train": float((r >= 1.0).float().mean()),
                  "train/response_length": float(resp.mean()),
                  "policy/entropy_mc": float(-(lp_s[batch.completion_mask]).mean())})
    return stats


# Per-micro-batch sums the loss callback accumulates; :meth:`Learner.reduce_stats` sums them over
# every micro-batch and DP (x CP) rank. Ratios are formed only from the totals, so a statistic is
# the same whatever the micro-batch split or the layout.
_STAT_SUMS = ("clip_count", "action_tokens", "distill_sum", "kl_ref_sum", "coef_sum")


def _loss_fn(alg, n_modes: int, parts: dict, vocab_size: int | None = None, temperature: float = 1.0):
    """The per-micro-batch loss (Megatron calls it on the last stage with ``logp [rows, s_local]``;
    ``logits`` are the vocab-parallel ``[rows, s_local, Vp/tp]`` logits at the temperature's scale,
    used by the full-vocabulary distillation KL): :func:`~megatron_smd.losses.correction_loss` on
    the micro-batch's rows. ``parts`` accumulates :data:`_STAT_SUMS`."""
    from .parallel.vocab_parallel import vocab_parallel_distill_kl

    d = alg.distill
    full = d.estimator == "full" and n_modes == 2

    def loss_fn(logp: torch.Tensor, mb, logits: torch.Tensor | None = None):
        ex = mb.extras
        n = logp.shape[0] // n_modes  # rows [0, n): the trained forward; [n, 2n): the dense one (distillation)
        loss, sums, ntok = correction_loss(
            alg, logp[:n], lp_old=ex["lp_old"][:n], adv=ex["adv"][:n], coef=ex["coef"][:n], weights=ex["w"][:n],
            lp_ref=ex["lp_ref"][:n] if "lp_ref" in ex else None, lp_dense=logp[n:] if n_modes == 2 else None,
            full_kl_per_token=vocab_parallel_distill_kl(logits[:n], logits[n:], vocab_size=vocab_size,
                                                        direction=d.direction, temperature=temperature) if full else None)
        for k, v in sums.items():
            parts[k] += v
        return loss, ntok

    loss_fn.wants_logits = full
    return loss_fn


def _first_step_ratio(lp_rows: torch.Tensor, mb, n_modes: int) -> dict:
    """PPO ratio pi_learner / pi_sampler on the first micro-batch of the update (before any step)."""
    n = lp_rows.shape[0] // n_modes
    m = mb.extras["coef"][:n] > 0
    d = (lp_rows[:n] - mb.extras["lp_s"][:n])[m]
    if d.numel() == 0:
        return {}
    r = d.exp()
    return {"ratio_first/mean": float(r.mean()), "ratio_first/max_abs_dev": float((r - 1).abs().max())}


def sync_weights(ctx: Context, version: int = 0) -> dict:
    """Learner shards -> rollout engine through :mod:`megatron_smd.sync` (streaming, bucketed,
    staged and committed all-or-nothing; ``sync.verify`` adds checksums). Collective. To servers,
    every sync ends with the probe compare, and a failed one is retried after the servers answer
    again (``rollout.faults``)."""
    from .sync.staging import WeightSyncError

    if ctx.faults is not None:
        return ctx.faults.sync(version, lambda: _sync_and_probe(ctx, version), sync_errors=(WeightSyncError,))
    try:
        report = ctx.sync.sync(version, probe_tokens=ctx.probe_tokens)
    except WeightSyncError as e:  # staged updates commit all-or-nothing: the engine is unchanged
        raise SMDError(f"weight sync after step {version} failed ({e}); the engine keeps its previous "
                       f"weights (engine state: {getattr(e, 'engine_state', 'unknown')}; last checkpoint: "
                       f"{ctx.last_ckpt})") from None
    out = report.metrics()
    if report.probe_max_abs_diff is not None:  # sync.verify's probe batch
        out["sync/probe_max_abs_logit_diff"] = report.probe_max_abs_diff
    return out


def _sync_and_probe(ctx: Context, version: int) -> dict:
    out = ctx.sync.sync(version).metrics()
    out.update(probe_engine(ctx, version))
    return out


def probe_atol(cfg: ExperimentConfig) -> float:
    return cfg.rollout.faults.probe_atol or (1e-4 if cfg.model.dtype == "float32" else 0.25)


def probe_engine(ctx: Context, version: int) -> dict:
    """After a sync to remote servers: sample one probe trajectory on every server and replay it
    with the learner under its shadow mask. Equal log-probs (the fp32 floor, ~1e-6) prove the
    servers hold the learner's weights; a gap above ``rollout.faults.probe_atol`` raises
    :class:`ServerFault` on every rank. Collective."""
    from .rollout.run import sampling_params

    probe = None
    if ctx.rank0:
        ex = ctx.task.sample(1, seed=20_000_003 + version)
        sp = sampling_params(ctx.cfg, ctx.tok.eos_id)
        urls = list(_remote(ctx).urls)
        try:  # one prompt per server (the client spreads prompts round-robin)
            trajs, _ = ctx.engine.generate([ctx.tok.encode(ex[0].prompt)] * len(urls), n=1, sampling=sp)
            probe = ("ok", (from_trajectories(trajs, temperature=sp.temperature), urls))
        except ServerFault as e:
            probe = ("fault", (f"probe after weight sync v{version}: {e}", e.url))
    kind, val = _broadcast(probe, ctx)
    if kind == "fault":
        raise ServerFault(*val)
    batch, urls = val
    lp = ctx.learner.logprobs(batch, "shadow", temperature=batch.temperature)
    diff = (lp.detach().double() - batch.sampler_logprobs.double()).abs()
    gap_rows = torch.where(batch.completion_mask, diff, torch.zeros_like(diff)).amax(dim=1)
    gap, worst = float(gap_rows.max()), int(gap_rows.argmax())
    atol = probe_atol(ctx.cfg)
    if _broadcast(gap > atol, ctx):
        raise ServerFault(f"probe after weight sync v{version}: {urls[worst]} samples log-probs "
                          f"{gap:.2e} away from the learner's (> rollout.faults.probe_atol {atol:.0e}): it does "
                          f"not hold the learner's weights", urls[worst])
    return {"sync/probe_max_abs_logprob_diff": gap}


def evaluate(ctx: Context, step: int) -> dict:
    """Greedy decoding on a fixed held-out prompt set, dense and with the configured compression."""
    from .rollout.engine import SamplingParams
    from .rollout.run import generate_scored

    out = {}
    if ctx.cfg.rollout.backend != "reference":
        # the weight sync feeds remote servers; the local eval engines get the learner's weights here
        from .model.transformer import RefTransformer

        sd = ctx.learner.gather_hf_state()  # collective
        if ctx.rank0:
            model = RefTransformer.from_state_dict(ctx.learner.arch, sd)
            ctx.eval_engines = eval_engines(ctx.cfg, model)
    if ctx.rank0:
        cfg = ctx.cfg
        examples = ctx.task.sample(cfg.train.eval_prompts, seed=10_000_019 + cfg.task.seed)
        sp = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0,
                            stop_token_ids=(ctx.tok.eos_id,) if cfg.rollout.stop_at_eos else ())
        for name, eng in ctx.eval_engines.items():
            _, st, rs = generate_scored(eng, ctx.task, ctx.tok, examples, 1, sp)
            out[f"reward/eval_{name}"] = sum(rs) / len(rs)
            out[f"accuracy/eval_{name}"] = sum(r >= 1.0 for r in rs) / len(rs)
            out[f"kv/eval_{name}_peak_bytes"] = st.peak_kv_bytes
    return _broadcast(out, ctx)


def log_step(ctx: Context, step: int, ro: StepRollout, stats: dict, t: dict) -> None:
    if not ctx.rank0:
        return
    cfg, batch, kv = ctx.cfg, ro.batch, ro.kv
    stats = dict(stats)
    stats.update({"kv/peak_bytes": kv.peak_kv_bytes, "kv/peak_bytes_used": kv.peak_kv_bytes_used,
                  "perf/rollout_tokens_per_s": kv.tokens_per_s})
    stats.update({f"time/{k}_s": v for k, v in t.items()})
    kf = torch.stack([kept_fraction(batch.evict_of(n), int(batch.prompt_lens[n])) for n in range(len(batch))]).mean(0)
    if kf.dim() > 1:
        kf = kf.mean(-1)
    for li, v in enumerate(kf.tolist()):
        stats[f"kv/kept_fraction_layer{li}"] = v
    ctx.logger.log(stats, step)
    ctx.logger.histogram("kv/kept_fraction", kf, step)
    L = batch.evict.shape[1]
    for n in range(min(cfg.logging.mask_images, len(batch))):
        ev = batch.evict_of(n)
        for li in sorted({0, L - 1}):
            e = ev[li] if ev.dim() == 2 else ev[li, 0]
            ctx.logger.image(f"mask/traj{n}_layer{li}", mask_image(e), step)
    for i, (p, c) in enumerate(ro.samples):
        ctx.logger.text(f"samples/{i}", f"**prompt** `{p[-80:]}`  \n**completion** `{c}`", step)
    ctx.logger.flush()
    rec = {"step": step, **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}
    ctx.history.append(rec)
    if ctx.bar is not None:
        post = {"reward": f"{stats['reward/train']:.2f}", "gap": f"{stats['mismatch/max_abs_logprob_diff']:.1e}",
                "gnorm": f"{stats['train/grad_norm']:.2f}"}
        show(ctx.bar, ctx.history, stats, post, step, cfg.train.steps)


def log_eval_only(ctx: Context, stats: dict) -> None:
    """Step-0 record: the eval of the starting weights, so curves start at the SFT model."""
    if ctx.rank0:
        ctx.logger.log(stats, 0)
        ctx.history.append({"step": 0, **stats})
        if ctx.bar is not None:
            show(ctx.bar, ctx.history, stats, {}, 0, -1)


def save(ctx: Context, step: int) -> None:
    from .checkpoint import run_identity, save_checkpoint

    cfg_yaml = yaml.safe_dump(ctx.cfg.model_dump(mode="json"), sort_keys=False)
    # history only travels on rank 0; the loop state written by rank 0 is the one that counts
    state = {"history": ctx.history, "run": run_identity(ctx.cfg, ctx.learner.arch)}  # compared on resume
    path = save_checkpoint(ctx.ckpt_root, step, ctx.learner.model, ctx.learner.optimizer,
                           state, cfg_yaml, keep=ctx.cfg.train.keep_checkpoints)
    ctx.last_ckpt = str(path)


_STOP_SIGNAL: int | None = None


def install_signal_handlers() -> None:
    """SIGTERM (Slurm preemption, ``kill``) is handled like Ctrl-C: a clear message, exit code 130.
    Checkpoints are atomic, so nothing already written is lost.

    The handler both records the signal and raises. Python swallows an exception raised while it
    runs certain callbacks (a fork handler, a finaliser: "Exception ignored in ..."), so the loop
    also asks :func:`raise_if_stop_requested` at every step boundary: a SIGTERM is never lost."""

    def _raise(signum, frame):
        global _STOP_SIGNAL
        _STOP_SIGNAL = signum
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


def raise_if_stop_requested() -> None:
    if _STOP_SIGNAL is not None:
        raise KeyboardInterrupt(f"signal {_STOP_SIGNAL}")
