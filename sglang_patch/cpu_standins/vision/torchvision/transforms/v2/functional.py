"""``torchvision.transforms.v2.functional`` stand-in: every function raises when called."""

from ..functional import refusing

__getattr__ = refusing(__name__)
