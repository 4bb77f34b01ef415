"""xception: the Xception paper (Chollet, CVPR 2017) as a PyTorch toolkit."""

__version__ = "0.1.0"
__all__ = ["Xception", "XceptionConfig", "create_model", "list_models", "model_config"]

# Where each name lives: loaded on first use (PEP 562), so that `import xception.cli` and
# `xception --help` do not wait seconds for torch, and the command line's own Ctrl-C handling
# covers torch's loading too.
_HOMES = {"Xception": "model", "XceptionConfig": "model", "create_model": "zoo",
          "list_models": "zoo", "model_config": "zoo"}  # fmt: skip


def __getattr__(name: str):
    from importlib import import_module

    if name in _HOMES:
        value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    try:  # a module of the package: `import xception` then `xception.train.fit(...)`
        return import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":  # the module is there, but something it needs is not
            raise
    raise AttributeError(f"module 'xception' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
