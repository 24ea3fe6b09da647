"""``metaformer export``: write the folder a user ships (ONNX, OpenVINO IR or TorchScript; fp32, bf16 or
int8, checked against PyTorch, with the ``metaformer.json`` that runs it: ``deploy.package``).

The command layer over ``metaformer.deploy`` (the checked export itself lives in ``deploy.onnx_export``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaformer.deploy import PRECISIONS
from metaformer.deploy.onnx_export import ExportReport
from metaformer.errors import CheckpointError, ConfigError, check_choice, check_number
from metaformer.options import option
from metaformer.tasks import TaskCommands, command

logger = logging.getLogger(__name__)
EXPORT_FORMATS = ("onnx", "openvino", "torchscript")
DENSE_DEPLOY = {
    "segment": "run it with `metaformer segment eval` or `segment predict` and --backend onnxruntime or "
    "openvino, --precision fp32, bf16 or int8",
    "detect": "detectors run in PyTorch only (`metaformer detect eval` / `detect predict`): torchvision's "
    "box post-processing does not export",
}


@dataclass(frozen=True)
class ExportConfig:
    """The ``metaformer export`` command: which model and weights, and what to write."""

    model: str = option(help="model name, e.g. poolformer_s12", metavar="name", positional=True)
    output: Path = option(
        help="output folder: the model files and metaformer.json (written whole, or not at all)",
        flag=("--output", "-o"),
    )
    checkpoint: Path | None = option(
        None, "weights file (metaformer safetensors, timm or official checkpoint)"
    )
    random_init: bool = option(False, "export random weights instead (to try export out)")
    format: str = option(
        "onnx",
        "onnx (default), openvino (IR: .xml plus .bin beside it) or torchscript",
        choices=EXPORT_FORMATS,
    )
    precision: str = option(
        "fp32", "fp32 (default), bf16 (openvino) or int8 (QDQ ONNX or OpenVINO IR)", choices=PRECISIONS
    )
    calibration_data: str | None = option(
        None,
        "int8: images to calibrate on, a folder (default: the training data named in config.json beside "
        "the checkpoint)",
        metavar="DIR",
    )
    img_size: tuple[int, ...] | None = option(
        None,
        "input size (default: the checkpoint's recorded size, else 224 224)",
        metavar=("H", "W"),
        nargs="+",
    )
    dynamic_batch: bool = option(
        False, "let the batch size vary at run time (always so for int8 and openvino)"
    )
    fold: bool = option(
        True, "export the plain graph instead of the folded inference graph", flag="--no-fold", negate=True
    )

    def __post_init__(self) -> None:
        from metaformer.models.metaformer import MIN_INPUT_SIZE

        object.__setattr__(self, "output", Path(self.output))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        if self.img_size is not None:
            size = tuple(self.img_size)
            if not 1 <= len(size) <= 2:
                raise ConfigError(f"--img-size takes H or H W, got {len(size)} values")
            object.__setattr__(self, "img_size", size * 2 if len(size) == 1 else size)
            check_number("img_size", self.img_size, low=MIN_INPUT_SIZE)
        check_choice("format", self.format, EXPORT_FORMATS)
        check_choice("precision", self.precision, PRECISIONS)


@command(
    "export", ExportConfig, "write a model as ONNX, OpenVINO IR or TorchScript (fp32/bf16/int8), checked"
)
def run_export(config: ExportConfig) -> ExportReport:
    """Build the model with its weights and export it (``random_init`` only for trying export out)."""
    from metaformer.models import create_model

    if config.checkpoint is None and not config.random_init:
        raise CheckpointError(
            "export needs trained weights: pass --checkpoint FILE (or --random-init to try export "
            "with random weights)"
        )
    if config.checkpoint is not None and config.random_init:
        raise ConfigError("pass either --checkpoint or --random-init, not both")
    from metaformer.deploy.package import check_output, write_folder

    check_output(config.output)
    saved: dict[str, Any] = {}
    if config.checkpoint is not None:
        from metaformer.weights import read_metadata

        try:
            saved = read_metadata(config.checkpoint)
        except (CheckpointError, KeyError, ValueError):
            saved = {}
    preproc = saved.get("preprocessing") or {}
    recorded = preproc.get("input_size")
    size = tuple(config.img_size or (tuple(recorded[-2:]) if recorded else (224, 224)))
    if config.checkpoint is not None:
        if saved.get("task") in DENSE_DEPLOY:  # a dense task's weights: not a classifier to export
            raise ConfigError(
                f"checkpoint '{config.checkpoint}' holds a {saved['task']} model and `metaformer export` "
                f"writes classifiers; {DENSE_DEPLOY[saved['task']]}"
            )
        if saved.get("config"):
            from metaformer.weights import model_from_weights

            if saved.get("model_name") not in (None, config.model):
                raise ConfigError(
                    f"checkpoint '{config.checkpoint}' holds a {saved['model_name']} model, not "
                    f"{config.model}; pass the matching name"
                )
            model = model_from_weights(config.checkpoint)
        else:
            model = create_model(config.model, checkpoint_path=config.checkpoint, img_size=size)
    else:
        model = create_model(config.model, img_size=size)
    calibration = None
    if config.precision == "int8":
        calibration = _calibration(config, size)
    from metaformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    preprocessing = {"crop_pct": 0.9, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    preprocessing.update({k: v for k, v in preproc.items() if k != "input_size"})
    return write_folder(
        model,
        config.output,
        format=config.format,
        precision=config.precision,
        img_size=size,  # type: ignore[arg-type]
        class_names=saved.get("class_names"),
        preprocessing=preprocessing,
        calibration=calibration,
        dynamic_batch=config.dynamic_batch,
        fold=config.fold,
    )


def _calibration(config: ExportConfig, img_size: tuple[int, ...]) -> Any:
    """int8's calibration images, preprocessed as the checkpoint's eval transform says."""
    from metaformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform_from_preprocessing
    from metaformer.deploy.calibration import calibration_set, transform_key

    preproc: dict[str, Any] = {"crop_pct": 0.9, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if config.checkpoint is not None:
        from metaformer.weights import read_metadata

        try:
            preproc.update(read_metadata(config.checkpoint).get("preprocessing") or {})
        except (CheckpointError, KeyError, ValueError):
            pass
    size = int(img_size[-1])
    transform = eval_transform_from_preprocessing(preproc, size)
    return calibration_set(
        config.checkpoint, config.calibration_data, transform, transform_key(preproc, size)
    )


__all__ = ["ExportConfig", "export_report", "run_export"]


def export_report(report: ExportReport) -> str:
    from metaformer.deploy import FAST_RUNTIME

    h, w = report.img_size
    batch = "dynamic" if report.dynamic_batch else "fixed"
    kind = report.format if report.precision == "fp32" else f"{report.format} {report.precision}"
    if report.precision == "int8":
        check = (
            f"top-1 agreement with fp32 on {report.calibration_images} held-out calibration images "
            f"{100 * (report.agreement or 0.0):.1f}% (measured on this CPU: see docs/deployment.md)"
        )
    else:
        runtime = {"onnx": "onnxruntime", "openvino": "OpenVINO"}.get(report.format, "reloaded TorchScript")
        check = f"{runtime} matches PyTorch to {report.max_abs_diff:.1e} (max abs diff)"
        if report.checked_batches:
            check += f" on batches {', '.join(map(str, report.checked_batches))}"
    from metaformer.deploy.package import MANIFEST, MODEL_FILES

    files = " + ".join([*MODEL_FILES[report.format], MANIFEST])
    note = FAST_RUNTIME.get((report.format, report.precision), "")
    return f"wrote {report.path}/ ({files}; {kind}, {h}x{w}, {batch} batch); {check}" + (
        f"; {note}" if note else ""
    )


COMMANDS = TaskCommands(__name__, None)
