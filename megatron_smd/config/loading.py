"""Loading: the three layers (model preset, experiment file, command-line overrides) merged,
validated against the schema, with errors that name the dotted key and the layer that set it;
writing the resolved config back."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .schema import ExperimentConfig

REPO_CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` / ``3E4`` as floats (YAML 1.1 wants ``1.0e-5``, and a
    learning rate silently parsed as a string is a classic config trap)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, src: str, sources: dict[str, str], prefix: str = "") -> dict:
    out = dict(base)
    for k, v in top.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, src, sources, key + ".")
        else:
            out[k] = v
            _mark(v, key, src, sources)
    return out


def _mark(v: Any, key: str, src: str, sources: dict[str, str]) -> None:
    sources[key] = src
    if isinstance(v, dict):
        for k2, v2 in v.items():
            _mark(v2, f"{key}.{k2}", src, sources)


def _resolve_preset(name: str, exp_path: Path | None) -> Path:
    cands = []
    if exp_path is not None:
        cands.append((exp_path.parent / name))
    cands += [Path(name), REPO_CONFIGS / "models" / name, REPO_CONFIGS / "models" / f"{name}.yaml"]
    for c in cands:
        if c.is_file():
            return c
    raise ConfigError(f"{exp_path or 'command line'}: preset {name!r} not found (looked in {[str(c) for c in cands]})")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} must look like key=value (e.g. rollout.policy.budget=64)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: override {item!r} has an empty key")
    try:
        val = _yaml_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: override {key}: value {raw!r} is not valid YAML ({e})") from None
    return key, val


def _nest(key: str, val: Any) -> dict:
    out: Any = val
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                schema: type[BaseModel] = ExperimentConfig) -> BaseModel:
    """Load and validate the three layers. Raises ConfigError naming the dotted key and its source."""
    sources: dict[str, str] = {}
    data: dict = {}
    exp_path = Path(path) if path is not None else None
    exp = _read_yaml(exp_path) if exp_path is not None else {}
    preset = exp.get("preset")
    for item in overrides or []:
        k, v = parse_override(item)
        if k == "preset":
            preset = v
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{exp_path}: preset must be a string, got {preset!r}")
        ppath = _resolve_preset(preset, exp_path)
        pdata = _read_yaml(ppath)
        if "preset" in pdata:
            raise ConfigError(f"{ppath}: a model preset cannot itself name a preset")
        data = _merge(data, pdata, str(ppath), sources)
    data = _merge(data, exp, str(exp_path), sources)
    for item in overrides or []:
        k, v = parse_override(item)
        data = _merge(data, _nest(k, v), "command line", sources)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, sources, str(exp_path) if exp_path else "command line")) from None


def _format_errors(e: ValidationError, sources: dict[str, str], default_src: str) -> str:
    lines = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
        # pydantic puts union/tagged branch names in loc; keep only real field names
        dotted = ".".join(p for p in loc if not p[0].isupper())
        src = default_src
        probe = dotted
        while probe:
            if probe in sources:
                src = sources[probe]
                break
            probe = probe.rpartition(".")[0]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{src}: {dotted or '<top level>'}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def dump_config(cfg: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), next to a command's outputs."""
    from ..rollout.io import atomic_write_bytes

    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    atomic_write_bytes(Path(path), text.encode())
