"""How ``segment eval`` and ``segment predict`` run a Semantic FPN on the deployment layer
(``metaformer.deploy``): the backend, precision and thread flags, int8's calibration images, and the
report of a bf16 or int8 run against fp32.

The segmenter's images differ in size after the keep-ratio eval resize (ADE20K's do), so one runner
takes every size: the exported graph has a dynamic height and width (``dynamic_size``), built and
cached once, rather than one artefact per distinct size (docs/dense.md gives the measured costs).

Calibration images are the eval view (the eval resize), centre-cropped to the training crop size so
that they stack into batches (an image smaller than the crop is resized to it); the quantization
ranges do not depend on the image size. By default they come from the training data named in the
run's ``config.json`` beside the checkpoint, or from the shapes set's train split for a checkpoint
trained on it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metaformer.data.segmentation import SegAugment, eval_resize, open_segmentation
from metaformer.data.shapes import SEGMENTATION_CLASSES, ShapesConfig, make_shapes
from metaformer.deploy import prepare_for_inference
from metaformer.deploy.calibration import calibration_set
from metaformer.deploy.options import DeployOptions, held_out_lines
from metaformer.deploy.quantize import CALIBRATION_IMAGES, Calibration
from metaformer.engine.state import read_run_config
from metaformer.errors import ConfigError
from metaformer.tasks.dense.data import data_root
from metaformer.tasks.dense.files import read_rgb

BATCH = 8  # calibration images per batch (each is a whole eval-size image)


def prepare_segmenter(
    model: nn.Module,
    options: DeployOptions,
    *,
    checkpoint: str,
    augment: SegAugment,
    class_names: Sequence[str],
    device: torch.device,
    img_size: tuple[int, int],
    images: int,
    shapes: ShapesConfig,
) -> tuple[nn.Module, str]:
    """(runner, backend) for ``model`` at ``options.precision``, taking images of every size;
    ``img_size`` is a typical eval size (where auto measures the backends)."""
    if options.threads:
        torch.set_num_threads(options.threads)
    calibration = None
    if options.precision == "int8":
        calibration = calibration_images(checkpoint, options.calibration_data, augment, class_names, shapes)
        if calibration is None:
            raise ConfigError(
                f"int8 needs calibration images and '{checkpoint}' has no config.json beside it naming "
                "its training data; pass --calibration-data DIR (a few hundred of your images)"
            )
    return prepare_for_inference(
        model.eval(),
        backend=options.backend,
        precision=options.precision,
        device=device,
        img_size=img_size,
        batch_size=1,
        threads=options.threads,
        calibration=calibration,
        images=images,
        dynamic_size=True,
        min_agreement=options.min_agreement,
    )


def fp32_reference(model: nn.Module, device: torch.device) -> nn.Module:
    """The fp32 fast path of ``model``: what a bf16 or int8 run is compared with."""
    return prepare_for_inference(model, backend="torch", device=device, dynamic_size=True)[0]


def compare_report(result: dict[str, Any]) -> list[str]:
    if "fp32_mIoU" not in result:
        return []
    return [
        f"  {result['precision']} against fp32 on the same images: mIoU {100 * result['mIoU']:.2f} vs "
        f"{100 * result['fp32_mIoU']:.2f} (drop {result['drop']:.2f} points, allowed "
        f"{result['max_drop']:g}); pixel agreement {result['agreement']:.2f}%",
        *held_out_lines(result),
    ]


# --------------------------------------------------------------------------- calibration images
def calibration_view(image: torch.Tensor, augment: SegAugment) -> torch.Tensor:
    """The eval view of a (3, H, W) [0, 1] image at the training crop size: the eval resize, then the
    centre crop (or, for an image smaller than the crop, a resize to it)."""
    image = eval_resize(image, augment)
    ch, cw = augment.crop_size
    h, w = image.shape[-2:]
    if h < ch or w < cw:
        return F.interpolate(image[None], size=(ch, cw), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[:, top : top + ch, left : left + cw].contiguous()


def calibration_images(
    checkpoint: str | Path,
    folder: str | Path | None,
    augment: SegAugment,
    class_names: Sequence[str],
    shapes: ShapesConfig,
) -> Calibration | None:
    """int8's calibration set: ``folder`` (searched recursively) when given, else the training split
    named in the run's config.json, else the shapes train split for a shapes checkpoint; None when
    none is known."""
    key = json.dumps(dataclasses.asdict(augment), sort_keys=True)

    def transform(pil: Any) -> torch.Tensor:
        array = np.asarray(pil, dtype=np.uint8).copy()
        return calibration_view(torch.from_numpy(array).permute(2, 0, 1).float().div_(255), augment)

    if folder is not None:
        return calibration_set(None, folder, transform, key)
    split = _training_split(Path(checkpoint), class_names, shapes)
    if split is None:
        return None
    root, name, layout, classes = split
    dataset_key = f"segment-train:{Path(root).resolve()}|{name}|{key}"

    def batches() -> Iterator[torch.Tensor]:
        # the training split's image files (opened as for training: its default split, its checks)
        paths = open_segmentation(
            root, name, layout=layout, classes=classes, train=True, augment=augment
        ).images
        order = np.random.default_rng(0).permutation(len(paths))[:CALIBRATION_IMAGES]
        for start in range(0, len(order), BATCH):
            chosen = order[start : start + BATCH]
            yield torch.stack([calibration_view(read_rgb(Path(paths[int(i)])), augment) for i in chosen])

    return Calibration(batches(), dataset_key, CALIBRATION_IMAGES)


def _training_split(
    checkpoint: Path, class_names: Sequence[str], shapes: ShapesConfig
) -> tuple[Path, str | None, str, str | None] | None:
    """(root, split, layout, classes file) of the data the checkpoint trained on, or None."""
    config = read_run_config(checkpoint)
    if config is not None and "data" in config:
        data = config.get("data")
        root = Path(data_root(data, shapes))
        layout = str(config.get("layout") or "auto") if data is not None else "auto"
        return root, config.get("train_split"), layout, config.get("classes") if data is not None else None
    if config is None and list(class_names) == list(SEGMENTATION_CLASSES):  # a shapes checkpoint alone
        return make_shapes(config=shapes), None, "auto", None
    return None


__all__ = [
    "calibration_images",
    "calibration_view",
    "compare_report",
    "fp32_reference",
    "prepare_segmenter",
]
