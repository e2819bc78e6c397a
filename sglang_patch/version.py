"""The one SGLang version this patch targets, and the loud check that it is the one installed.

The patch (:mod:`sglang_patch.patch`) wraps SGLang internals by name (``RadixCache.checkpoint``,
``BasePrefixCache.free_kv_row``, the Triton/FA3 attention backends' ``forward_decode``, the
scheduler's output streamer, ...). Those internals move between SGLang releases (0.5.5 had
``cache_finished_req``; 0.5.23 has ``checkpoint`` + ``release_kv_cache`` and an explicit
``req.kv.cache_protected_len``), so the patch is pinned to exactly one version and refuses any
other before touching anything.

CPU install (no GPU stack; torch stays the CPU build; the server then runs with ``--device cpu``)::

    pip install torch==2.13.0 -e ".[sglang-cpu]" && pip install --no-deps sglang==0.5.23

(SGLang's own requirements pin a CUDA torch, hence ``--no-deps``; the ``sglang-cpu`` extra lists
the pure-Python packages its server needs. The README's test command installs the same.)
"""

from __future__ import annotations

from megatron_smd.errors import ConfigError

#: The SGLang release the patch was written and tested against.
SGLANG_VERSION = "0.5.23"


class SGLangVersionError(ConfigError):
    """The installed SGLang is not the version the patch targets (or is missing)."""


def installed_sglang_version() -> str | None:
    """The installed ``sglang`` distribution's version, or None when it is not installed.

    Read from the package metadata, so nothing of SGLang is imported.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check_sglang_version(installed: str | None = None) -> str:
    """Return the installed version if it is :data:`SGLANG_VERSION`, else raise loudly.

    Args:
        installed: the version to check (default: the installed distribution's).
    Raises:
        SGLangVersionError naming both versions and how to install the right one.
    """
    v = installed if installed is not None else installed_sglang_version()
    if v is None:
        raise SGLangVersionError(
            f"sglang is not installed; sglang_patch targets sglang=={SGLANG_VERSION} "
            f"(GPU: pip install sglang=={SGLANG_VERSION}; CPU: pip install -e '.[sglang-cpu]' && "
            f"pip install --no-deps sglang=={SGLANG_VERSION})"
        )
    if v != SGLANG_VERSION:
        raise SGLangVersionError(
            f"installed sglang is {v}, but sglang_patch targets sglang=={SGLANG_VERSION}: its hooks "
            f"wrap SGLang internals by name and are not applied to any other version "
            f"(pip install sglang=={SGLANG_VERSION}, or port sglang_patch/patch.py and bump "
            f"SGLANG_VERSION)"
        )
    return v
