"""Hugging Face <-> Megatron-Core weights, for any TP x PP layout, from one name/layout table.

Megatron's GPTModel with the local layer spec (``get_gpt_layer_local_spec``) names and lays out a
Qwen2 / Llama decoder as follows (``np`` query heads, ``ng`` KV groups, ``hn`` head dim, ``D``
hidden, ``F`` MLP width, ``Vp`` padded vocabulary, ``tp`` TP size; shapes are one TP rank's)::

    embedding.word_embeddings.weight                     [Vp/tp, D]   vocab rows, contiguous per rank
    decoder.layers.{l}.input_layernorm.weight            [D]          replicated
    decoder.layers.{l}.self_attention.linear_qkv.weight  [(np+2ng)hn/tp, D]
    decoder.layers.{l}.self_attention.linear_qkv.bias    [(np+2ng)hn/tp]      (Qwen2 only)
    decoder.layers.{l}.self_attention.linear_proj.weight [D, np*hn/tp]        row-parallel (dim 1)
    decoder.layers.{l}.pre_mlp_layernorm.weight          [D]          replicated
    decoder.layers.{l}.mlp.linear_fc1.weight             [2F/tp, D]   [gate_r; up_r] on rank r
    decoder.layers.{l}.mlp.linear_fc2.weight             [D, F/tp]    row-parallel (dim 1)
    decoder.final_layernorm.weight                       [D]          replicated (last stage)
    output_layer.weight                                  [Vp/tp, D]   (last stage; absent when tied
                                                                       and the stage also embeds)

* **QKV** is interleaved per query group: the full (unsharded) rows are
  ``[q_g0 (np/ng heads), k_g0, v_g0, q_g1, k_g1, v_g1, ...] x hn`` and TP rank ``r`` holds the
  ``r``-th contiguous chunk, i.e. whole groups when ``ng >= tp``. When ``ng < tp`` Megatron still
  splits the rows contiguously and all-gathers them in ``SelfAttention.get_query_key_value_tensors``,
  so the same rule holds. The Qwen2 bias is laid out identically.
* **fc1** is column-parallel with two logical outputs: rank ``r`` holds ``[gate_r; up_r]``
  (``gate.chunk(tp)[r]`` then ``up.chunk(tp)[r]``), not a slice of ``[gate; up]``.
* **Vocabulary** is padded to ``Vp`` (a multiple of ``make_vocab_size_divisible_by * tp``, as
  Megatron-LM pads it) with zero rows; converting back trims to the HF vocabulary.
* **PP**: stage ``p`` of ``pp`` holds global layers ``[p*L/pp, (p+1)*L/pp)`` under local indices
  ``l = i - p*L/pp``. The first stage holds the embedding, the last the final norm and the output
  layer. With tied embeddings and ``pp > 1`` the last stage keeps its own copy of the embedding as
  ``output_layer.weight`` (Megatron keeps the two copies equal by all-reducing their gradients).

:data:`RULES` is the single table; :func:`hf_to_megatron` (one rank's local state dict),
:func:`iter_hf_from_local` (one gathered parameter -> HF tensors, for a streaming weight-sync
resharder) and :func:`megatron_to_hf` (all ranks -> the HF dict) all read it, through
:func:`resolve_rule` (a Megatron parameter name -> its rule and layer) and :func:`hf_names` (a rule
-> its HF tensor names), which the weight sync's resharder uses too. This module is pure
tensor code; :func:`load_hf_into_model` only copies into an already-built model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import FormatError
from ..model.hf import ModelArch, expected_shapes, load_state_dict

Kind = Literal["replicated", "row", "vocab", "qkv", "qkv_bias", "gate_up"]
Scope = Literal["layer", "first", "last"]

DEFAULT_VOCAB_DIVISOR = 128


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensor(s) it is made of.

    ``mcore`` / ``hf`` are templates: ``{l}`` is the stage-local layer index, ``{i}`` the global one.
    """

    mcore: str
    hf: tuple[str, ...]
    kind: Kind
    scope: Scope
    qwen2_only: bool = False


