"""The rollout directory format: what a sampler wrote, for the replay tools, the benchmarks and any
other reader. The learner reads it through :func:`megatron_smd.learner.batch.from_rollout` (its own
:class:`~megatron_smd.learner.batch.TrainBatch`, one position earlier in its alignment).

``DIR/trajectories.safetensors`` (N trajectories, padded to ``T = max seq_len``):

============== ================ =======================================================================
tensor         dtype, shape     meaning
============== ================ =======================================================================
tokens         int64 [N, T]     prompt + completion; padding = 0 (ignore past ``seq_lens``)
prompt_lens    int64 [N]        number of prompt tokens
seq_lens       int64 [N]        prompt + completion tokens (the completion includes a final stop token)
sampler_logprobs float32 [N, T] ``log p_sampler(tokens[t] | tokens[<t])`` for ``prompt_len <= t < seq_len``;
                                0 elsewhere. The distribution is the temperature-scaled full-vocabulary
                                softmax, before top-k/top-p truncation (``meta.json: sampling``)
evict          int32 [N, L, T]  shadow mask relative to each sequence start (``[N, L, H_kv, T]`` for
               or [N,L,H,T]     per-head policies): query i saw key j in layer l iff
                                ``j <= i < evict[n, l, (h,) j]``; padded positions hold 0
prompt_index   int64 [N]        which prompt (GRPO group) the trajectory belongs to
sample_index   int64 [N]        index inside its group
============== ================ =======================================================================

``DIR/meta.json``: ``format_version``, ``model_path``, ``num_layers``, ``num_kv_heads``,
``policy`` (name, budget, …), ``sampling`` (temperature, top_p, top_k, max_new_tokens, seed),
``stats`` (peak KV bytes, tokens/s), ``finish_reasons``, and optional ``task`` / ``rewards``.
A rollout sampled with an FP8 KV cache has ``kv_cache``
(:meth:`~megatron_smd.quant.cache.RolloutKV.to_meta`): the FP8 format (``dtype``), the engine's
``division`` rule, one ``k_scale`` and one ``v_scale`` per layer, the ``scales_file`` they came
from and the ``weights`` (``fingerprint``, ``version``) those scales were calibrated on. The
learner replays it (:mod:`megatron_smd.quant.cache`); a rollout without ``kv_cache`` was sampled
with K/V in the model's dtype. :func:`check_kv_scales_weights` refuses to replay it against
weights other than the scales'.

Writes are atomic (temporary file + rename); reads validate every tensor and name the file and
the key on any problem.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, MaskError
from ..mask import EVICT_DTYPE, pad_batch, validate_evict
from ..quant.cache import META_KEY as KV_META_KEY
from ..quant.cache import RolloutKV

FORMAT_VERSION = 1
TRAJ_FILE = "trajectories.safetensors"
META_FILE = "meta.json"


def completion_positions(prompt_lens: torch.Tensor, seq_lens: torch.Tensor, T: int, *, offset: int = 0) -> torch.Tensor:
    """``[N, T]`` bool: True at entries about completion tokens. ``offset=0``: this format's
    alignment (``prompt_len <= t < seq_len``); ``offset=1``: the learner's, one position earlier
    (:mod:`megatron_smd.learner.batch`)."""
    t = torch.arange(T).view(1, T) + offset
    return (t >= prompt_lens.view(-1, 1)) & (t < seq_lens.view(-1, 1))


def completion_mask(batch: "RolloutBatch") -> torch.Tensor:
    """``[N, T]`` bool: where ``sampler_logprobs`` holds the completion tokens' log-probs."""
    return completion_positions(batch.prompt_lens, batch.seq_lens, batch.tokens.shape[1])


