"""The model after the run: ``vit-eval`` (timm's validate.py, for our runs), ``vit-predict`` (its inference.py)
and ``vit-export`` (a timm-loadable folder, and ONNX checked by ONNX Runtime). Each reads what the run recorded
(model, classes, sizes, EMA or not): no flag repeats it. Bad input is one line and exit 2, with nothing written."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipelines import DatasetError, ImageDecodeError, Split, open_dataset
from pipelines.files import FORMAT_NAMES, IMAGE_EXTENSIONS
from trainer.config import OneLineParser, fail
from trainer.data import EVAL_BATCH
from trainer.rundir import write_bytes_atomic, write_json_atomic
from trainer.use import MODEL_FOLDER, WEIGHTS, OpenedRun, RunError, check_size, open_run, write_model_folder


def _sizes(flag: str, text: str | None, default: int) -> list[int]:
    if text is None:
        return [default]
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RunError(f"{flag}: expected sizes like 96,128,160, got {text!r}") from None
    return [check_size(flag, s) for s in sizes] or [default]


def _device(name: str) -> Any:
    from trainer.step import resolve_device

    try:
        return resolve_device(name)
    except RuntimeError as e:
        raise RunError(str(e)) from None


def _loader(run: OpenedRun, split: Split, size: int, batch: int, device: Any, world: Any = None) -> Any:
    """The training evaluation's own val pipeline (resize, centre crop, normalize) at ``size``."""
    from pipelines import StageLoader
    from trainer.data import stage_spec

    spec = stage_spec(run.cfg, device, size, batch, train=False, world=world)
    return StageLoader(split, spec, train=False, device=device)


# -- vit-eval -------------------------------------------------------------------------------------------------------

def eval_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="vit-eval",
                      description="Evaluate a run's model on a split: top-1, top-5, per-class accuracy.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--data", help="ImageNet-layout folder or wds:… shards (default: what the run trained on)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--image-size", help="size or comma-separated sizes, multiples of 16 (default: the run's eval size)")
    p.add_argument("--weights", default="auto", help=f"{', '.join(WEIGHTS)} (auto: what the run evaluated)")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", type=Path, help="where the results go (default: RUN_DIR/eval)")
    return p


def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    from trainer import dist

    world = dist.world_from_env()
    try:
        run, split, sizes, device = _eval_inputs(args)
    except (RunError, DatasetError) as e:
        return fail("vit-eval", str(e)) if world.is_main else 2
    world = dist.init(device.type)
    try:
        results = [_evaluate_at(run, split, size, args.batch_size, device, world) for size in sizes]
    except ImageDecodeError as e:
        return fail("vit-eval", str(e), code=1)
    finally:
        dist.shutdown()
    if world.is_main:
        out = args.out or run.path / "eval"
        for result in results:
            _write_eval(out, run, args.split, result)
        print(_eval_table(run, args.split, results, out))
    return 0


def _eval_inputs(args: argparse.Namespace) -> tuple[OpenedRun, Split, list[int], Any]:
    if args.batch_size < 1:
        raise RunError(f"--batch-size must be positive, got {args.batch_size}")
    run = open_run(args.run_dir, args.weights)
    sizes = _sizes("--image-size", args.image_size, run.eval_size)
    root = args.data or run.data_root
    if root is None:
        raise RunError(f"{args.run_dir} does not record its data folder: pass --data DIR")
    train, val = open_dataset(str(root))
    split = val if args.split == "val" else train
    if split.classes != run.classes:
        raise RunError(f"{root}: its classes are not the {len(run.classes)} the run trained on")
    return run, split, sizes, _device(args.device)


def _evaluate_at(run: OpenedRun, split: Split, size: int, batch: int, device: Any, world: Any) -> dict[str, Any]:
    from trainer.evaluate import evaluate
    from trainer.step import resolve_amp

    net = run.build().to(device)
    loader = _loader(run, split, size, batch, device, world)
    start = time.perf_counter()
    result = evaluate(net, loader, resolve_amp(run.cfg.amp, device), world=world, num_classes=len(run.classes))
    seconds = time.perf_counter() - start
    loader.close()
    confusion = result.pop("confusion")
    per_class = (confusion.diagonal() / confusion.sum(dim=1).clamp(min=1)).tolist()
    return {**result, "image_size": size, "seconds": round(seconds, 3), "images_per_sec": round(result["images"] /
            seconds, 2), "per_class": dict(zip(run.classes, per_class, strict=True)),
            "confusion": confusion.tolist(), "weights": run.weights, "source": str(run.source.name)}