_L = "decoder.layers.{l}."
_H = "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "first"),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), "replicated", "layer"),
    Rule(_L + "self_attention.linear_qkv.weight",
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
         "qkv", "layer"),
    Rule(_L + "self_attention.linear_qkv.bias",
         (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
         "qkv_bias", "layer", qwen2_only=True),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "row", "layer"),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), "replicated", "layer"),
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), "gate_up", "layer"),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "row", "layer"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated", "last"),
    # HF name resolved per arch: lm_head.weight, or model.embed_tokens.weight when tied.
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", "last"),
)

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def padded_vocab_size(vocab_size: int, tp_size: int, divisor: int = DEFAULT_VOCAB_DIVISOR) -> int:
    """Megatron-LM's padding: round ``vocab_size`` up to a multiple of ``divisor * tp_size``."""
    m = divisor * tp_size
    return ((vocab_size + m - 1) // m) * m


def layers_per_stage(arch: ModelArch, pp_size: int) -> int:
    if arch.num_layers % pp_size:
        raise ValueError(f"num_layers={arch.num_layers} is not divisible by pp={pp_size}")
    return arch.num_layers // pp_size


def _rules_for(arch: ModelArch) -> list[Rule]:
    return [r for r in RULES if arch.qkv_bias or not r.qwen2_only]


def hf_names(rule: Rule, arch: ModelArch, i: int | None = None) -> tuple[str, ...]:
    """The HF tensor name(s) ``rule``'s Megatron parameter is made of, for global layer ``i``
    (``output_layer.weight`` of a tied model is ``model.embed_tokens.weight``)."""
    if rule.mcore == "output_layer.weight" and arch.tie_word_embeddings:
        return ("model.embed_tokens.weight",)
    return tuple(n.format(i=i) for n in rule.hf)


def _stage_has(rule: Rule, arch: ModelArch, pp_rank: int, pp_size: int) -> bool:
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    if rule.scope == "layer":
        return True
    if rule.scope == "first":
        return first
    if rule.mcore == "output_layer.weight":  # tied + single stage: the embedding is the output weight
        return last and not (arch.tie_word_embeddings and first)
    return last


def local_param_names(arch: ModelArch, pp_rank: int = 0, pp_size: int = 1) -> list[str]:
    """Names of the parameters one rank of stage ``pp_rank`` holds (same on every TP rank)."""
    n = layers_per_stage(arch, pp_size)
    names = []
    for rule in _rules_for(arch):
        if not _stage_has(rule, arch, pp_rank, pp_size):
            continue
        if rule.scope == "layer":
            names += [rule.mcore.format(l=l) for l in range(n)]
        else:
            names.append(rule.mcore)
    return names


# ----------------------------------------------------------------------------------------------
# layout transforms: full HF tensors <-> the list of TP shards
# ----------------------------------------------------------------------------------------------


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """HF q ``[np*hn, ...]``, k/v ``[ng*hn, ...]`` -> Megatron rows ``[ng, (np/ng + 2)*hn, ...]`` flattened."""
    ng, hn = arch.num_kv_heads, arch.head_dim
    qpg = arch.num_heads // ng
    rest = q.shape[1:]
    parts = (q.reshape(ng, qpg * hn, *rest), k.reshape(ng, hn, *rest), v.reshape(ng, hn, *rest))
    return torch.cat(parts, dim=1).reshape(ng * (qpg + 2) * hn, *rest)


def _split_qkv(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, hn = arch.num_kv_heads, arch.head_dim
    qpg = arch.num_heads // ng
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(ng, (qpg + 2) * hn, *rest).split([qpg * hn, hn, hn], dim=1)
    return (q.reshape(ng * qpg * hn, *rest), k.reshape(ng * hn, *rest), v.reshape(ng * hn, *rest))


def _chunk(t: torch.Tensor, n: int, dim: int, what: str) -> list[torch.Tensor]:
    if t.shape[dim] % n:
        raise ValueError(f"{what}: dimension {dim} of size {t.shape[dim]} does not split into {n} TP shards")
    return [c.contiguous() for c in t.chunk(n, dim=dim)]


def shard_hf(rule: Rule, tensors: Sequence[torch.Tensor], arch: ModelArch, tp_size: int,
             vocab_divisor: int = DEFAULT_VOCAB_DIVISOR) -> list[torch.Tensor]:
    """Full HF tensor(s) of one rule -> the ``tp_size`` Megatron shards, in TP-rank order."""
    what = rule.mcore
    if rule.kind == "replicated":
        return [tensors[0].clone() for _ in range(tp_size)]
    if rule.kind == "row":
        return _chunk(tensors[0], tp_size, 1, what)
    if rule.kind == "vocab":
        w = tensors[0]
        vp = padded_vocab_size(arch.vocab_size, tp_size, vocab_divisor)
        padded = torch.zeros((vp, *w.shape[1:]), dtype=w.dtype)
        padded[: w.shape[0]] = w
        return _chunk(padded, tp_size, 0, what)
    if rule.kind in ("qkv", "qkv_bias"):
        return _chunk(_interleave_qkv(*tensors, arch), tp_size, 0, what)
    if rule.kind == "gate_up":
        gates = _chunk(tensors[0], tp_size, 0, what)
        ups = _chunk(tensors[1], tp_size, 0, what)
        return [torch.cat([g, u], dim=0) for g, u in zip(gates, ups)]
    raise AssertionError(rule.kind)


def unshard_to_hf(rule: Rule, shards: Sequence[torch.Tensor], arch: ModelArch) -> list[torch.Tensor]:
    """Inverse of :func:`shard_hf`: the TP shards (rank order) -> the full HF tensor(s)."""
    if rule.kind == "replicated":
        return [shards[0]]
    if rule.kind == "row":
        return [torch.cat(list(shards), dim=1)]
    if rule.kind == "vocab":
        return [torch.cat(list(shards), dim=0)[: arch.vocab_size]]
    if rule.kind in ("qkv", "qkv_bias"):
        return list(_split_qkv(torch.cat(list(shards), dim=0), arch))
    if rule.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    raise AssertionError(rule.kind)


# ----------------------------------------------------------------------------------------------
# name resolution
# ----------------------------------------------------------------------------------------------


def resolve_rule(name: str, arch: ModelArch, pp_rank: int, pp_size: int) -> tuple[Rule, int | None]:
    """Stage-local Megatron parameter name -> (its rule in :data:`RULES`, global layer index or None).

    A leading ``module.`` (Megatron DDP / Float16Module wrappers) is ignored.
    """
    while name.startswith("module."):
        name = name[len("module."):]
    m = _LAYER_RE.match(name)
    if m:
        local, suffix = int(m.group(1)), m.group(2)
        n = layers_per_stage(arch, pp_size)
        if not 0 <= local < n:
            raise KeyError(f"{name}: local layer {local} outside this stage's {n} layers")
        for rule in _rules_for(arch):
            if rule.scope == "layer" and rule.mcore == _L + suffix:
                return rule, pp_rank * n + local
    else:
        for rule in _rules_for(arch):
            if rule.scope != "layer" and rule.mcore == name:
                return rule, None
    raise KeyError(f"{name}: not a parameter of a {arch.arch} GPTModel (local layer spec)")


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def hf_to_megatron(hf_sd: Mapping[str, torch.Tensor], arch: ModelArch, tp_rank: int, tp_size: int,
                   pp_rank: int, pp_size: int, *,
                   vocab_divisor: int = DEFAULT_VOCAB_DIVISOR) -> dict[str, torch.Tensor]:
    """The local state dict of rank ``(tp_rank, pp_rank)`` built from full HF weights.

    Raises:
        FormatError naming the first HF tensor that is missing or has the wrong shape.
    """
    exp = expected_shapes(arch)
    for name, shape in exp.items():
        if name not in hf_sd:
            raise FormatError(f"HF weights: missing tensor {name}")
        if tuple(hf_sd[name].shape) != shape:
            raise FormatError(f"HF weights: tensor {name} has shape {list(hf_sd[name].shape)}, expected {list(shape)}")
    n = layers_per_stage(arch, pp_size)
    out: dict[str, torch.Tensor] = {}
    for rule in _rules_for(arch):
        if not _stage_has(rule, arch, pp_rank, pp_size):
            continue
        layers = [(l, pp_rank * n + l) for l in range(n)] if rule.scope == "layer" else [(None, None)]
        for local, glob in layers:
            src = [hf_sd[h] for h in hf_names(rule, arch, glob)]
            shards = shard_hf(rule, src, arch, tp_size, vocab_divisor)
            out[rule.mcore.format(l=local)] = shards[tp_rank]
    return out


def iter_hf_from_local(name: str, tp_shards: Sequence[torch.Tensor] | torch.Tensor, arch: ModelArch, *,
                       pp_rank: int, pp_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """One Megatron parameter, gathered over TP -> its HF tensor(s) ``(hf_name, full tensor)``.

    Args:
        name: the stage-local Megatron parameter name (``decoder.layers.{l}....``; a DDP
            ``module.`` prefix is accepted).
        tp_shards: the parameter on every TP rank, in TP-rank order (a bare tensor means tp=1).
            Replicated parameters may be given as a single shard.
        pp_rank / pp_size: which stage ``name`` belongs to (maps the local layer index to HF's).

    Yields nothing for the last stage's copy of a tied embedding (``output_layer.weight`` when
    ``tie_word_embeddings``): the first stage's ``embedding.word_embeddings.weight`` is the HF tensor.
    This is the per-parameter form that a streaming weight-sync resharder calls.
    """
    if isinstance(tp_shards, torch.Tensor):
        tp_shards = [tp_shards]
    rule, glob = resolve_rule(name, arch, pp_rank, pp_size)
    if rule.mcore == "output_layer.weight" and arch.tie_word_embeddings:
        return
    for hf_name, t in zip(hf_names(rule, arch, glob), unshard_to_hf(rule, tp_shards, arch)):
        yield hf_name, t


def megatron_to_hf(rank_state_dicts: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], arch: ModelArch,
                   tp_size: int, pp_size: int) -> dict[str, torch.Tensor]:
    """All ranks' local state dicts -> the full HF state dict (the inverse of :func:`hf_to_megatron`).

    Args:
        rank_state_dicts: ``{(tp_rank, pp_rank): local state dict}`` for every TP x PP position (one
            DP/CP replica). Entries other than parameters of :data:`RULES` are rejected.
    """
    out: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp_size):
        missing = [(t, pp_rank) for t in range(tp_size) if (t, pp_rank) not in rank_state_dicts]
        if missing:
            raise KeyError(f"megatron_to_hf: no state dict for (tp_rank, pp_rank) = {missing[0]}")
        names = list(rank_state_dicts[(0, pp_rank)].keys())
        for name in names:
            shards = [rank_state_dicts[(t, pp_rank)][name] for t in range(tp_size)]
            for hf_name, t in iter_hf_from_local(name, shards, arch, pp_rank=pp_rank, pp_size=pp_size):
                out[hf_name] = t
    exp = expected_shapes(arch)
    missing_hf = [k for k in exp if k not in out]
    if missing_hf:
        raise KeyError(f"megatron_to_hf: the rank state dicts do not cover {missing_hf[0]} "
                       f"({len(missing_hf)} HF tensors missing)")
    return {k: out[k] for k in exp}


def load_hf_into_model(model: torch.nn.Module, model_dir_or_sd: str | os.PathLike | Mapping[str, torch.Tensor],
                       layout, *, arch: ModelArch | None = None, vocab_divisor: int | None = None) -> None:
    """Copy HF weights (a model directory or a full HF state dict) into a built GPTModel on this rank.

    Args:
        model: the GPTModel of this rank (as built by :func:`megatron_smd.learner.model.build_gpt_model`,
            which records ``arch`` and ``vocab_divisor`` on it).
        model_dir_or_sd: an HF model directory (read strictly by :func:`megatron_smd.model.hf.load_state_dict`)
            or a full HF state dict.
        layout: the initialized :class:`~megatron_smd.parallel.layout.ParallelLayout`; this rank's TP/PP
            position selects the shard.

    Every parameter of ``model`` must come out of the table and vice versa, with equal shapes.
    """
    arch = arch or getattr(model, "arch", None)
    if arch is None:
        if isinstance(model_dir_or_sd, Mapping):
            raise ValueError("load_hf_into_model: pass arch= (the model does not record one)")
        from ..model.hf import read_arch

        arch = read_arch(model_dir_or_sd)
    divisor = vocab_divisor or getattr(model, "vocab_divisor", DEFAULT_VOCAB_DIVISOR)
    hf_sd = model_dir_or_sd if isinstance(model_dir_or_sd, Mapping) else load_state_dict(model_dir_or_sd, arch)
    local = hf_to_megatron(hf_sd, arch, layout.tp_rank, layout.tp, layout.pp_rank, layout.pp,
                           vocab_divisor=divisor)
    params = dict(model.named_parameters())
    extra = sorted(set(params) - set(local))
    missing = sorted(set(local) - set(params))
    if extra or missing:
        raise ValueError(f"load_hf_into_model: model parameters {extra[:3]} have no HF source; "
                         f"converted tensors {missing[:3]} have no model parameter")
    with torch.no_grad():
        for name, p in params.items():
            src = local[name]
            if p.shape != src.shape:
                raise ValueError(f"load_hf_into_model: {name} has shape {list(p.shape)} in the model, "
                                 f"{list(src.shape)} from HF (tp={layout.tp}, pp={layout.pp})")
            p.copy_(src.to(dtype=p.dtype, device=p.device))
