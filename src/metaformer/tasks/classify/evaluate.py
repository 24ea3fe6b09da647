"""``metaformer classify eval``: top-1, top-5, per-class accuracy, loss and images/s of a checkpoint, and its
confusion-matrix PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from metaformer.data.embedded import DIGITS_CLASSES
from metaformer.data.fashion_mnist import is_fashion_mnist
from metaformer.data.sources import classification_splits
from metaformer.data.transforms import eval_transform_from_preprocessing
from metaformer.deploy import prepare_for_inference
from metaformer.deploy.calibration import calibration_set, run_record, transform_key
from metaformer.deploy.options import DeployOptions, compare_with_fp32, held_out_report, max_drop_option
from metaformer.engine import skeleton
from metaformer.engine.distributed import pick_device
from metaformer.engine.loop import amp_dtype, use_channels_last
from metaformer.engine.skeleton import seeded_subset
from metaformer.engine.state import CONFIG_FILE
from metaformer.errors import CheckpointError, ConfigError, DataError, check_choice
from metaformer.options import AMP_MODES, FRACTION, OPEN_UNIT, POSITIVE, EvalOptions, option
from metaformer.tasks import command
from metaformer.tasks.classify.loading import _readable_names, load_classifier
from metaformer.tasks.classify.recipes import VAL_SPLIT
from metaformer.tasks.classify.train import ClassificationTask


@dataclass(frozen=True, kw_only=True)
class EvalConfig(DeployOptions, EvalOptions):
    """Evaluate a checkpoint on DIR/val; when ``data`` is None, on the validation part of the data its
    run recorded in config.json beside the checkpoint, else the embedded digits' val split."""

    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "data": {
            "help": "folder with val/<class>/* images (without val/: the part --val-split held out in "
            "training), or fashion-mnist[:DIR] (its 10,000 test images); default: the data in the "
            "run's config.json beside --checkpoint, else the embedded digits"
        },
        "limit": {"check": POSITIVE},
    }

    checkpoint: str | None = option(
        None,
        "weights file (metaformer, official, timm or transformers) or save_pretrained folder",
        metavar="PATH",
    )
    model: str | None = option(None, "model name (needed for official/timm checkpoints and --pretrained)")
    pretrained: bool = option(False, "evaluate the released ImageNet weights of --model")
    batch_size: int = option(128, metavar="N", check=POSITIVE)
    img_size: int | None = option(None, "override the eval input size", metavar="PX", check=POSITIVE)
    crop_pct: float | None = option(
        None,
        "override the eval centre-crop fraction",
        metavar="F",
        check=FRACTION,
    )
    amp: str = option("off", "autocast dtype", choices=AMP_MODES)
    channels_last: bool | None = option(
        None, "channels-last memory format (default: on for CPU, where it is faster; off for CUDA)"
    )
    confusion_png: str | None = option(
        None, "confusion-matrix image (default: next to the checkpoint)", flag="--confusion", metavar="PNG"
    )
    max_drop: float = max_drop_option("top-1")
    val_split: float = option(
        VAL_SPLIT,
        f"for a folder without val/: the fraction training held out ({VAL_SPLIT})",
        metavar="F",
        check=OPEN_UNIT,
    )

    def __post_init__(self) -> None:
        self.check_deploy()
        super().__post_init__()
        check_choice("amp", self.amp, AMP_MODES)
        if (self.checkpoint is None) == (not self.pretrained):
            raise ConfigError("pass --checkpoint PATH or --pretrained (one of them)")


