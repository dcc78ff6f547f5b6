"""The networks: the locality ViT and its baselines, registered with timm on import; nothing here knows about data."""

from model.factory import BASELINES, LOCALITY_MODELS, MODELS, build_model, set_grid
from model.locality_vit import ACTIVATIONS, LocalityBlock, LocalityFeedForward, LocalityViT
from model.localvit import LocalViT, LocalViTBlock, LocalViTFeedForward

__all__ = [
    "ACTIVATIONS", "BASELINES", "LOCALITY_MODELS", "MODELS", "LocalViT", "LocalViTBlock", "LocalViTFeedForward",
    "LocalityBlock", "LocalityFeedForward", "LocalityViT", "build_model", "set_grid",
]
