"""cct: Compact Convolutional Transformers (Hassani et al., 2021) for PyTorch.

The names below load on first use (PEP 562), so that `import cct` and the `cct` command start without torch:
a Ctrl-C while it loads is then the command's own "interrupted", not a traceback (`cct.console`).
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {"load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "CCTError": "errors",
            "CheckpointError": "errors", "CCT": "model", "CCTConfig": "model", "count_macs": "model",
            "num_params": "model", "create_model": "registry", "from_keras": "registry", "get_config": "registry",
            "list_models": "registry"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    try:  # a submodule, as `import cct; cct.kernels.fuse(model)` found it when the package loaded eagerly
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'cct' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
