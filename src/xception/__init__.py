"""xception: the Xception paper (Chollet, CVPR 2017) as a PyTorch toolkit."""

from .model import Xception, XceptionConfig
from .zoo import create_model, list_models, model_config

__version__ = "0.1.0"
__all__ = ["Xception", "XceptionConfig", "create_model", "list_models", "model_config"]