@dataclass
class RolloutBatch:
    """Padded tensors of N trajectories (see module docstring) plus ``meta``."""

    tokens: torch.Tensor
    prompt_lens: torch.Tensor
    seq_lens: torch.Tensor
    sampler_logprobs: torch.Tensor
    evict: torch.Tensor
    prompt_index: torch.Tensor
    sample_index: torch.Tensor
    meta: dict
    source: Path | None = None  # the directory it was read from (load_rollouts), for messages

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def per_head(self) -> bool:
        return self.evict.dim() == 4

    @property
    def meta_file(self) -> str:
        """Where ``meta`` lives, for messages: ``DIR/meta.json``, or "the rollout's meta" in memory."""
        return str(self.source / META_FILE) if self.source is not None else "the rollout's meta"

    @property
    def kv_cache(self) -> RolloutKV | None:
        """The FP8 KV cache the rollout was sampled with (``meta["kv_cache"]``), or None."""
        d = (self.meta or {}).get(KV_META_KEY)
        return None if d is None else RolloutKV.from_meta(d, self.meta_file, self.evict.shape[1])

    def evict_of(self, n: int) -> torch.Tensor:
        """Unpadded mask of trajectory ``n``: ``[L, (H,) T_n]``."""
        return self.evict[n, ..., : int(self.seq_lens[n])].contiguous()

    def tokens_of(self, n: int) -> torch.Tensor:
        return self.tokens[n, : int(self.seq_lens[n])]

    @classmethod
    def from_trajectories(cls, trajs, meta: dict) -> "RolloutBatch":
        """Pad ``trajs``; ``meta`` gains the trajectories' FP8 ``kv_cache`` when they have one."""
        T = max(t.seq_len for t in trajs)
        kv = getattr(trajs[0], "kv_cache", None)
        if any(getattr(t, "kv_cache", None) != kv for t in trajs):
            raise ValueError("RolloutBatch.from_trajectories: trajectories sampled with different KV caches")
        if kv is not None and KV_META_KEY not in meta:
            meta = {**meta, KV_META_KEY: kv.to_meta()}
        N = len(trajs)
        tokens = torch.zeros(N, T, dtype=torch.int64)
        lps = torch.zeros(N, T, dtype=torch.float32)
        for i, t in enumerate(trajs):
            tokens[i, : t.seq_len] = torch.tensor(t.tokens)
            lps[i, : t.seq_len] = t.sampler_logprobs
        return cls(
            tokens=tokens,
            prompt_lens=torch.tensor([t.prompt_len for t in trajs], dtype=torch.int64),
            seq_lens=torch.tensor([t.seq_len for t in trajs], dtype=torch.int64),
            sampler_logprobs=lps,
            evict=pad_batch([t.evict for t in trajs], T),
            prompt_index=torch.tensor([t.prompt_index for t in trajs], dtype=torch.int64),
            sample_index=torch.tensor([t.sample_index for t in trajs], dtype=torch.int64),
            meta=meta,
        )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_atomic_write_bytes = atomic_write_bytes  # the name other modules imported


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_rollouts(out_dir: str | os.PathLike, batch: RolloutBatch) -> Path:
    """Write ``trajectories.safetensors`` and ``meta.json`` atomically. The tensors go first, so a
    directory with a ``meta.json`` always has a complete tensor file next to it."""
    from safetensors.torch import save

    out = Path(out_dir)
    tensors = {
        "tokens": batch.tokens, "prompt_lens": batch.prompt_lens, "seq_lens": batch.seq_lens,
        "sampler_logprobs": batch.sampler_logprobs, "evict": batch.evict.to(EVICT_DTYPE),
        "prompt_index": batch.prompt_index, "sample_index": batch.sample_index,
    }
    meta = dict(batch.meta)
    meta["format_version"] = FORMAT_VERSION
    atomic_write_bytes(out / TRAJ_FILE, save({k: v.contiguous() for k, v in tensors.items()}))
    atomic_write_json(out / META_FILE, meta)
    return out


_SPEC = {  # name -> (dtype, rank)
    "tokens": (torch.int64, 2), "prompt_lens": (torch.int64, 1), "seq_lens": (torch.int64, 1),
    "sampler_logprobs": (torch.float32, 2), "prompt_index": (torch.int64, 1), "sample_index": (torch.int64, 1),
}


