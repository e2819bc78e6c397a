"""``smd rollout``: sample a batch of the configured task with the configured engine and policy, and
write it in the rollout format (:mod:`megatron_smd.rollout.io`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ExperimentConfig, ModelConfig
from ..errors import FormatError
from ..model.hf import read_arch
from .engine import ReferenceEngine, SamplingParams, kv_cache_of
from .engine_api import RemoteRolloutEngine, RolloutEngine
from .io import RolloutBatch, save_rollouts


def ensure_model(mc: ModelConfig) -> Path:
    """Return the model directory, creating the tiny random model first if the preset says how."""
    path = Path(mc.path)
    if not path.exists() and mc.init is not None:
        from ..model.tiny import init_model_dir

        kw = mc.init.model_dump()
        arch = kw.pop("arch")
        seed = kw.pop("seed")
        init_model_dir(path, arch, seed=seed, **kw)
    if not path.exists():
        raise FormatError(f"{path}: model directory does not exist (model.path)")
    read_arch(path)  # fail early, naming the file
    return path


def ensure_model_once(cfg: ExperimentConfig) -> Path:
    """:func:`ensure_model` on the job's rank 0 only; the other ranks wait for the directory."""
    import time

    from ..errors import SMDError
    from ..parallel.layout import env_rank

    if env_rank() == 0:
        return ensure_model(cfg.model)
    path = Path(cfg.model.path)
    for _ in range(600):
        if (path / "config.json").is_file():
            return path
        time.sleep(0.5)
    raise SMDError(f"{path}: rank 0 did not create the model directory within 5 minutes")


def load_tokenizer(model_dir: Path):
    from ..model.tokenizer import CharTokenizer

    f = model_dir / "tokenizer.json"
    if not f.is_file():
        raise FormatError(f"{f}: missing (the reference engine needs the model's tokenizer)")
    return CharTokenizer.from_file(f)


def sampling_params(cfg: ExperimentConfig, eos_id: int | None, max_new_tokens: int | None = None) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        max_new_tokens=max_new_tokens or r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
        top_k=r.top_k, stop_token_ids=(eos_id,) if (r.stop_at_eos and eos_id is not None) else (), seed=r.seed,
    )


def generate_scored(engine, task, tok, examples, n: int, sp: SamplingParams):
    """Sample ``n`` completions per example and score each with the task's exact reward.

    Returns ``(trajectories, stats, rewards)``; a completion is scored on its decoded text without
    special tokens (the final ``<eos>`` is an action, not part of the answer)."""
    trajs, stats = engine.generate([tok.encode(e.prompt) for e in examples], n=n, sampling=sp)
    rewards = [task.reward(examples[t.prompt_index], tok.decode(t.tokens[t.prompt_len:])) for t in trajs]
    return trajs, stats, rewards


def sglang_urls(cfg: ExperimentConfig) -> list[str]:
    """The servers of ``rollout.sglang_urls``, or ``SMD_ROLLOUT_URL`` set by the launchers after
    their health checks."""
    import os

    from ..errors import SMDError

    urls = list(cfg.rollout.sglang_urls)
    if not urls and os.environ.get("SMD_ROLLOUT_URL"):
        urls = [os.environ["SMD_ROLLOUT_URL"]]
    if not urls:
        raise SMDError("rollout.backend=sglang needs rollout.sglang_urls (the servers' base URLs), "
                       "or SMD_ROLLOUT_URL from the launchers")
    return urls


def rollout_policy(cfg: ExperimentConfig):
    """The eviction policy ``smd train`` samples with: none for ``algorithm.correction: dense``, else
    ``rollout.policy``."""
    from ..policies import PolicyConfig

    return PolicyConfig() if cfg.algorithm.correction == "dense" else cfg.rollout.policy


def rollout_kv_cache(cfg: ExperimentConfig, num_layers: int, weights_dir: Path | str | None = None):
    """The FP8 KV cache ``smd train`` samples with: none for ``algorithm.correction: dense`` (the
    uncompressed baseline, like :func:`rollout_policy`), else ``rollout.kv_cache_dtype`` with
    ``rollout.kv_scales`` (checked against ``weights_dir``, the weights the engine starts from)."""
    return None if cfg.algorithm.correction == "dense" else kv_cache_of(cfg, num_layers, weights_dir)


