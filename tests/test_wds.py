"""Training straight from WebDataset shards (--data wds:…): DALI's webdataset reader, indexed on first use."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipelines import DatasetError, StageLoader, StageSpec, open_dataset
from tests.conftest import make_colour_dataset
from trainer.cli import main

CPU = torch.device("cpu")
TINY = ["--model", "vit_local_test_patch16", "--image-size", "32", "--batch-size", "8", "--workers", "1",
        "--log-every", "1"]


def write_shards(root: Path, out: Path, train_shards: int = 2, extra: dict[str, bytes] | None = None,
                 val_label: int | None = None) -> Path:
    """timm's imagenet-1k-wds layout from an ImageNet-layout folder: KEY.jpg, KEY.cls (the label in sorted class
    order, as ASCII digits), KEY.json (its class name); train shards round-robin, one val shard."""
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in (root / "train").iterdir())
    for split, name, count in (("train", "train", train_shards), ("val", "validation", 1)):
        files = sorted((root / split).rglob("*.JPEG"))
        for s in range(count):
            with tarfile.open(out / f"data-{name}-{s:04d}.tar", "w") as tar:
                for i, f in enumerate(files[s::count]):
                    label = classes.index(f.parent.name) if val_label is None or split == "train" else val_label
                    members = {"jpg": f.read_bytes(), "cls": f"{label}\n".encode(),
                               "json": json.dumps({"class_name": f.parent.name}).encode()}
                    if extra and split == "train" and i == 0:
                        members.update(extra)
                    for ext, data in members.items():
                        info = tarfile.TarInfo(f"{split}{s}_{i:05d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITBUDGET_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 60 train images (two shards of 30), 15 val images
    return make_colour_dataset(tmp_path_factory.mktemp("wds-src"), train_per_class=20, val_per_class=5)


def test_shards_index_once_and_read_as_the_folder_does(images, tmp_path):
    shards = write_shards(images, tmp_path / "shards")
    train, val = open_dataset(f"wds:{shards}")
    folder_train, folder_val = open_dataset(images)
    assert train.classes == folder_train.classes == ("a_red", "b_green", "c_blue")  # names from the .json members
    assert len(train) == 60 and len(val) == 15 and len(train.shards) == 2
    assert Counter(train.labels) == Counter(folder_train.labels) and Counter(val.labels) == Counter(folder_val.labels)
    made = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "wds-index").iterdir()}
    assert len(made) == 6  # an index and a label list per shard
    time.sleep(0.01)
    assert open_dataset(f"wds:{shards}/data-{{train,validation}}-*.tar")[0].labels == train.labels  # the brace form
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "wds-index").iterdir()} == made  # reused
    # through the val pipeline: every image once, decoded right (the class colour is the brightest channel)
    loader = StageLoader(val, StageSpec(image_size=32, batch_size=4, num_threads=1), train=False, device=CPU)
    seen = Counter()
    for batch, labels in loader:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        assert ((batch * std + mean).mean(dim=(2, 3)).argmax(dim=1) == labels).all()
        seen.update(labels.tolist())
    loader.close()
    assert seen == Counter(val.labels)


def test_two_ranks_read_disjoint_halves_and_take_the_same_steps(images, tmp_path):
    train, val = open_dataset(f"wds:{write_shards(images, tmp_path / 'shards')}")
    halves = []
    for rank in range(2):
        spec = StageSpec(image_size=16, batch_size=4, num_threads=1, shard_id=rank, num_shards=2)
        loader = StageLoader(val, spec, train=False, device=CPU)
        halves.append(Counter(label for _, labels in loader for label in labels.tolist()))
        loader.close()
        train_loader = StageLoader(train, spec, train=True, device=CPU)
        assert len(list(train_loader)) == len(train_loader) == 7  # 30 samples a rank: 7 full batches each
        train_loader.close()
    assert halves[0] + halves[1] == Counter(val.labels)  # each val image once over the two ranks
    assert sorted(sum(h.values()) for h in halves) == [7, 8]


def test_vit_train_from_shards_crosses_a_stage_and_evaluates_each_val_image_once(images, tmp_path, fake_time):
    """Trained from shards on the fake clock: the 32-px stage after two epochs, every val image evaluated once."""
    shards = write_shards(images, tmp_path / "shards")
    out = tmp_path / "run"
    assert main(["--data", f"wds:{shards}/data-{{train,validation}}-*.tar", *TINY, "--curriculum", "16:16:2",
                 "--budget", "40s", "--out", str(out)]) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["image_size"] for e in events if e["event"] == "stage"] == [16, 32]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and all(e["images"] == 15 for e in evals)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "budget" and summary["top1"] > 0.5
    assert json.loads((out / "config.json").read_text())["data_root"].startswith(f"wds:{shards}")


@pytest.mark.parametrize(("make", "needle"), [
    (lambda images, d: f"wds:{d}/nothing-{{train,val}}-*.tar", "no train shards match"),
    (lambda images, d: f"wds:{write_shards(images, d, extra={'txt': b'x'})}", "is neither an image nor a label"),
    (lambda images, d: f"wds:{write_shards(images, d, val_label=7)}", "is outside the 3 train classes"),
], ids=["no-match", "unknown-member", "label-out-of-range"])
def test_bad_shards_are_one_line_and_exit_2(images, tmp_path, capsys, make, needle):
    data = make(images, tmp_path / "shards")
    out = tmp_path / "run"
    assert main(["--data", data, *TINY, "--budget", "5s", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_a_pattern_without_a_brace_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="neither a folder of .tar shards nor a pattern"):
        open_dataset(f"wds:{tmp_path}/*.tar")
