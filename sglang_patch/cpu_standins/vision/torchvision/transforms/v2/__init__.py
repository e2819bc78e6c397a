"""``torchvision.transforms.v2`` stand-in (see ``torchvision.transforms``)."""

from .. import InterpolationMode  # noqa: F401
from .. import __getattr__ as _transform_getattr
from . import functional  # noqa: F401


def __getattr__(name: str):
    if name == "functional":
        raise AttributeError(name)
    return _transform_getattr(name)
