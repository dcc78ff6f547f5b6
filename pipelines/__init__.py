"""Everything that turns image files into batches on the training device; nothing here knows about models."""

from pipelines.dali import IMAGENET_MEAN, IMAGENET_STD, StageSpec, build_train_pipeline, build_val_pipeline
from pipelines.folder import DatasetError, Split, index_dataset, index_split
from pipelines.loader import ImageDecodeError, StageLoader

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DatasetError", "ImageDecodeError", "Split", "StageLoader", "StageSpec",
    "build_train_pipeline", "build_val_pipeline", "index_dataset", "index_split",
]