def _write_eval(out: Path, run: OpenedRun, split: str, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{split}-{result['image_size']}px"
    write_json_atomic(stem.with_suffix(".json"), {**result, "split": split, "model": run.cfg.model})
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(run.classes)
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.4 * n), min(11, 1.5 + 0.4 * n)))
    ax.imshow(result["confusion"], cmap="Blues")
    if n <= 40:
        ax.set_xticks(range(n), run.classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), run.classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{run.path.name}: {split} at {result['image_size']} px, top-1 {100 * result['top1']:.1f}%")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(Path(f"{stem}-confusion.png"), buf.getvalue())


def _eval_table(run: OpenedRun, split: str, results: list[dict[str, Any]], out: Path) -> str:
    lines = [f"{run.path}: {run.cfg.model}, {run.weights} weights from {run.source.name}, {split} split "
             f"({results[0]['images']} images)",
             f"{'size':>5} {'top1':>7} {'top5':>7} {'img/s':>8} {'worst class':>24}"]
    for r in results:
        worst = min(r["per_class"].items(), key=lambda kv: kv[1])
        lines.append(f"{r['image_size']:>5} {100 * r['top1']:>6.2f}% {100 * r['top5']:>6.2f}% "
                     f"{r['images_per_sec']:>8.1f} {worst[0][:16]:>16} {100 * worst[1]:>5.1f}%")
    lines.append(f"wrote {out}/{split}-<size>px.json (per-class accuracy, confusion matrix) and its -confusion.png")
    return "\n".join(lines)


# -- vit-predict ----------------------------------------------------------------------------------------------------

