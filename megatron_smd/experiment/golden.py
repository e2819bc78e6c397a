"""The checked-in replay-gap golden file (``tests/golden/replay_gap_tiny.json``, ``tests/test_golden.py``):
regenerate it with ``smd experiment golden --out tests/golden/replay_gap_tiny.json``."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .common import _write_json

GOLDEN_POLICIES: tuple[tuple[str, dict], ...] = (
    ("none", {}),
    ("streaming", dict(name="streaming", budget=20, sinks=4)),
    ("h2o", dict(name="h2o", budget=20, window=6)),
    ("snapkv", dict(name="snapkv", budget=16, window=4)),
    ("snapkv-head", dict(name="snapkv", granularity="head", budget=16, window=4)),
    ("rkv", dict(name="rkv", budget=20, window=6, buffer=6)),
    ("rkv-head", dict(name="rkv", granularity="head", budget=20, window=6, buffer=6)),
)
# Per-head policies are snapkv and rkv: on this random-init model H2O's accumulated attention is
# nearly uniform, so both KV heads of an h2o-head run keep the same positions (no per-head coverage).
GOLDEN_SETUP = {"arch": "qwen2", "model_seed": 0, "prompt_lens": [40, 28], "prompt_seed": 0, "group_size": 2,
                "max_new_tokens": 24, "temperature": 1.0, "sampling_seed": 0, "threads": 1}
GOLDEN_METRICS = ("max_abs_logprob_diff", "mean_abs_logprob_diff", "mean_kl")


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def tokens_digest(tokens: torch.Tensor, seq_lens: torch.Tensor) -> str:
    """sha256 of the unpadded token ids of every trajectory (detects a changed sample)."""
    h = hashlib.sha256()
    for n in range(tokens.shape[0]):
        h.update(json.dumps(tokens[n, : int(seq_lens[n])].tolist()).encode())
    return h.hexdigest()


def golden_replay_gaps(model_dir: str | os.PathLike | None = None) -> dict:
    """The replay gap per learner mode (dense / shadow) and per policy on the tiny preset.

    The model is ``init_model_dir(path, "qwen2", seed=0)`` (the tiny preset's init), prompts are
    ``GOLDEN_SETUP["prompt_lens"]`` random token ids (seeded), each sampled ``group_size`` times at
    temperature 1 by the reference engine with the policy, then replayed by :func:`replay_torch`.
    Runs single-threaded: the reduction order then does not depend on the machine's core count,
    and tiny tensors are faster on one thread anyway.
    """
    import tempfile

    from ..model.hf import read_arch
    from ..model.tiny import init_model_dir
    from ..policies import PolicyConfig
    from ..replay import replay_torch
    from ..rollout.engine import ReferenceEngine, SamplingParams
    from ..rollout.io import RolloutBatch

    G = GOLDEN_SETUP
    tmp = None
    with _torch_threads(G["threads"]):
        if model_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="smd-golden-")
            model_dir = init_model_dir(Path(tmp.name) / "tiny-qwen2", G["arch"], seed=G["model_seed"])
        try:
            vocab = read_arch(model_dir).vocab_size
            g = torch.Generator().manual_seed(G["prompt_seed"])
            prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in G["prompt_lens"]]
            sp = SamplingParams(max_new_tokens=G["max_new_tokens"], temperature=G["temperature"], seed=G["sampling_seed"])
            out: dict[str, Any] = {}
            for name, kw in GOLDEN_POLICIES:
                pc = PolicyConfig(**kw)
                trajs, _ = ReferenceEngine.from_pretrained(model_dir, pc).generate(prompts, n=G["group_size"], sampling=sp)
                batch = RolloutBatch.from_trajectories(trajs, {"model_path": str(model_dir),
                                                               "sampling": {"temperature": G["temperature"]}})
                gaps = replay_torch(batch, model_dir)
                out[name] = {
                    "policy": pc.model_dump(mode="json"), "compressed": pc.name != "none",
                    "num_tokens": gaps["dense"]["num_tokens"],
                    "tokens_sha256": tokens_digest(batch.tokens, batch.seq_lens),
                    **{mode: {k: gaps[mode][k] for k in GOLDEN_METRICS} for mode in ("dense", "shadow")},
                }
        finally:
            if tmp is not None:
                tmp.cleanup()
    return {"setup": dict(G), "generated_with": {"torch": torch.__version__}, "policies": out}


def write_golden(path: str | os.PathLike) -> dict:
    res = golden_replay_gaps()
    _write_json(Path(path), res)
    return res
