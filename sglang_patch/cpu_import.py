"""Import SGLang's memory-cache modules on a CPU-only machine (test helper; never used by a server).

SGLang 0.5.23's memory classes (``ReqToTokenPool``, ``MHATokenToKVPool``, ``TokenToKVPoolAllocator``,
``RadixCache``, ``Req``) run on ``device="cpu"``, but their modules import two packages that a CPU
test machine cannot have:

* ``triton`` — imported at module level by ``sglang/srt/utils/common.py`` and by every kernel
  module on the import chain (``@triton.jit`` decorators, ``tl.constexpr`` annotations,
  ``from triton.language.extra import libdevice``). Triton is a GPU compiler and is deliberately
  not installed beside the CPU torch. The shim answers ``import triton[.*]`` with modules whose
  ``jit`` / ``autotune`` / ``heuristics`` wrap the function in an object that raises on launch,
  and whose other attributes are inert placeholders that raise when called. No code path the
  tests exercise launches a Triton kernel (page size 1: ``TokenToKVPoolAllocator`` and
  ``RadixCache`` are pure torch); if one ever did, it fails loudly instead of computing anything.
* ``torchvision`` — imported at module level by ``sglang/srt/configs/__init__.py`` through the
  multimodal configs (``nano_nemotron_vl`` → ``multimodal/internvl_utils.py``,
  ``deepseek_ocr``). PyPI's torchvision wheels are built against one torch release each and do not
  import beside torch 2.13.0 CPU. The shim provides ``torchvision.transforms[.functional]`` whose
  attributes are classes that raise when instantiated (only image preprocessing uses them).

Both shims live only while the SGLang modules are imported and are removed from ``sys.modules``
(and the meta-path finder uninstalled) right after, so torch / transformers / other tests never
see a fake ``triton`` or ``torchvision``. torch's own lazy imports that probe for triton
(``torch._dynamo``, ``torch._inductor.codecache``) and transformers' torchvision probe are
resolved *before* the shims are installed, so they record "not installed". A real ``triton`` /
``torchvision`` (GPU machine) is always used as is: the shims install nothing when the package
exists.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from types import ModuleType

#: The SGLang modules the CPU tests use, imported in this order.
MEMORY_MODULES = (
    "sglang.srt.mem_cache.allocator",
    "sglang.srt.mem_cache.memory_pool",
    "sglang.srt.mem_cache.radix_cache",
    "sglang.srt.mem_cache.cache_init_params",
    "sglang.srt.mem_cache.base_prefix_cache",
    "sglang.srt.mem_cache.common",
    "sglang.srt.mem_cache.prefill_budget",
    "sglang.srt.managers.schedule_batch",
    "sglang.srt.sampling.sampling_params",
)


class _Inert:
    """Placeholder for any ``triton`` attribute: chainable, hashable, raises when called."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, n: str) -> "_Inert":
        if n.startswith("__"):
            raise AttributeError(n)
        return _Inert(f"{self._name}.{n}")

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self._name}: triton is not installed (CPU import shim, sglang_patch/cpu_import.py)")

    def __repr__(self) -> str:
        return f"<triton import shim {self._name}>"

    def __hash__(self) -> int:
        return hash(self._name)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Inert) and other._name == self._name


class _Kernel:
    """What ``@triton.jit`` returns under the shim: launching it (``k[grid](...)``) raises."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid) -> "_Kernel":
        return self

    def __call__(self, *a, **k):
        raise RuntimeError(f"triton kernel {self.__name__}: triton is not installed (CPU import shim)")


def _decorator(*a, **k):
    if len(a) == 1 and callable(a[0]) and not k:
        return _Kernel(a[0])
    return lambda f: f if isinstance(f, _Kernel) else _Kernel(f)


class _TritonModule(types.ModuleType):
    def __getattr__(self, n: str):
        if n.startswith("__"):
            raise AttributeError(n)
        return _Inert(f"{self.__name__}.{n}")


class _TritonFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import triton`` and every ``triton.*`` submodule with a shim module."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _TritonModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, m: ModuleType) -> None:
        if m.__name__ == "triton":
            m.__version__ = "3.0.0"  # SGLang compares versions at import time only
            m.jit = m.autotune = m.heuristics = _decorator
            m.cdiv = lambda a, b: -(-a // b)
            m.next_power_of_2 = lambda n: 1 << (int(n) - 1).bit_length()

            class Config:
                def __init__(self, *a, **k):
                    pass

            m.Config = Config
        elif m.__name__ == "triton.language":

            class constexpr:
                def __init__(self, value=None):
                    self.value = value

            class dtype:
                pass

            m.constexpr, m.dtype = constexpr, dtype


def _torchvision_modules() -> dict[str, ModuleType]:
    class _NoVision:
        def __init__(self, *a, **k):
            raise RuntimeError("torchvision is not installed (CPU import shim, sglang_patch/cpu_import.py)")

    def ga(n):
        if n.startswith("__"):
            raise AttributeError(n)
        return _NoVision

    mods = {}
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        m = types.ModuleType(name)
        m.__getattr__ = ga
        m.__path__ = []
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mods[name] = m
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]
    return mods


def import_sglang_memory_modules() -> dict[str, ModuleType]:
    """Import :data:`MEMORY_MODULES` (with the shims where needed) and return them by name.

    Raises ImportError if ``sglang`` itself or one of its small pure-Python dependencies is
    missing (the message names the module), never for triton / torchvision.
    """
    import warnings

    if importlib.util.find_spec("sglang") is None:
        raise ImportError("sglang is not installed (see sglang_patch/version.py for the CPU install)")
    need_triton = importlib.util.find_spec("triton") is None
    need_vision = importlib.util.find_spec("torchvision") is None
    finder = None
    added: list[str] = []
    if need_triton:
        # torch probes for triton at import of these modules; let it see the truth first.
        import torch._dynamo  # noqa: F401
        import torch._dynamo.repro.after_dynamo  # noqa: F401
        import torch._inductor.codecache  # noqa: F401

        finder = _TritonFinder()
        sys.meta_path.insert(0, finder)
    if need_vision:
        from transformers.utils import import_utils as _tf_imports

        _tf_imports.is_torchvision_available()  # lru_cached: records False before the shim exists
        import transformers.image_utils  # noqa: F401  (reads that probe at import time)

        for name, mod in _torchvision_modules().items():
            sys.modules[name] = mod
            added.append(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Only CUDA ... support AWQ/GGUF" import-time warnings
            return {name: importlib.import_module(name) for name in MEMORY_MODULES}
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
            for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
                if isinstance(sys.modules[name], _TritonModule):
                    del sys.modules[name]
        for name in added:
            sys.modules.pop(name, None)
