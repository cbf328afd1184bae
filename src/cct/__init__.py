"""cct: Compact Convolutional Transformers (Hassani et al., 2021) for PyTorch."""
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import CCTError, CheckpointError
from .model import CCT, CCTConfig, count_macs, num_params
from .registry import create_model, from_keras, get_config, list_models

__version__ = "0.1.0"


__all__ = ["CCT", "CCTConfig", "CCTError", "CheckpointError", "count_macs", "create_model", "from_keras",
           "get_config", "list_models", "load_checkpoint", "num_params", "save_checkpoint"]
