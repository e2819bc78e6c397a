"""``smd sft``: supervised warm start on the synthetic task, with the Megatron learner.

RL on a random model has no signal: every reward is 0 and every group advantage is 0. SFT teaches
the tiny model the task format and enough of the task that GRPO has something to improve. The
result is a Hugging Face directory (``sft.out``), written atomically and reused by later runs
(``smd train`` calls :func:`ensure_sft`, so the main job works on a fresh machine).

Loss: token-mean cross-entropy on the answer and the final ``<eos>`` (the prompt is context only),
Megatron Adam with the ``learner.*`` settings (``sft.lr`` instead of ``learner.lr``, with linear
warm-up), greedy eval on held-out prompts every ``eval_every`` steps; stops early
once eval reward reaches ``target_reward``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ExperimentConfig
from .errors import SMDError
from .learner.batch import TrainBatch
from .learner.settings import learner_settings
from .losses import minibatch_coefficients
from .mask import never_evicted


def sft_batch(examples, tok, num_layers: int) -> TrainBatch:
    """prompt + answer + <eos> as a (dense-mask) batch, no sampler; the answer part (the batch's
    completion) is the target."""
    seqs, plens = [], []
    for e in examples:
        p = tok.encode(e.prompt)
        a = tok.encode(e.answer, add_bos=False) + [tok.eos_id]
        seqs.append(p + a)
        plens.append(len(p))
    T = max(len(s) for s in seqs)
    N = len(seqs)
    tokens = torch.zeros(N, T, dtype=torch.int64)
    evict = torch.zeros(N, num_layers, T, dtype=torch.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
        evict[i, :, : len(s)] = never_evicted(num_layers, len(s))
    return TrainBatch(tokens=tokens, prompt_lens=torch.tensor(plens), seq_lens=torch.tensor([len(s) for s in seqs]),
                      evict=evict)


def greedy_eval(model, task, tok, n: int, seed: int, max_new_tokens: int, policy=None) -> float:
    from .rollout.engine import ReferenceEngine, SamplingParams
    from .rollout.run import generate_scored

    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tok.eos_id,))
    _, _, rewards = generate_scored(ReferenceEngine(model, policy), task, tok, task.sample(n, seed=seed), 1, sp)
    return sum(rewards) / len(rewards)


def run_sft(cfg: ExperimentConfig, layout, model_dir: Path, out: Path, *, log=print,
            fingerprint: dict | None = None) -> dict:
    """Train from ``model_dir`` and write the HF directory ``out``. Collective over the layout."""
    from .learner.learner import Learner
    from .model.hf import read_arch, read_tokenizer_files, save_model_dir
    from .model.transformer import RefTransformer
    from .rollout.run import load_tokenizer
    from .config import check_runnable
    from .tasks import make_task

    sc = cfg.sft
    check_runnable(cfg, "sft", model_dir)
    arch = read_arch(model_dir)
    tok = load_tokenizer(model_dir)
    task = make_task(cfg.task)
    # every learner.* setting but the learning rate (sft.lr, with warm-up) applies to SFT too
    learner = Learner(arch, layout, learner_settings(cfg, lr=sc.lr), weights=str(model_dir))
    rank0 = layout.rank == 0
    history = []
    t0 = time.perf_counter()
    max_new = task.max_answer_tokens() + 2
    reward = 0.0
    for step in range(sc.steps):
        lr = sc.lr * min(1.0, (step + 1) / max(1, sc.warmup_steps))
        for g in learner.optimizer.param_groups:
            g["lr"] = lr
        batch = sft_batch(task.sample(sc.batch_size, seed=7_000_003 + step), tok, arch.num_layers)
        ids = list(range(len(batch)))
        coef = minibatch_coefficients(batch.completion_mask, ids, "token_mean")
        mine = ids[layout.dp_rank::layout.dp]
        mbs = learner.microbatches(batch, mine, ["dense"], {"coef": coef})
        st = learner.step(mbs, lambda logp, mb: (-(logp * mb.extras["coef"]).sum(), int((mb.extras["coef"] > 0).sum())))
        if not torch.isfinite(torch.tensor(st["loss"])):
            raise SMDError(f"sft: non-finite loss at step {step}")
        last = step + 1 == sc.steps
        if (step + 1) % sc.eval_every == 0 or last:
            sd = learner.gather_hf_state()
            if rank0:
                model = RefTransformer.from_state_dict(arch, sd)
                reward = greedy_eval(model, task, tok, 32, 9_000_011, max_new)
            reward = _bcast(reward, layout)
            history.append({"step": step + 1, "loss": st["loss"], "eval_reward": reward})
            if rank0:
                log(f"sft step {step + 1}/{sc.steps}: loss {st['loss']:.4f}  eval reward {reward:.3f}  "
                    f"({time.perf_counter() - t0:.0f}s)")
            if reward >= sc.target_reward:
                break
    sd = learner.gather_hf_state()
    if rank0:
        import json

        extra = read_tokenizer_files(model_dir)
        extra[FINGERPRINT] = json.dumps(fingerprint or sft_fingerprint(cfg, model_dir), indent=2, sort_keys=True)
        save_model_dir(out, arch, sd, extra_files=extra)  # one atomic rename: weights + fingerprint
    if dist.is_initialized():
        dist.barrier()
    return {"history": history, "final_eval_reward": reward, "seconds": time.perf_counter() - t0}


def _bcast(x, layout):
    if layout.world_size == 1:
        return x
    box = [x]
    dist.broadcast_object_list(box, src=0)
    return box[0]


FINGERPRINT = "smd_sft.json"


def sft_fingerprint(cfg: ExperimentConfig, model_dir: Path) -> dict:
    """What an SFT model was trained from and on; a cached one is reused only if this matches: the
    base model, the task, the ``sft.*`` settings and the ``learner.*`` settings SFT uses (all but
    ``learner.lr``: SFT's rate is ``sft.lr``; and ``learner.seed``: SFT's batches are seeded by step
    and its weights start from the base model, so the seed plays no part in what it trains: runs
    that differ only in their RL seed share one warm start)."""
    sc = cfg.sft.model_dump(mode="json")
    sc.pop("out", None)
    sc.pop("enabled", None)
    lc = cfg.learner.model_dump(mode="json")
    lc.pop("lr", None)
    lc.pop("seed", None)
    return {"base_model": str(Path(model_dir).resolve()), "task": cfg.task.model_dump(mode="json"), "sft": sc,
            "learner": lc}


def ensure_sft(cfg: ExperimentConfig, layout, model_dir: Path) -> Path:
    """The starting weights of RL: the cached SFT model (trained now if missing), or the base model.

    The cache records what it was trained on (``smd_sft.json``); a cache made for another task,
    base model or SFT setting is refused rather than silently reused."""
    import json

    from .errors import ConfigError

    if not cfg.sft.enabled:
        return Path(model_dir)
    out = Path(cfg.sft.out)
    want = sft_fingerprint(cfg, model_dir)
    if (out / "config.json").is_file():
        fp = out / FINGERPRINT
        have = json.loads(fp.read_text()) if fp.is_file() else None
        if have != want:
            diff = sorted(k for k in want if (have or {}).get(k) != want[k])
            raise ConfigError(f"sft.out: {out} holds an SFT model trained with a different {', '.join(diff)} "
                              f"(see {fp}); delete it or point sft.out elsewhere")
        return out
    if layout.rank == 0:
        print(f"[smd] no SFT warm start at {out}: training one ({cfg.sft.steps} steps)", flush=True)
    run_sft(cfg, layout, Path(model_dir), out, fingerprint=want)
    return out
