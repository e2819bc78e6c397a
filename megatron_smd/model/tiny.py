"""Tiny Qwen2 / Llama models with random weights, written as real Hugging Face model directories.

The tiny model is the CPU stand-in for the real ones: same architecture, same file layout
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``generation_config.json``), same
weight names, so the rollout engine, the learner, weight sync and ``transformers`` all read it
through the same code path as Qwen2.5 or Llama-3. Only the sizes differ.

Write one with ``smd init-model`` (:mod:`megatron_smd.cli`)::

    smd init-model --out out/tiny-qwen2 --arch qwen2 --seed 0

Choices that matter for testing:

* Qwen2 biases on q/k/v are drawn at random (not zero), so a learner that drops or mis-shards
  them produces different logits and the replay tests catch it.
* Norm weights are 1 (the usual init); every other tensor is ``N(0, std)``.
* Weights are deterministic for a seed: one local ``torch.Generator``, tensors drawn in the order
  of :func:`~megatron_smd.model.hf.expected_shapes`; the global RNG is never touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from . import hf
from .hf import ModelArch
from .tokenizer import CharTokenizer

RMS_NORM_EPS = 1e-6


def tiny_arch(
    arch: str = "qwen2",
    *,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool | None = None,
    max_position_embeddings: int = 8192,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    pad_token_id: int | None = 0,
) -> ModelArch:
    """A validated :class:`ModelArch` for a small model.

    Defaults: ``head_dim = hidden_size // num_heads``; ``intermediate_size = 4 * hidden_size``
    (wider than the usual SwiGLU 8/3 ratio: at tiny widths the extra MLP capacity helps the
    synthetic tasks); tied embeddings for ``qwen2`` (as the small Qwen2.5 models), untied for
    ``llama``, so both ``lm_head`` layouts are exercised.

    Raises :class:`ConfigError` naming the field for an unknown arch, a non-positive size, or
    heads that do not divide (``num_heads % num_kv_heads``, ``hidden_size % num_heads`` when
    ``head_dim`` is not given).
    """
    if arch not in hf.SUPPORTED:
        raise ConfigError(f"tiny_arch: arch {arch!r} is not supported (supported: {sorted(hf.SUPPORTED)})")
    sizes = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers,
             "num_heads": num_heads, "num_kv_heads": num_kv_heads,
             "max_position_embeddings": max_position_embeddings}
    if head_dim is not None:
        sizes["head_dim"] = head_dim
    if intermediate_size is not None:
        sizes["intermediate_size"] = intermediate_size
    for name, val in sizes.items():
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ConfigError(f"tiny_arch: {name} must be a positive integer, got {val!r}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"tiny_arch: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads} "
                          f"(grouped-query attention needs whole groups)")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ConfigError(f"tiny_arch: hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                              f"pass head_dim explicitly")
        head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise ConfigError(f"tiny_arch: head_dim={head_dim} must be even (RoPE rotates pairs of dimensions)")
    if not rope_theta > 0:
        raise ConfigError(f"tiny_arch: rope_theta must be > 0, got {rope_theta!r}")
    for name, tid in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tid is not None and not 0 <= tid < vocab_size:
            raise ConfigError(f"tiny_arch: {name}={tid} is outside the vocabulary [0, {vocab_size})")
    if tie_word_embeddings is None:
        tie_word_embeddings = arch == "qwen2"
    return ModelArch(
        arch=arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size if intermediate_size is not None else 4 * hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rms_norm_eps=RMS_NORM_EPS,
        tie_word_embeddings=bool(tie_word_embeddings),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def init_weights(arch: ModelArch, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random fp32 weights with HF names and the shapes of :func:`hf.expected_shapes`.

    Norm weights (``*layernorm.weight``, ``model.norm.weight``) are 1; everything else, the Qwen2
    q/k/v biases included, is ``N(0, std)``. Deterministic for ``(arch, seed, std)``.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for name, shape in hf.expected_shapes(arch).items():
        if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
            out[name] = torch.ones(shape, dtype=torch.float32)
        else:
            out[name] = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    return out


def generation_config(arch: ModelArch) -> dict:
    """The ``generation_config.json`` contents: special ids only; sampling settings live in our configs."""
    return {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id,
            "pad_token_id": arch.pad_token_id}


def tokenizer_config(tok: CharTokenizer, arch: ModelArch) -> dict:
    """``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained(dir)`` (and SGLang) know the specials."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
            "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": arch.max_position_embeddings}


def init_model_dir(out: str | os.PathLike, arch_name: str = "qwen2", seed: int = 0, std: float = 0.02,
                   **size_kwargs) -> Path:
    """Write a complete tiny HF model directory at ``out`` (atomically) and return its path.

    ``size_kwargs`` go to :func:`tiny_arch` (``hidden_size``, ``num_layers``, ...); the vocabulary
    and special ids come from :meth:`CharTokenizer.build`, so they cannot be overridden here.
    """
    tok = CharTokenizer.build()
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        if key in size_kwargs:
            raise ConfigError(f"init_model_dir: {key} is set by the tokenizer and cannot be passed")
    arch = tiny_arch(arch_name, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id, **size_kwargs)
    weights = init_weights(arch, seed=seed, std=std)
    extra = {
        "tokenizer.json": tok.to_json(),
        "tokenizer_config.json": json.dumps(tokenizer_config(tok, arch), indent=2) + "\n",
        "generation_config.json": json.dumps(generation_config(arch), indent=2) + "\n",
    }
    hf.save_model_dir(out, arch, weights, extra_files=extra)
    return Path(out)

