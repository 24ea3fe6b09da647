"""``metaformer export``: write a model as ONNX or TorchScript, checked against PyTorch.

The command layer over ``metaformer.deploy.onnx_export`` (the checked export itself, re-exported here
under its old names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from metaformer.deploy.onnx_export import (
    DEFAULT_OPSET,
    FORMATS,
    ExportReport,
    PortableGroupNorm,
    export_model,
    portable_model,
)
from metaformer.errors import CheckpointError, ConfigError, ExportError, check_number
from metaformer.options import option
from metaformer.tasks import TaskCommands, command

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """The ``metaformer export`` command: which model and weights, and what to write."""

    model: str = option(help="model name, e.g. poolformer_s12", metavar="name", positional=True)
    output: Path = option(help="output file (written atomically)", flag=("--output", "-o"))
    checkpoint: Path | None = option(
        None, "weights file (metaformer safetensors, timm or official checkpoint)"
    )
    random_init: bool = option(False, "export random weights instead (to try export out)")
    format: str = option("onnx", "default onnx", choices=("onnx", "torchscript"))
    img_size: tuple[int, ...] = option(
        (224, 224), "input size (default 224 224)", metavar=("H", "W"), nargs="+"
    )
    dynamic_batch: bool = option(False, "let the batch size vary at run time")
    fold: bool = option(
        True, "export the plain graph instead of the folded inference graph", flag="--no-fold", negate=True
    )

    def __post_init__(self) -> None:
        from metaformer.models.metaformer import MIN_INPUT_SIZE

        size = tuple(self.img_size)
        if not 1 <= len(size) <= 2:
            raise ConfigError(f"--img-size takes H or H W, got {len(size)} values")
        object.__setattr__(self, "img_size", size * 2 if len(size) == 1 else size)
        object.__setattr__(self, "output", Path(self.output))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        check_number("img_size", self.img_size, low=MIN_INPUT_SIZE)


@command("export", ExportConfig, "write a model as ONNX or TorchScript, checked against PyTorch")
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
    if config.checkpoint is not None:
        from metaformer.weights import read_metadata

        try:
            saved = read_metadata(config.checkpoint)
        except (CheckpointError, KeyError, ValueError):
            saved = {}
        if saved.get("config"):
            from metaformer.weights import model_from_weights

            if saved.get("model_name") not in (None, config.model):
                raise ConfigError(
                    f"checkpoint '{config.checkpoint}' holds a {saved['model_name']} model, not "
                    f"{config.model}; pass the matching name"
                )
            model = model_from_weights(config.checkpoint)
        else:
            model = create_model(config.model, checkpoint_path=config.checkpoint, img_size=config.img_size)
    else:
        model = create_model(config.model, img_size=config.img_size)
    return export_model(
        model,
        config.output,
        format=config.format,
        img_size=config.img_size,
        dynamic_batch=config.dynamic_batch,
        fold=config.fold,
    )


__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "ExportConfig",
    "ExportError",
    "ExportReport",
    "PortableGroupNorm",
    "export_model",
    "portable_model",
    "run_export",
]


def export_report(report: ExportReport) -> str:
    h, w = report.img_size
    check = "onnxruntime" if report.format == "onnx" else "reloaded TorchScript"
    return (
        f"wrote {report.path} ({report.format}, {h}x{w}, "
        f"{'dynamic' if report.dynamic_batch else 'fixed'} batch); {check} matches PyTorch to "
        f"{report.max_abs_diff:.1e} (max abs diff) on batches {', '.join(map(str, report.checked_batches))}"
    )


COMMANDS = TaskCommands(__name__, None)
