"""``metaformer classify predict``: top-k classes for an image or a folder of images, optionally with a
Grad-CAM heat map."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from metaformer.data.images import image_paths, open_rgb
from metaformer.data.transforms import eval_transform_from_preprocessing
from metaformer.deploy import prepare_for_inference
from metaformer.deploy.calibration import calibration_set, transform_key
from metaformer.deploy.options import DeployOptions
from metaformer.engine.distributed import pick_device
from metaformer.errors import ConfigError, DataError
from metaformer.options import POSITIVE, check_fields, option
from metaformer.tasks import command
from metaformer.tasks.classify.cam import grad_cam, write_cam_png
from metaformer.tasks.classify.loading import _readable_names, load_classifier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictConfig(DeployOptions):
    """Classify one image or every image under a folder; ``cam`` writes a Grad-CAM PNG (single image)."""

    inputs: str = option(
        help="an image file or a folder (searched recursively)", metavar="IMAGE|DIR", positional=True
    )
    checkpoint: str | None = option(
        None,
        "weights file (metaformer, official, timm or transformers) or save_pretrained folder",
        metavar="PATH",
    )
    model: str | None = option(None, "model name (needed for official/timm checkpoints and --pretrained)")
    pretrained: bool = option(False, "use the released ImageNet weights of --model")
    topk: int = option(5, "classes to list per image (5)", metavar="K", check=POSITIVE)
    cam: str | None = option(
        None, "write a Grad-CAM heat map of the top class (one image)", metavar="OUT.png"
    )
    batch_size: int = option(32, metavar="N", check=POSITIVE)
    device: str | None = option(None, "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        self.check_deploy()
        check_fields(self)
        if (self.checkpoint is None) == (not self.pretrained):
            raise ConfigError("pass --checkpoint PATH or --pretrained (one of them)")


@command(
    "predict",
    PredictConfig,
    "class names and probabilities for images",
    "Classify an image, or every image under a folder, with a checkpoint (--checkpoint) or released "
    "weights (--model NAME --pretrained): the top-K class names and probabilities per image. --cam also "
    "writes a Grad-CAM heat map; --backend and --precision run it through ONNX Runtime or OpenVINO.",
)
def predict(config: PredictConfig) -> list[dict[str, Any]]:
    """Top-k class names and probabilities per image; unreadable files in a folder are reported, not fatal."""
    paths = image_paths(config.inputs)
    if config.cam is not None and len(paths) != 1:
        raise ConfigError(
            f"--cam draws one image, but '{config.inputs}' holds {len(paths)}; pass a single image"
        )
    model, classes, preproc = load_classifier(config.checkpoint, config.model, config.pretrained)
    names = _readable_names(classes)
    transform = eval_transform_from_preprocessing(preproc)
    device = pick_device(config.device)
    model = model.to(device)
    size = int(preproc["input_size"][-1])
    if config.threads:
        torch.set_num_threads(config.threads)
    calibration = None
    if config.precision == "int8":
        key = transform_key(preproc, size)
        calibration = calibration_set(config.checkpoint, config.calibration_data, transform, key)
    runner, _ = prepare_for_inference(
        model,
        backend=config.backend,
        precision=config.precision,
        device=device,
        img_size=(size, size),
        batch_size=min(config.batch_size, len(paths)),
        threads=config.threads,
        calibration=calibration,
        images=len(paths),
        min_agreement=config.min_agreement,
    )
    k = min(config.topk, len(classes))
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), config.batch_size):
        batch_paths, tensors = [], []
        for path in paths[start : start + config.batch_size]:
            try:
                tensors.append(transform(open_rgb(path)))
                batch_paths.append(path)
            except DataError as err:
                if len(paths) == 1:
                    raise
                logger.warning("%s", err)
                results.append({"path": str(path), "error": str(err)})
        if not tensors:
            continue
        with torch.no_grad():
            probs = runner(torch.stack(tensors).to(device)).float().softmax(dim=1).cpu()
        values, indices = probs.topk(k, dim=1)
        for path, vals, idxs in zip(batch_paths, values, indices, strict=True):
            results.append(
                {
                    "path": str(path),
                    "predictions": [
                        {"class": names[i], "index": int(i), "probability": float(v)}
                        for v, i in zip(vals.tolist(), idxs.tolist(), strict=True)
                    ],
                }
            )
    if config.cam is not None:
        image = transform(open_rgb(paths[0]))
        target = results[0]["predictions"][0]["index"]
        heat, stage = grad_cam(model, image.to(device), target)
        write_cam_png(image, heat, preproc, config.cam)
        results[0]["cam"] = {"path": config.cam, "stage": stage, "class": names[target]}
    return results
