"""``torchvision.transforms.functional`` stand-in: every function raises when called."""


def __getattr__(name: str):
    if name.startswith("__") or name == "InterpolationMode":
        raise AttributeError(name)

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision.transforms.functional.{name}: torchvision is not installed "
                           f"(megatron-smd CPU stand-in); image inputs are not supported on this server")

    return _unavailable
