"""A pure-torch Qwen2 / Llama decoder: the reference engine's model and the plain-torch replay learner.

Two entry points share every weight and every line of layer math:

* :meth:`RefTransformer.forward` runs a whole sequence (or a padded batch, or a packed row) in one
  parallel pass under a shadow mask ``evict`` (``[B, L, T]`` or ``[B, L, H_kv, T]``): query ``i``
  sees key ``j`` in layer ``l`` iff ``j <= i < evict[b, l, (h,) j]``. ``evict=None`` is causal.
* :meth:`RefTransformer.attend_cached` / the per-layer pieces let the rollout engine run prefill and
  decode over a KV cache that it compacts as it evicts.

Numerics follow Hugging Face's implementation (RMSNorm in fp32 with ``x * rsqrt(mean(x^2) + eps)``,
RoPE with ``rotate_half`` on the ``[first half | second half]`` layout, SiLU-gated MLP), so the dense
logits match ``transformers`` to fp32 rounding.

RoPE is applied at each token's *original* position (``positions``), never re-assigned after
eviction: this is one of the conditions of exact replay (DESIGN.md §2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hf import ModelArch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions`` ``[...]`` int -> ``cos, sin`` ``[..., head_dim]`` (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [..., hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, T, hd]``, cos/sin ``[B, T, hd]``."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # fp32 tables, model-dtype math (as HF)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, a: ModelArch):
        super().__init__()
        hd = a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * hd, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * hd, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * hd, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * hd, a.hidden_size, bias=False)
        self.nh, self.nkv, self.hd = a.num_heads, a.num_kv_heads, hd

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x ``[B, T, D]`` -> q ``[B, H, T, hd]``, k/v ``[B, H_kv, T, hd]`` with RoPE applied to q, k."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     return_probs: bool = False):
    """Explicit-softmax attention, the numerics shared by the engine's cached path and the replay.

    q ``[B, H, Tq, hd]``, k/v ``[B, H_kv, Tk, hd]``, allowed bool broadcastable to
    ``[B, H_kv, G, Tq, Tk]`` where ``G = H // H_kv`` (pass ``[B, 1|H_kv, 1, Tq, Tk]``).
    Returns out ``[B, H, Tq, hd]`` and, if asked, probs ``[B, H, Tq, Tk]``.
    """
    B, H, Tq, hd = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.view(B, Hkv, G, Tq, hd)
    scores = torch.einsum("bkgqd,bktd->bkgqt", qg, k) / math.sqrt(hd)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # fp32 softmax (as HF's eager)
    out = torch.einsum("bkgqt,bktd->bkgqd", probs, v).reshape(B, H, Tq, hd)
    if return_probs:
        return out, probs.reshape(B, H, Tq, -1)
    return out


class MLP(nn.Module):
    def __init__(self, a: ModelArch):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, a: ModelArch):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)


class _Inner(nn.Module):
    def __init__(self, a: ModelArch):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Layer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


def dense_allowed(evict_l: torch.Tensor | None, positions_q: torch.Tensor, T: int,
                  seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of one layer as ``[B, 1|H_kv, 1, Tq, T]`` for :func:`masked_attention`.

    evict_l ``[B, T]`` or ``[B, H_kv, T]`` (or None = causal); positions_q ``[Tq]`` row indices.
    """
    i = positions_q.view(-1, 1)
    j = torch.arange(T, device=positions_q.device).view(1, -1)
    causal = j <= i  # [Tq, T]
    if evict_l is None:
        return causal.view(1, 1, 1, *causal.shape)
    if evict_l.dim() == 2:
        evict_l = evict_l.unsqueeze(1)  # [B, 1, T]
    vis = i.view(1, 1, -1, 1) < evict_l.unsqueeze(2)  # [B, Hkv, Tq, T]
    return (causal & vis).unsqueeze(2)


class RefTransformer(nn.Module):
    """Qwen2 / Llama causal LM with Hugging Face parameter names (``model.*``, ``lm_head``)."""

    def __init__(self, arch: ModelArch):
        super().__init__()
        self.arch = arch
        self.model = _Inner(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_state_dict(cls, arch: ModelArch, sd: dict[str, torch.Tensor]) -> "RefTransformer":
        m = cls(arch)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (arch.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"state dict mismatch: missing={missing[:3]} unexpected={unexpected[:3]}")
        return m.eval()

    @classmethod
    def from_pretrained(cls, model_dir, dtype: torch.dtype = torch.float32) -> "RefTransformer":
        from .hf import load_state_dict, read_arch

        arch = read_arch(model_dir)
        return cls.from_state_dict(arch, load_state_dict(model_dir, arch, dtype)).to(dtype)

    def rope(self, positions: torch.Tensor):
        return rope_cos_sin(positions, self.arch.head_dim, self.arch.rope_theta)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h))

    def forward(self, tokens: torch.Tensor, evict: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, kv=None) -> torch.Tensor:
        """Full parallel forward under the shadow mask.

        Args:
            tokens: ``[B, T]``.
            evict: ``[B, L, T]`` / ``[B, L, H_kv, T]`` int (absolute in the row), or None (causal).
                Padded batches: padded keys hold 0 and are never visible; padded query rows then
                see nothing except when they are causal-visible real keys, so their outputs are
                undefined but finite only if evict allows them: callers ignore padded rows.
            positions: ``[B, T]`` RoPE positions (default ``arange(T)``). Packed rows restart at 0
                per sequence.
            kv: optional ``kv(layer, k, v) -> (k, v)`` applied to each layer's K and V
                (``[B, H_kv, T, hd]``, RoPE applied) before attention: an FP8 rollout's rounding
                (:meth:`megatron_smd.quant.cache.KVReplay.apply`).
        Returns:
            logits ``[B, T, V]`` (fp32 math in the model dtype).
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        cos, sin = self.rope(positions)
        h = self.model.embed_tokens(tokens)
        rows = torch.arange(T)
        for li, layer in enumerate(self.model.layers):
            allowed = dense_allowed(None if evict is None else evict[:, li], rows, T)
            if evict is not None:
                # a padded query row may see no key at all: let it see itself to keep softmax finite
                allowed = allowed | torch.eye(T, dtype=torch.bool).view(1, 1, 1, T, T)
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.qkv(x, cos, sin)
            if kv is not None:
                k, v = kv(li, k, v)
            o = masked_attention(q, k, v, allowed)
            h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.logits(h)
