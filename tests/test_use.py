"""The model after the run: vit-eval, vit-predict, vit-export on a tiny run trained in the test; timm opens the
exported folder; ONNX Runtime runs the exported file."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FakeTime, make_colour_dataset, run_on_fake_time
from trainer.cli import main as train_main
from trainer.commands import eval_main, export_main, predict_main
from trainer.use import open_run

REPO = Path(__file__).resolve().parents[1]
# a learning rate too small to learn the colours (they take a few steps otherwise), so the accuracies compared
# below are not all 100%: 66.7% top-1 on the 18 val images when this was written
TINY = ["--model", "vit_local_test_patch16", "--image-size", "32", "--batch-size", "8", "--workers", "1",
        "--lr", "1e-6", "--min-lr", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("use-data"), train_per_class=8, val_per_class=6)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A finished run: 6 s of 1-s steps on the fake clock (conftest.FakeTime)."""
    out = tmp_path_factory.mktemp("use-runs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        run_on_fake_time(mp.setattr, FakeTime())
        assert train_main(["--data", str(data), *TINY, "--budget", "6s", "--out", str(out)]) == 0
    return out


def _fresh(run: Path, tmp_path: Path) -> Path:
    """A copy of the trained run, so a test's outputs do not meet another's."""
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "eval", ignore_errors=True)
    return copy


