"""``torchvision.io`` stand-in: names transformers imports at module level; decoding refuses."""

import enum


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4
    RGBA = 4


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision.io.{name}: torchvision is not installed (megatron-smd CPU "
                           f"stand-in); image inputs are not supported on this server")

    return _unavailable
