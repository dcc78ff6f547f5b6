"""The DALI CPU pipelines, the folder index and the decode-error path, on tiny generated folders."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipelines import IMAGENET_MEAN, IMAGENET_STD, DatasetError, ImageDecodeError, StageLoader, StageSpec, index_dataset
from pipelines.folder import index_split
from tests.conftest import CLASS_COLOURS, make_colour_dataset

CPU = torch.device("cpu")


def _unnormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


def test_index_labels_follow_sorted_class_folders(colour_dataset):
    train, val = index_dataset(colour_dataset)
    assert train.classes == val.classes == tuple(sorted(CLASS_COLOURS))
    for path, label in zip(train.files, train.labels, strict=True):
        assert Path(path).parent.name == train.classes[label]
    assert len(train) == 24 and len(val) == 12


@pytest.mark.parametrize("size", [32, 64])
def test_train_pipeline_shapes_ranges_and_labels(colour_dataset, size):
    train, _ = index_dataset(colour_dataset)
    loader = StageLoader(train, StageSpec(image_size=size, batch_size=4, num_threads=1), train=True, device=CPU)
    assert len(loader) == 6
    batches = list(loader)
    assert len(batches) == 6
    labels_seen = Counter()
    for images, labels in batches:
        assert images.shape == (4, 3, size, size) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        pixels = _unnormalize(images)
        assert pixels.min() >= -0.01 and pixels.max() <= 1.01  # normalized with ImageNet mean/std
        # each class is one dominant colour: the brightest channel is the label
        assert torch.equal(pixels.mean(dim=(2, 3)).argmax(dim=1), labels)
        labels_seen.update(labels.tolist())
    assert labels_seen == Counter({0: 8, 1: 8, 2: 8})  # one epoch: every image once


def test_train_pipeline_reshuffles_each_epoch(colour_dataset):
    train, _ = index_dataset(colour_dataset)
    loader = StageLoader(train, StageSpec(image_size=32, batch_size=8, num_threads=1), train=True, device=CPU)
    orders = [torch.cat([labels for _, labels in loader]).tolist() for _ in range(3)]
    assert all(Counter(o) == Counter({0: 8, 1: 8, 2: 8}) for o in orders)
    assert orders[0] != sorted(orders[0])  # shuffled, not class-sorted
    assert len({tuple(o) for o in orders}) > 1


def test_val_pipeline_sees_every_image_once_centre_cropped(colour_dataset):
    _, val = index_dataset(colour_dataset)
    loader = StageLoader(val, StageSpec(image_size=48, batch_size=5, num_threads=1), train=False, device=CPU)
    assert len(loader) == 3
    for _ in range(2):  # and again on a second pass
        labels = []
        for images, batch_labels in loader:
            assert images.shape[1:] == (3, 48, 48)
            labels += batch_labels.tolist()
        assert sorted(labels) == sorted(val.labels)


def test_stage_change_rebuilds_at_the_new_size(colour_dataset):
    train, _ = index_dataset(colour_dataset)
    loader = StageLoader(train, StageSpec(image_size=32, batch_size=4, num_threads=1), train=True, device=CPU)
    assert next(iter(loader))[0].shape[-1] == 32
    loader.set_stage(StageSpec(image_size=64, batch_size=6, num_threads=1))
    images, labels = next(iter(loader))
    assert images.shape == (6, 3, 64, 64) and len(loader) == 4
    loader.close()


def test_truncated_jpeg_is_named(tmp_path):
    root = make_colour_dataset(tmp_path / "data", train_per_class=4, val_per_class=1)
    good = root / "train" / "b_green" / "b_green_0.JPEG"
    bad = root / "train" / "b_green" / "zz_truncated.JPEG"
    bad.write_bytes(good.read_bytes()[:400])
    train, _ = index_dataset(root)
    loader = StageLoader(train, StageSpec(image_size=32, batch_size=13, num_threads=1), train=True, device=CPU)
    with pytest.raises(ImageDecodeError) as err:
        for _ in loader:
            pass
    assert err.value.path == str(bad)
    assert "vit-prepare" in str(err.value)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        index_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no train/ folder"):
        index_dataset(tmp_path / "empty")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "x.JPEG").write_bytes(b"")
    with pytest.raises(DatasetError, match="no class subfolders"):
        index_dataset(tmp_path / "flat")
    (tmp_path / "noimg" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images"):
        index_dataset(tmp_path / "noimg")


def test_val_class_unknown_to_train_is_refused(tmp_path):
    root = make_colour_dataset(tmp_path / "data", train_per_class=1, val_per_class=1)
    shutil.copytree(root / "val" / "a_red", root / "val" / "d_extra")
    with pytest.raises(DatasetError, match="d_extra"):
        index_dataset(root)


def test_prepared_file_list_is_used(tmp_path):
    root = make_colour_dataset(tmp_path / "data", train_per_class=2, val_per_class=1)
    (root / "train.txt").write_text("train/c_blue/c_blue_1.JPEG 2\ntrain/a_red/a_red_0.JPEG 0\n")
    split = index_split(root, "train")
    assert split.files == (str(root / "train/c_blue/c_blue_1.JPEG"), str(root / "train/a_red/a_red_0.JPEG"))
    assert split.labels == (2, 0)


def test_synthetic_loader_matches_the_stage_loader_interface():
    from pipelines.synthetic import SyntheticLoader

    loader = SyntheticLoader(10, StageSpec(image_size=32, batch_size=4), steps_per_epoch=3, device=CPU)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    for images, labels in batches:
        assert images.shape == (4, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and int(labels.max()) < 10
    batches[0][0].zero_()  # a consumer's in-place augmentation does not leak into the next batch
    assert next(iter(loader))[0].abs().sum() > 0
    loader.set_stage(StageSpec(image_size=48, batch_size=2))
    assert next(iter(loader))[0].shape == (2, 3, 48, 48)


def test_stream_handoff_binds_the_outputs_to_torch_current_stream(monkeypatch):
    """With --data-handoff stream, DALI's iterator gets the batch ordered on PyTorch's stream, not the host."""
    from pipelines.loader import _hand_outputs_to_torch_stream

    calls = []

    class Pipe:
        def share_outputs(self, cuda_stream=None):
            calls.append(cuda_stream)
            return ["outputs"]

    stream = object()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    pipe = Pipe()
    _hand_outputs_to_torch_stream(pipe, torch.device("cuda"))
    assert pipe.share_outputs() == ["outputs"]  # called as DALI's iterator calls it: no arguments
    assert calls == [stream]
    with pytest.raises(ValueError, match="handoff"):
        StageSpec(image_size=32, batch_size=2, handoff="later")


@pytest.mark.parametrize(("n", "steps"), [(24, 3), (23, 3), (21, 2)])
def test_train_shards_are_disjoint_cover_the_epoch_and_take_the_same_steps(colour_dataset, n, steps):
    """Two ranks' shards of two epochs (each file labelled with its own index, to tell them apart): each rank its own
    augmentation seed, one shuffle seed for all, so the second epoch's reshuffled order is partitioned too."""
    import dataclasses

    train, _ = index_dataset(colour_dataset)
    split = dataclasses.replace(train, files=train.files[:n], labels=tuple(range(n)))
    seen = []
    for shard in range(2):
        spec = StageSpec(image_size=32, batch_size=4, num_threads=1, shard_id=shard, num_shards=2, seed=shard,
                         shuffle_seed=7)
        loader = StageLoader(split, spec, train=True, device=CPU)
        epochs = [[batch_labels.tolist() for _, batch_labels in loader] for _ in range(2)]
        for labels in epochs:  # every rank the same steps, every epoch (the remainder drained, not carried over)
            assert len(labels) == len(loader) == steps and all(len(b) == 4 for b in labels)
        seen.append([{label for batch in epoch for label in batch} for epoch in epochs])
    for epoch in range(2):
        first, second = seen[0][epoch], seen[1][epoch]
        assert not first & second  # disjoint ...
        assert len(first | second) >= min(n, 2 * steps * 4) - 1  # ... and covering, but for a padded repeat
        if n == 24:
            assert first | second == set(range(n))


