"""Pure-torch stand-ins for modules SGLang's CPU path imports but the package registry cannot supply.

Each stand-in is a top-level package in its own directory (``vision/torchvision``,
``kernel/sgl_kernel``). :func:`prepare_cpu_environment` puts a directory on ``PYTHONPATH``
only when the real module is not importable, and only for a CPU launch, so SGLang's spawned
processes (scheduler, detokenizer) import the stand-in the same way the launcher process does.
A real ``torchvision`` or ``sgl_kernel`` always wins.

What each one provides, and what it refuses:

* ``sgl_kernel``: SGLang's CPU build of its kernel library is not on PyPI (the wheels there are
  CUDA builds that fail to import without ``libnvrtc``). SGLang imports it unconditionally on CPU
  for one op on the path a page-size-1 dense model takes: ``assign_req_to_token_pool_cpu``,
  implemented here in torch, and ``copy_all_layer_kv_cache_cpu`` (KV row moves, host memory).
  Every other name imports (SGLang imports dozens of kernels at module level on every path) and
  raises ``NotImplementedError`` naming itself when called, so a code path that needs a real
  kernel fails loudly, never computes something else.
* ``torchvision``: imported at module level by SGLang's multimodal configs; the registry's wheels
  are built against another torch. The stand-in has ``InterpolationMode`` (read at import time)
  and transform classes that raise when instantiated: image preprocessing is not supported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import MutableMapping

_HERE = os.path.dirname(os.path.abspath(__file__))
#: top-level module -> the directory holding its stand-in package
STANDINS = {"sgl_kernel": os.path.join(_HERE, "kernel"), "torchvision": os.path.join(_HERE, "vision")}


def missing_modules() -> list[str]:
    """The modules of :data:`STANDINS` that are not installed (a real one is never shadowed)."""
    return [name for name in STANDINS if importlib.util.find_spec(name) is None]


def prepare_cpu_environment(env: MutableMapping[str, str]) -> list[str]:
    """Make SGLang's CPU path importable in this process and every process it spawns.

    Sets ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's ``is_cpu()`` needs it besides ``--device cpu``) and
    puts the stand-in directory of each missing module first on ``sys.path`` and ``PYTHONPATH``.
    Returns the modules that are now stand-ins.
    """
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    used = missing_modules()
    dirs = [STANDINS[name] for name in used]
    if dirs:
        old = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join(dirs + ([old] if old else []))
        for d in reversed(dirs):
            if d not in sys.path:
                sys.path.insert(0, d)
        importlib.invalidate_caches()
    return used
