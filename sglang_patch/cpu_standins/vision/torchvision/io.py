"""``torchvision.io`` stand-in: names transformers imports at module level; decoding refuses."""

import enum

from .transforms.functional import refusing


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4
    RGBA = 4


__getattr__ = refusing(__name__)
