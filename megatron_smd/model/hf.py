"""Hugging Face model directories: the architecture we support and strict loading of its files.

A directory holds ``config.json`` (a Qwen2 or Llama config as ``transformers`` writes it),
``model.safetensors`` (or sharded ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``) and ``tokenizer.json``. Every problem is reported as a
:class:`~megatron_smd.errors.FormatError` naming the file and the key.

Weight names are Hugging Face's::

    model.embed_tokens.weight                                [V, D]
    model.layers.{i}.input_layernorm.weight                  [D]
    model.layers.{i}.self_attn.{q,k,v}_proj.weight           [H*hd, D] / [Hkv*hd, D]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias             (Qwen2 only)
    model.layers.{i}.self_attn.o_proj.weight                 [D, H*hd]
    model.layers.{i}.post_attention_layernorm.weight         [D]
    model.layers.{i}.mlp.{gate,up}_proj.weight               [F, D]
    model.layers.{i}.mlp.down_proj.weight                    [D, F]
    model.norm.weight                                        [D]
    lm_head.weight                                           [V, D]  (absent when tied)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import FormatError

SUPPORTED = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass(frozen=True)
class ModelArch:
    """The architecture fields of a Qwen2 / Llama ``config.json`` that the project uses."""

    arch: str  # "qwen2" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "qwen2"

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """K and V bytes of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_hf_config(self) -> dict:
        cfg = {
            "architectures": [SUPPORTED[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.arch == "llama":
            cfg.update({"attention_bias": False, "mlp_bias": False})
        else:
            cfg.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": self.num_layers})
        return cfg

    def asdict(self) -> dict:
        return asdict(self)


def _req(cfg: dict, key: str, typ, path: Path):
    if key not in cfg:
        raise FormatError(f"{path}: missing key '{key}'")
    val = cfg[key]
    if typ is float and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if not isinstance(val, typ) or isinstance(val, bool) and typ is not bool:
        raise FormatError(f"{path}: key '{key}' must be {typ.__name__}, got {val!r}")
    return val


def read_arch(model_dir: str | os.PathLike) -> ModelArch:
    """Parse and validate ``config.json`` of a Qwen2/Llama model directory."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FormatError(f"{d}: model directory does not exist")
    path = d / "config.json"
    if not path.is_file():
        raise FormatError(f"{path}: missing (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: top level must be an object")
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED:
        raise FormatError(f"{path}: model_type {mtype!r} is not supported (supported: {sorted(SUPPORTED)})")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise FormatError(f"{path}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if mtype == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise FormatError(f"{path}: Llama with attention_bias/mlp_bias is not supported")
    if cfg.get("rope_scaling"):
        raise FormatError(f"{path}: rope_scaling {cfg['rope_scaling']!r} is not supported (plain RoPE only)")
    if mtype == "qwen2" and cfg.get("use_sliding_window"):
        raise FormatError(f"{path}: Qwen2 sliding-window attention is not supported")
    nh = _req(cfg, "num_attention_heads", int, path)
    hidden = _req(cfg, "hidden_size", int, path)
    nkv = cfg.get("num_key_value_heads") or nh
    head_dim = cfg.get("head_dim") or hidden // nh
    if nh % nkv:
        raise FormatError(f"{path}: num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None:  # transformers >= 5 may nest it in rope_parameters
        rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return ModelArch(
        arch=mtype,
        vocab_size=_req(cfg, "vocab_size", int, path),
        hidden_size=hidden,
        intermediate_size=_req(cfg, "intermediate_size", int, path),
        num_layers=_req(cfg, "num_hidden_layers", int, path),
        num_heads=nh,
        num_kv_heads=int(nkv),
        head_dim=int(head_dim),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=cfg.get("pad_token_id"),
    )


def expected_shapes(a: ModelArch) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, for validation and for building weights."""
    D, F, hd = a.hidden_size, a.intermediate_size, a.head_dim
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab_size, D), "model.norm.weight": (D,)}
    if not a.tie_word_embeddings:
        s["lm_head.weight"] = (a.vocab_size, D)
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
        s[p + "self_attn.q_proj.weight"] = (a.num_heads * hd, D)
        s[p + "self_attn.k_proj.weight"] = (a.num_kv_heads * hd, D)
        s[p + "self_attn.v_proj.weight"] = (a.num_kv_heads * hd, D)
        s[p + "self_attn.o_proj.weight"] = (D, a.num_heads * hd)
        if a.qkv_bias:
            s[p + "self_attn.q_proj.bias"] = (a.num_heads * hd,)
            s[p + "self_attn.k_proj.bias"] = (a.num_kv_heads * hd,)
            s[p + "self_attn.v_proj.bias"] = (a.num_kv_heads * hd,)
        s[p + "mlp.gate_proj.weight"] = (F, D)
        s[p + "mlp.up_proj.weight"] = (F, D)
        s[p + "mlp.down_proj.weight"] = (D, F)
    return s


def weight_files(d: Path) -> list[Path]:
    """The safetensors files Hugging Face loads from ``d`` (single file or the index's shards, each checked
    to exist)."""
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({d / f for f in wm.values()})
        for f in files:
            if not f.is_file():
                raise FormatError(f"{index}: names shard {f.name}, which is missing")
        return files
    raise FormatError(f"{d}: no model.safetensors or model.safetensors.index.json")


def load_state_dict(model_dir: str | os.PathLike, arch: ModelArch | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Read all weights, checking every expected name and shape against ``config.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(model_dir)
    arch = arch or read_arch(d)
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(d):
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"{f}: cannot read safetensors ({e})") from None
    if arch.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    exp = expected_shapes(arch)
    missing = [k for k in exp if k not in sd]
    if missing:
        raise FormatError(f"{d}: weights missing {len(missing)} tensors, first: {missing[0]}")
    extra = [k for k in sd if k not in exp and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise FormatError(f"{d}: unexpected tensor {extra[0]} (and {len(extra) - 1} more) for {arch.arch}")
    for k, shape in exp.items():
        if tuple(sd[k].shape) != shape:
            raise FormatError(f"{d}: tensor {k} has shape {list(sd[k].shape)}, config.json implies {list(shape)}")
    return {k: sd[k].to(dtype) for k in exp}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def read_tokenizer_files(model_dir: str | os.PathLike) -> dict[str, str]:
    """The tokenizer/generation files of a model directory, for writing next to new weights."""
    d = Path(model_dir)
    return {name: (d / name).read_text() for name in TOKENIZER_FILES if (d / name).is_file()}


def save_model_dir(out: str | os.PathLike, arch: ModelArch, state_dict: dict[str, torch.Tensor],
                   extra_files: dict[str, str] | None = None) -> None:
    """Write an HF directory atomically: everything goes to ``out.tmp-*`` first, then one rename.

    An existing ``out`` is replaced only after the new directory is complete.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
