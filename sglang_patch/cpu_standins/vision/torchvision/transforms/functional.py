"""``torchvision.transforms.functional`` stand-in: every function raises when called."""


def refusing(module: str):
    """A module ``__getattr__`` whose every name is a function that refuses to run."""

    def __getattr__(name: str):
        if name.startswith("__") or name == "InterpolationMode":
            raise AttributeError(name)

        def _unavailable(*args, **kwargs):
            raise RuntimeError(f"{module}.{name}: torchvision is not installed (megatron-smd CPU stand-in); "
                               f"image inputs are not supported on this server")

        return _unavailable

    return __getattr__


__getattr__ = refusing(__name__)