def predict_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="vit-predict", description="Classify images with a run's model: class names, probabilities.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", type=Path, help="write the predictions to a .csv or .jsonl file")
    p.add_argument("--image-size", type=int, help="default: the run's eval size")
    p.add_argument("--weights", default="auto", help=f"{', '.join(WEIGHTS)} (auto: what the run evaluated)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def predict_main(argv: list[str] | None = None) -> int:
    args = predict_parser().parse_args(argv)
    try:
        run, files, device = _predict_inputs(args)
    except RunError as e:
        return fail("vit-predict", str(e))
    good, failed = _decodable(files)
    rows = _predict(run, good, failed, args, device) if good else []
    for path, why in failed:
        print(f"vit-predict: {path}: {why}", file=sys.stderr)
    if args.out:
        _write_predictions(args.out, rows)
    for row in rows:
        print(row["file"] + "  " + "  ".join(f"{c} {p:.3f}" for c, p in zip(row["classes"], row["probs"], strict=True)))
    return 1 if failed else 0


def _predict_inputs(args: argparse.Namespace) -> tuple[OpenedRun, list[str], Any]:
    if args.top_k < 1 or args.batch_size < 1:
        raise RunError("--top-k and --batch-size must be positive")
    if args.out is not None and args.out.suffix not in (".csv", ".jsonl"):
        raise RunError(f"--out {args.out}: use a .csv or .jsonl file")
    run = open_run(args.run_dir, args.weights)
    if args.image_size is not None:
        check_size("--image-size", args.image_size)
    files: list[str] = []
    for item in args.inputs:
        if item.is_dir():
            files += sorted(str(p) for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            files.append(str(item))
        else:
            raise RunError(f"{item}: no such file or folder")
    if not files:
        raise RunError(f"no images ({FORMAT_NAMES}) in {', '.join(map(str, args.inputs))}")
    return run, files, _device(args.device)


def _decodable(files: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files that look whole and decode (Pillow), and the others with why: DALI would stop the batch on them."""
    from pipelines.integrity import decode_problem, structural_problem

    good, failed = [], []
    for path in files:
        problem = structural_problem(path) or decode_problem(path)
        (failed.append((path, problem)) if problem else good.append(path))
    return good, failed


def _predict(run: OpenedRun, files: list[str], failed: list[tuple[str, str]], args: argparse.Namespace,
             device: Any) -> list[dict[str, Any]]:
    """Batched through the val pipeline; a file DALI still cannot decode is moved to ``failed`` and the rest rerun."""
    import torch

    from trainer.step import resolve_amp

    net = run.build().to(device)
    amp = resolve_amp(run.cfg.amp, device)
    k = min(args.top_k, len(run.classes))
    while files:
        split = Split(root=Path("/"), files=tuple(files), labels=(0,) * len(files), classes=run.classes)
        loader = _loader(run, split, args.image_size or run.eval_size, args.batch_size, device)
        probs: list[torch.Tensor] = []
        try:
            with torch.inference_mode():
                for images, _ in loader:
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        probs.append(net(images).float().softmax(dim=1).cpu())
        except ImageDecodeError as e:
            failed.append((e.path or "?", e.reason))
            files = [f for f in files if f != e.path] if e.path in files else []
            continue
        finally:
            loader.close()
        top = torch.cat(probs)[: len(files)].topk(k, dim=1)
        return [{"file": f, "classes": [run.classes[i] for i in idx], "probs": [round(v, 5) for v in val]}
                for f, idx, val in zip(files, top.indices.tolist(), top.values.tolist(), strict=True)]
    return []


def _write_predictions(out: Path, rows: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        k = max((len(r["classes"]) for r in rows), default=0)
        writer.writerow(["file", *[f"{x}{i + 1}" for i in range(k) for x in ("class", "prob")]])
        for r in rows:
            writer.writerow([r["file"], *[v for pair in zip(r["classes"], r["probs"], strict=True) for v in pair]])
        text = buf.getvalue()
    write_bytes_atomic(out, text.encode())


# -- vit-export -----------------------------------------------------------------------------------------------------

def export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="vit-export", description="Export a run's model: a timm-loadable folder and/or ONNX.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help=f"the timm folder (default: RUN_DIR/{MODEL_FOLDER})")
    p.add_argument("--onnx", type=Path, help="also write an ONNX file, checked by ONNX Runtime against PyTorch")
    p.add_argument("--image-size", type=int, help="the input size (default: the run's eval size)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--static-batch", type=_batch, metavar="N",
                       help="ONNX: a model for batches of N images alone (default: any batch size)")
    batch.add_argument("--dynamic-batch", action="store_true", help=argparse.SUPPRESS)  # the default since issue 31
    p.add_argument("--weights", default="auto", help=f"{', '.join(WEIGHTS)} (auto: what the run evaluated)")
    p.add_argument("--atol", type=float, default=1e-4, help="ONNX check: largest absolute logit difference allowed")
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    try:
        run = open_run(args.run_dir, args.weights)
        size = check_size("--image-size", args.image_size) if args.image_size is not None else run.eval_size
        if args.onnx is not None:
            _need_onnx()
        elif args.static_batch is not None:
            raise RunError("--static-batch: only with --onnx")
    except RunError as e:
        return fail("vit-export", str(e))
    folder = write_model_folder(run, args.out or run.path / MODEL_FOLDER, size)
    print(f"wrote {folder} (timm: timm.create_model('local-dir:{folder}', pretrained=True))")
    if args.onnx is None:
        return 0
    from trainer.onnx_export import export_onnx

    diff, batches = export_onnx(run, args.onnx, size, static_batch=args.static_batch)
    verdict = "ok" if diff <= args.atol else f"over --atol {args.atol:g}"
    shape = f"batch {args.static_batch} only" if args.static_batch else "any batch size"
    print(f"wrote {args.onnx} ({shape}): ONNX Runtime vs PyTorch on the run's val images at {size} px, batch "
          f"{' and '.join(map(str, batches))}: max abs logit difference {diff:.2e} ({verdict})")
    return 0 if diff <= args.atol else 1


def _batch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _need_onnx() -> None:
    import importlib.util

    for module in ("onnx", "onnxruntime", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise RunError(f'--onnx: the {module} package is not installed (pip install -e ".[export]")')


def export_finished_run(run_dir: Path) -> Path:
    """What a finished training run leaves beside its weights: RUN_DIR/model, timm's layout."""
    run = open_run(run_dir)
    return write_model_folder(run, run_dir / MODEL_FOLDER)

