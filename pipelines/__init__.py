"""Everything that turns image files into batches on the training device; nothing here knows about models."""

from pathlib import Path

from pipelines.dali import IMAGENET_MEAN, IMAGENET_STD, StageSpec, build_train_pipeline, build_val_pipeline
from pipelines.folder import DatasetError, Split, index_dataset, index_split
from pipelines.loader import ImageDecodeError, StageLoader


def open_dataset(data: str | Path) -> tuple[Split, Split]:
    """The train and val splits of an ImageNet-layout folder, or of WebDataset shards (``wds:DIR`` or
    ``wds:PATTERN``, pipelines/wds.py)."""
    from pipelines.wds import is_wds, wds_splits

    if is_wds(str(data)):
        return wds_splits(str(data))
    return index_dataset(Path(data))


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DatasetError", "ImageDecodeError", "Split", "StageLoader", "StageSpec",
    "build_train_pipeline", "build_val_pipeline", "index_dataset", "index_split", "open_dataset",
]
