"""Stand-in for ``torchvision`` on a CPU machine without a matching build (see ``sglang_patch/cpu_standins``).

SGLang's model-config modules import ``torchvision.transforms`` at module level for multimodal
models; text models never call it. Anything used raises a clear error.
"""

from . import io, transforms  # noqa: F401

__version__ = "0.0.0+smd-cpu-standin"
SMD_CPU_STANDIN = True

