"""The networks: the locality ViT and its helpers, registered with timm on import."""

from model.factory import MODELS, build_model, set_image_size
from model.locality_vit import ACTIVATIONS, LocalityBlock, LocalityFeedForward, LocalityViT

__all__ = [
    "ACTIVATIONS", "MODELS", "LocalityBlock", "LocalityFeedForward", "LocalityViT", "build_model", "set_image_size",
]