def test_every_format_dali_decodes_is_read_and_the_rest_is_counted(tmp_path):
    """A user's folder: a third of the images WebP, some BMP, TIFF and JPEG 2000; notes and a hidden file beside."""
    from PIL import Image

    from pipelines.folder import describe_skipped

    root = make_colour_dataset(tmp_path / "data", train_per_class=6, val_per_class=1)
    formats = [("webp", "WEBP"), ("bmp", "BMP"), ("tiff", "TIFF"), ("jp2", "JPEG2000")]
    for n, path in enumerate(sorted((root / "train").rglob("*.JPEG"))[::2]):
        ext, fmt = formats[n % len(formats)]
        with Image.open(path) as im:
            im.save(path.with_suffix(f".{ext}"), fmt)
        path.unlink()
    (root / "train" / "a_red" / "notes.txt").write_text("x")
    (root / "train" / "b_green" / ".DS_Store").write_bytes(b"x")
    (root / "train" / "README.md").write_text("x")
    train, _ = index_dataset(root)
    assert len(train) == 18  # nothing dropped: 9 JPEGs, 9 in the other formats
    assert Counter(Path(f).suffix for f in train.files) == {".JPEG": 9, ".webp": 3, ".bmp": 2, ".tiff": 2, ".jp2": 2}
    assert dict(train.skipped) == {".txt": 1, "(no extension)": 1, ".md": 1}
    assert describe_skipped(train.skipped).startswith("skipped 3 files: ")
    loader = StageLoader(train, StageSpec(image_size=32, batch_size=6, num_threads=1), train=False, device=CPU)
    batches = list(loader)
    loader.close()
    assert sum(len(labels) for _, labels in batches) == 18  # every file decoded
    for images, labels in batches:  # and decoded right: the class colour is the brightest channel
        colour = _unnormalize(images).mean(dim=(2, 3)).argmax(dim=1)
        assert colour.tolist() == labels.tolist()