def test_vit_eval_gives_the_runs_own_final_numbers_at_each_size(run, tmp_path, capsys):
    run = _fresh(run, tmp_path)
    assert eval_main([str(run), "--image-size", "32,48"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    result = json.loads((run / "eval" / "val-32px.json").read_text())
    assert result["images"] == 18 and result["source"] == "model.safetensors" and result["weights"] == "raw"
    assert result["top1"] == pytest.approx(summary["top1"], abs=1e-9)  # same images, same size, same weights
    assert result["top5"] == pytest.approx(summary["top5"], abs=1e-9)
    assert set(result["per_class"]) == {"a_red", "b_green", "c_blue"}
    confusion = torch.tensor(result["confusion"])
    assert confusion.sum() == 18 and confusion.diagonal().sum() / 18 == pytest.approx(result["top1"])
    assert (run / "eval" / "val-32px-confusion.png").stat().st_size > 0
    assert json.loads((run / "eval" / "val-48px.json").read_text())["image_size"] == 48
    assert "val-<size>px.json" in capsys.readouterr().out


def test_vit_predict_agrees_with_vit_eval_and_names_the_classes(run, data, tmp_path):
    run = _fresh(run, tmp_path)
    assert eval_main([str(run)]) == 0
    top1 = json.loads((run / "eval" / "val-32px.json").read_text())["top1"]
    out = tmp_path / "preds.jsonl"
    assert predict_main([str(run), str(data / "val"), "--top-k", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 18 and all(len(r["classes"]) == 2 and r["probs"][0] >= r["probs"][1] for r in rows)
    right = sum(r["classes"][0] == Path(r["file"]).parent.name for r in rows)
    assert right / 18 == pytest.approx(top1)


def test_a_corrupt_image_is_one_line_and_the_others_are_predicted(run, data, tmp_path, capsys):
    good = sorted((data / "val" / "b_green").iterdir())[:2]
    bad = tmp_path / "cut.JPEG"
    bad.write_bytes(good[0].read_bytes()[:300])
    out = tmp_path / "preds.csv"
    assert predict_main([str(run), str(good[0]), str(bad), str(good[1]), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("file,class1,prob1") and [line.split(",")[0] for line in lines[1:]] == [
        str(good[0]), str(good[1])]


def test_timm_opens_the_finished_runs_model_folder(run):
    import timm

    opened = open_run(run)
    net = timm.create_model(f"local-dir:{run / 'model'}", pretrained=True).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net(images), opened.build()(images))
    cfg = timm.data.resolve_data_config({}, model=net)
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["crop_pct"] == 0.875
    assert tuple(cfg["mean"]) == pytest.approx((0.485, 0.456, 0.406)) and cfg["interpolation"] == "bilinear"
    assert net.pretrained_cfg["label_names"] == ["a_red", "b_green", "c_blue"]


@pytest.mark.parametrize(("size", "flags"), [(32, []), (48, ["--dynamic-batch"])], ids=["32px", "48px-old-flag"])
def test_the_onnx_file_computes_what_pytorch_does_at_any_batch(run, tmp_path, size, flags, capsys):
    """By default the ONNX model takes any batch size (``--dynamic-batch``, once needed for it, is still accepted):
    ONNX Runtime gives PyTorch's logits at batch 1 and at batch 5 (the export traced 8)."""
    ort = pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / f"model-{size}.onnx"
    assert export_main([str(run), "--onnx", str(onnx_file), "--image-size", str(size), *flags,
                        "--out", str(tmp_path / "timm")]) == 0
    assert "(any batch size)" in capsys.readouterr().out
    session, net = ort.InferenceSession(str(onnx_file)), open_run(run).build()
    for batch in (1, 5):
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        got = session.run(["logits"], {"images": images.numpy()})[0]
        with torch.no_grad():
            want = net(images).numpy()
        assert got.shape == (batch, 3) and abs(got - want).max() < 1e-4  # atol 1e-4 on the logits, fp32 on the CPU


def test_static_batch_fixes_the_onnx_models_batch(run, tmp_path, capsys):
    """``--static-batch 3``: the model takes batches of 3 images, and ONNX Runtime refuses any other."""
    ort = pytest.importorskip("onnxruntime")
    onnx_file = tmp_path / "model.onnx"
    assert export_main([str(run), "--onnx", str(onnx_file), "--static-batch", "3",
                        "--out", str(tmp_path / "timm")]) == 0
    assert "(batch 3 only)" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_file))
    assert session.get_inputs()[0].shape == [3, 3, 32, 32]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = session.run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        assert abs(got - open_run(run).build()(images).numpy()).max() < 1e-4
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(["logits"], {"images": images[:1].numpy()})


@pytest.mark.parametrize(("flags", "needle"), [
    (["--onnx", "M", "--static-batch", "0"], "vit-export: error: argument --static-batch: '0' is not a positive"),
    (["--static-batch", "2"], "vit-export: error: --static-batch: only with --onnx"),
    (["--onnx", "M", "--static-batch", "2", "--dynamic-batch"], "--dynamic-batch: not allowed with argument "
                                                                "--static-batch"),
])
def test_bad_batch_flags_are_one_line_exit_2_and_nothing_written(run, tmp_path, capsys, flags, needle):
    before = sorted(run.rglob("*"))
    try:
        code = export_main([str(run), *[str(tmp_path / "m.onnx") if f == "M" else f for f in flags]])
    except SystemExit as e:  # argparse's error: the parser's one line
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert sorted(run.rglob("*")) == before and not (tmp_path / "m.onnx").exists()


def test_an_unfinished_run_evaluates_from_its_checkpoint(data, tmp_path):
    """A run SIGKILLed (in its own process, long before its budget) after its first checkpoint: vit-eval evaluates
    the newest checkpoint, every val image."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--data", str(data), *TINY, "--budget", "300s",
                             "--ckpt-every", "1s", "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("ckpt-*.pt")) or not (out / "metrics.jsonl").exists() or \
                '"event": "checkpoint"' not in (out / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "model.safetensors").exists()
    newest = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert eval_main([str(out)]) == 0
    result = json.loads((out / "eval" / "val-32px.json").read_text())
    assert result["source"] == newest.name and result["images"] == 18


def _no_weights(run: Path, tmp: Path) -> Path:
    bare = tmp / "bare"
    bare.mkdir()
    shutil.copy(run / "config.json", bare / "config.json")
    return bare


@pytest.mark.parametrize("command", [eval_main, export_main, predict_main], ids=["eval", "export", "predict"])
@pytest.mark.parametrize(("make", "flags", "needle"), [
    (lambda run, tmp: tmp, [], "is not a vit-train run directory"),
    (_no_weights, [], "holds no readable weights"),
    (lambda run, tmp: run, ["--weights", "best"], "--weights: 'best' is not one of auto, ema, raw"),
    (lambda run, tmp: run, ["--weights", "ema"], "kept no EMA weights"),
    (lambda run, tmp: run, ["--image-size", "50"], "--image-size: 50 is not a positive multiple of the patch size"),
], ids=["not-a-run", "no-weights", "unknown-weights", "no-ema", "bad-size"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(run, data, tmp_path, capsys, command, make, flags, needle):
    work = tmp_path / "work"
    work.mkdir()
    target = make(_fresh(run, tmp_path), work)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    extra = [str(data / "val")] if command is predict_main else []
    assert command([str(target), *extra, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _eval_rank(rank: int, port: int, argv: list[str], work: str) -> None:
    """One rank of `torchrun --nproc-per-node 2 -m trainer.commands` … as torchrun would start it."""
    import os

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    Path(work, f"rank{rank}.code").write_text(str(eval_main(argv)))


def test_vit_eval_under_two_processes_counts_each_image_once(run, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert eval_main([str(run), "--out", str(tmp_path / "one")]) == 0
    ctx = mp.start_processes(_eval_rank, args=(port, [str(run), "--out", str(tmp_path / "two")], str(tmp_path)),
                             nprocs=2, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert [(tmp_path / f"rank{r}.code").read_text() for r in range(2)] == ["0", "0"]
    one, two = (json.loads((tmp_path / d / "val-32px.json").read_text()) for d in ("one", "two"))
    for key in ("images", "top1", "top5", "confusion", "per_class"):
        assert two[key] == one[key], key