@command(
    "eval",
    EvalConfig,
    "top-1/top-5/loss/images-per-s and a confusion matrix",
    "Evaluate a checkpoint on DIR/val (default: the data its training run recorded in config.json beside "
    "the checkpoint, the part it held out for validation; else the embedded digits' val split). "
    "Official ImageNet checkpoints use the paper's eval transform; metaformer checkpoints the one "
    "they were trained with.",
)
def evaluate_classifier(config: EvalConfig) -> dict[str, Any]:
    """Top-1, top-5, per-class top-1, loss and images/s of a checkpoint, plus a confusion-matrix PNG."""
    model, classes, preproc = load_classifier(config.checkpoint, config.model, config.pretrained)
    transform = eval_transform_from_preprocessing(preproc, config.img_size, config.crop_pct)
    size = int(config.img_size if config.img_size is not None else preproc["input_size"][-1])
    data, val_split, source = config.data, config.val_split, "--data"
    record = run_record(config.checkpoint) if config.data is None else None
    if record is not None:  # the data the checkpoint's run trained on, and the part it held out
        data, val_split = record["data"], float(record.get("val_split") or val_split)
        source = f"recorded in {Path(str(config.checkpoint)).parent / CONFIG_FILE}"
        if data is not None and not is_fashion_mnist(data) and not Path(data).is_dir():
            raise DataError(
                f"the run trained on '{data}' ({source}), which is not a folder from here; pass --data DIR"
            )
    if data is None and len(classes) != len(DIGITS_CLASSES):
        raise CheckpointError(
            f"the checkpoint has {len(classes)} classes but the embedded digits have 10; pass --data DIR "
            "with matching class folders"
        )
    folder = Path(data) if data is not None and not is_fashion_mnist(data) else None
    with_val = folder is not None and ((folder / "val").is_dir() or not folder.is_dir())
    if with_val:  # folder_split maps the names to the checkpoint's indices
        val_dir = folder / "val"  # type: ignore[operator]
        found = sorted(e.name for e in os.scandir(val_dir) if e.is_dir()) if val_dir.is_dir() else []
        _check_classes(classes, found, val_dir, exact=False)
    dataset: Dataset = classification_splits(
        data, img_size=size, val_transform=transform, val_split=val_split, only="val", classes=classes,
    )[1]  # fmt: skip
    if data is not None and not with_val:  # Fashion-MNIST, or the part training held out
        _check_classes(classes, dataset.classes, folder or data)  # type: ignore[attr-defined]
    skipped = len(dataset.skipped) if folder is not None else 0  # type: ignore[attr-defined]
    if data is None:
        described = "embedded:digits (val split)"
    elif folder is None:
        described = f"{data} (test split)"
    else:
        described = f"{folder} (val/)" if with_val else f"{folder} (the held-out {val_split:g})"
    if source != "--data":
        described += f", {source}"
    dataset = seeded_subset(dataset, config.limit, 0)
    device = pick_device(config.device)
    model = model.to(device)
    channels_last = use_channels_last(config.channels_last, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = ClassificationTask(classes)
    dtype = amp_dtype(config.amp, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    calibration = None
    if config.precision == "int8":
        calibration = calibration_set(
            config.checkpoint, config.calibration_data,
            eval_transform_from_preprocessing(preproc, size, config.crop_pct), transform_key(preproc, size),
        )  # fmt: skip
    batch_size = min(config.batch_size, len(dataset))  # type: ignore[arg-type]
    runner, backend = prepare_for_inference(
        model, backend=config.backend, precision=config.precision, device=device, img_size=(size, size),
        batch_size=batch_size, amp=dtype, threads=config.threads, calibration=calibration,
        images=len(dataset), min_agreement=config.min_agreement,  # type: ignore[arg-type]
    )  # fmt: skip
    recorded = Predictions(runner)

    def run(module: torch.nn.Module, task: ClassificationTask) -> tuple[dict[str, float], float]:
        return skeleton.evaluate_dataset(
            task, module, dataset, device=device, batch_size=config.batch_size,
            num_workers=config.num_workers, progress=config.progress, dtype=dtype,
            channels_last=channels_last,
        )  # fmt: skip

    metrics, seconds = run(recorded, task)
    compared: dict[str, Any] = {}
    if config.precision != "fp32":  # the same images in fp32 (our fast path): the accuracy it cost
        reference = Predictions(prepare_for_inference(model, backend="torch", device=device)[0])
        fp32_top1 = run(reference, ClassificationTask(classes))[0]["top1"]
        agreement = 100.0 * float((recorded.all() == reference.all()).float().mean())
        compared = {"fp32_top1": fp32_top1}
        compared.update(
            compare_with_fp32(
                "top-1",
                metrics["top1"],
                fp32_top1,
                agreement,
                precision=config.precision,
                max_drop=config.max_drop,
                unit="%",
            )  # fmt: skip
        )
    png = config.confusion_png
    if png is None:
        png = (
            str(Path(config.checkpoint).with_name(Path(config.checkpoint).stem + "-confusion.png"))
            if config.checkpoint
            else "confusion.png"
        )
    per_class: dict[str, float | None] = {}
    if task.confusion is not None:
        plot_confusion(task.confusion, _readable_names(classes), png)
        per_class = per_class_accuracy(task.confusion, classes)
    return {
        "model": getattr(model, "model_name", config.model),
        "checkpoint": config.checkpoint or f"pretrained:{config.model}",
        "backend": backend,
        "precision": getattr(runner, "precision", config.precision),
        "runs_with": runner.describe() if hasattr(runner, "describe") else backend,
        **compared,
        **held_out_report(runner),
        "data": described,
        "images": len(dataset),  # type: ignore[arg-type]
        "skipped_images": skipped,
        "top1": metrics["top1"],
        "top5": metrics.get("top5", metrics.get(f"top{min(5, len(classes))}")),
        "per_class_top1": per_class,
        "loss": metrics["loss"],
        "images_per_s": len(dataset) / seconds if seconds > 0 else None,  # type: ignore[arg-type]
        "seconds": seconds,
        "confusion_png": png,
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in preproc.items()},
    }


class Predictions(torch.nn.Module):
    """``runner`` that also keeps its top-1 class per image, in order (to compare two precisions)."""

    def __init__(self, runner: torch.nn.Module):
        super().__init__()
        self.runner = runner
        self.top1: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.runner(x)
        self.top1.append(out.argmax(1).cpu())
        return out

    def all(self) -> torch.Tensor:
        return torch.cat(self.top1) if self.top1 else torch.zeros(0, dtype=torch.long)


def _check_classes(classes: Sequence[str], found: Sequence[str], where: Any, exact: bool = True) -> None:
    """The data's classes must be the checkpoint's (in its order, unless the data set maps them itself)."""
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise CheckpointError(
            f"the checkpoint has {len(classes)} classes but '{where}' has {len(found)} class folders, "
            f"{len(unknown)} of them unknown to it (e.g. '{unknown[0]}'); evaluate on matching data or "
            "fine-tune first with `metaformer classify train --init-checkpoint`"
        )
    if exact and list(found) != list(classes):
        raise CheckpointError(
            f"'{where}' has {len(found)} of the checkpoint's {len(classes)} classes or another order of "
            "them; evaluate on the data it was trained on"
        )


def per_class_accuracy(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, float | None]:
    """Top-1 in percent of each class's images (None for a class with no image in the data)."""
    counts = confusion.sum(dim=1)
    return {
        str(name): (100.0 * float(confusion[i, i]) / float(counts[i]) if counts[i] > 0 else None)
        for i, name in enumerate(classes)
    }


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike) -> None:
    """Row-normalised confusion matrix (true class down, predicted across) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metaformer.weights import atomic_write

    counts = matrix.double()
    rates = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    n = len(class_names)
    size = min(4 + 0.35 * n, 14)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if counts[i, j] > 0:
                        ax.text(
                            j,
                            i,
                            int(counts[i, j]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = counts.diagonal().sum() / counts.sum().clamp(min=1)
    ax.set_title(f"confusion matrix (top-1 {100 * float(accuracy):.2f}%)")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