def training_engine(cfg: ExperimentConfig, model, weights_dir: Path | str) -> ReferenceEngine:
    """``smd train``'s reference engine on ``model`` (loaded from ``weights_dir``): :func:`rollout_policy`,
    ``rollout.kv_growth`` and :func:`rollout_kv_cache`."""
    return ReferenceEngine(model, rollout_policy(cfg), kv_growth=cfg.rollout.kv_growth,
                           kv_cache=rollout_kv_cache(cfg, model.arch.num_layers, weights_dir))


def sglang_client(cfg: ExperimentConfig, num_layers: int, policy=None, kv_cache="config",
                  weights_dir: Path | str | None = None) -> RemoteRolloutEngine:
    """The client of the patched SGLang servers (:func:`sglang_urls`), checked to run ``policy``
    (default: the config's ``rollout.policy``) and to store the KV cache ``kv_cache`` (default: the
    config's ``rollout.kv_cache_dtype`` / ``rollout.kv_scales``, the scales checked against
    ``weights_dir``). The servers own both (``--smd-*`` / ``--kv-cache-dtype`` at launch); requests
    time out and invalid masks are re-requested as ``rollout.faults`` says."""
    from .sglang_client import SGLangClient

    f = cfg.rollout.faults
    client = SGLangClient(sglang_urls(cfg), num_layers, timeout_s=f.request_timeout_s, mask_retries=f.mask_retries)
    client.check_policy((policy or cfg.rollout.policy).model_dump(mode="json"))
    client.check_kv_cache(kv_cache_of(cfg, num_layers, weights_dir) if kv_cache == "config" else kv_cache)
    return client


def make_engine(cfg: ExperimentConfig, model_dir: Path, arch=None) -> RolloutEngine:
    """The rollout engine ``rollout.backend`` names: the in-process reference engine (with the FP8
    KV cache ``rollout.kv_cache_dtype`` configures), or the client of the patched SGLang servers.
    Both sample with the same ``generate`` signature."""
    if cfg.rollout.backend == "sglang":
        return sglang_client(cfg, (arch or read_arch(model_dir)).num_layers, weights_dir=model_dir)
    kv = kv_cache_of(cfg, (arch or read_arch(model_dir)).num_layers, model_dir)
    return ReferenceEngine.from_pretrained(model_dir, cfg.rollout.policy, kv_growth=cfg.rollout.kv_growth,
                                           dtype=cfg.model.dtype, kv_cache=kv)


def run_rollout(cfg: ExperimentConfig, out_dir: str | Path, *, engine: RolloutEngine | None = None,
                batch_seed: int | None = None) -> RolloutBatch:
    """Sample ``num_prompts x group_size`` trajectories, score them, write ``out_dir``."""
    from ..tasks import make_task

    torch.manual_seed(cfg.rollout.seed)
    model_dir = ensure_model(cfg.model)
    tok = load_tokenizer(model_dir)
    a = read_arch(model_dir)
    engine = engine or make_engine(cfg, model_dir, a)
    task = make_task(cfg.task)
    examples = task.sample(cfg.rollout.num_prompts, seed=batch_seed)
    sp = sampling_params(cfg, tok.eos_id)
    trajs, stats, rewards = generate_scored(engine, task, tok, examples, cfg.rollout.group_size, sp)
    meta = {
        "model_path": str(model_dir), "num_layers": a.num_layers, "num_kv_heads": a.num_kv_heads,
        "backend": cfg.rollout.backend,
        # the compute dtype the sampler ran in (replay uses it); SGLang servers choose their own
        "dtype": cfg.model.dtype if cfg.rollout.backend == "reference" else None,
        "policy": cfg.rollout.policy.model_dump(mode="json"),
        "sampling": {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
                     "max_new_tokens": sp.max_new_tokens, "seed": sp.seed, "group_size": cfg.rollout.group_size,
                     "logprob_distribution": "temperature-scaled full-vocabulary softmax, before top-k/top-p"},
        "stats": stats.as_dict(),
        "finish_reasons": [t.finish_reason for t in trajs],
        "task": cfg.task.model_dump(mode="json"),
        "rewards": rewards,
    }
    batch = RolloutBatch.from_trajectories(trajs, meta)
    save_rollouts(out_dir, batch)
    return batch
