"""cct: Compact Convolutional Transformers (Hassani et al., 2021) for PyTorch."""
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CCTError, CheckpointError
from .model import CCT, CCTConfig, count_macs, num_params
from .registry import create_model, get_config, list_models

__version__ = "0.1.0"


def from_keras(path):
    """The keras.io example's model (`cct_2_3x2_32_keras`) with the weights of its `.weights.h5` file."""
    from .interop.keras import from_keras as _from_keras
    return _from_keras(path)


__all__ = ["CCT", "CCTConfig", "CCTError", "CheckpointError", "count_macs", "create_model", "from_keras",
           "get_config", "list_models", "load_checkpoint", "num_params", "save_checkpoint"]