def load_rollouts(rollout_dir: str | os.PathLike, *, validate: bool = True) -> RolloutBatch:
    """Read and validate a rollout directory. Raises FormatError / MaskError naming file and key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(rollout_dir)
    tf, mf = d / TRAJ_FILE, d / META_FILE
    if not d.is_dir():
        raise FormatError(f"{d}: rollout directory does not exist")
    for f in (tf, mf):
        if not f.is_file():
            raise FormatError(f"{f}: missing")
    try:
        meta = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{mf}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{mf}: top level must be an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{mf}: format_version {meta.get('format_version')!r}, this reader knows {FORMAT_VERSION}")
    try:
        t = load_file(str(tf))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{tf}: cannot read safetensors ({e})") from None
    for k, (dt, rank) in list(_SPEC.items()) + [("evict", (EVICT_DTYPE, None))]:
        if k not in t:
            raise FormatError(f"{tf}: missing tensor '{k}'")
        if t[k].dtype != dt:
            raise FormatError(f"{tf}: tensor '{k}' has dtype {t[k].dtype}, expected {dt}")
        if rank is not None and t[k].dim() != rank:
            raise FormatError(f"{tf}: tensor '{k}' has shape {list(t[k].shape)}, expected rank {rank}")
    N, T = t["tokens"].shape
    for k in ("prompt_lens", "seq_lens", "prompt_index", "sample_index"):
        if t[k].shape != (N,):
            raise FormatError(f"{tf}: tensor '{k}' has shape {list(t[k].shape)}, expected [{N}]")
    if t["sampler_logprobs"].shape != (N, T):
        raise FormatError(f"{tf}: tensor 'sampler_logprobs' has shape {list(t['sampler_logprobs'].shape)}, expected [{N}, {T}]")
    ev = t["evict"]
    if ev.dim() not in (3, 4) or ev.shape[0] != N or ev.shape[-1] != T:
        raise FormatError(f"{tf}: tensor 'evict' has shape {list(ev.shape)}, expected [{N}, L, {T}] or [{N}, L, H_kv, {T}]")
    L = meta.get("num_layers")
    if L is not None and ev.shape[1] != L:
        raise FormatError(f"{tf}: tensor 'evict' has {ev.shape[1]} layers, meta.json says num_layers={L}")
    sl, pl = t["seq_lens"], t["prompt_lens"]
    if bool(((sl < 1) | (sl > T) | (pl < 1) | (pl > sl)).any()):
        n = int(((sl < 1) | (sl > T) | (pl < 1) | (pl > sl)).nonzero()[0])
        raise FormatError(f"{tf}: trajectory {n} has prompt_len={int(pl[n])}, seq_len={int(sl[n])} (T={T})")
    batch = RolloutBatch(t["tokens"], pl, sl, t["sampler_logprobs"], ev, t["prompt_index"], t["sample_index"], meta, d)
    _ = batch.kv_cache  # validates meta.json's kv_cache (file and key in the message)
    if validate:
        for n in range(N):
            s = int(sl[n])
            try:
                validate_evict(batch.evict_of(n), seq_end=s, name=f"{tf}:evict[{n}]")
            except MaskError:
                raise
            if bool((ev[n, ..., s:] != 0).any()):
                raise MaskError(f"{tf}:evict[{n}]: padded positions >= seq_len={s} must hold 0")
    return batch


def check_kv_scales_weights(batch: RolloutBatch, weights_dir: str | os.PathLike) -> None:
    """Refuse to train or replay an FP8 rollout against weights other than those its KV scales
    were calibrated on (:class:`FormatError` naming ``meta.json``, the key and both weights). A
    rollout without scales-file weights (no FP8, or unit scales) passes."""
    kv = batch.kv_cache
    if kv is None or kv.weights_fingerprint is None:
        return
    from ..quant.kv import weights_fingerprint

    kv.check_weights(weights_fingerprint(weights_dir), batch.meta_file, str(weights_dir))
