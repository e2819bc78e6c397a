"""``torchvision.transforms`` stand-in: ``InterpolationMode`` and transforms that refuse to run."""

import enum

class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"




class _Transform:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision.transforms.{type(self).__name__}: torchvision is not installed "
                           f"(megatron-smd CPU stand-in); image inputs are not supported on this server")


def __getattr__(name: str):
    if name.startswith("__") or name in ("functional", "v2"):  # submodules: let the import system load them
        raise AttributeError(name)
    return type(name, (_Transform,), {})


from . import functional, v2  # noqa: E402,F401  (after InterpolationMode: v2 imports it)

functional.InterpolationMode = InterpolationMode
