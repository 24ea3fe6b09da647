"""The deployment flags every eval and predict command shares (classify's and segment's) and their help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metaformer.deploy import BACKENDS, PRECISIONS
from metaformer.errors import check_choice
from metaformer.options import NON_NEGATIVE, POSITIVE, option

BACKEND_HELP = (
    "inference runtime: torch (our fast path), onnxruntime or openvino (exported graph, CPU), or auto: the "
    "one measured faster here for the precision (default)"
)
PRECISION_HELP = (
    "fp32 (exact, default), bf16, or int8 (post-training quantization calibrated on --calibration-data)"
)
THREADS_HELP = "CPU threads for PyTorch and the runtimes (default: PyTorch's)"
CALIBRATION_HELP = (
    "images to calibrate int8 on, a folder searched recursively (default: the training data named in "
    "config.json beside the checkpoint)"
)


@dataclass(frozen=True, kw_only=True)
class DeployOptions:
    """The deployment flags every eval and predict command shares (classify's and segment's)."""

    backend: str = option("auto", BACKEND_HELP, choices=BACKENDS)
    precision: str = option("fp32", PRECISION_HELP, choices=PRECISIONS)
    threads: int | None = option(None, THREADS_HELP, metavar="N", check=POSITIVE)
    calibration_data: str | None = option(None, CALIBRATION_HELP, metavar="DIR")

    def check_deploy(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        check_choice("precision", self.precision, PRECISIONS)


def max_drop_option(metric: str) -> Any:
    """The ``--max-drop`` field of an eval command whose accuracy is ``metric`` (top-1, mIoU)."""
    return option(
        1.0,
        f"with --precision bf16/int8: fail when {metric} is more than this many points below fp32 (1.0)",
        metavar="POINTS",
        check=NON_NEGATIVE,
    )


def compare_with_fp32(
    metric: str,
    value: float,
    fp32: float,
    agreement: float,
    *,
    precision: str,
    max_drop: float,
    unit: str = "",
) -> dict[str, Any]:
    """A bf16 or int8 run's ``metric`` (in points) against the fp32 run on the same images: the agreement
    of their predictions (percent), the drop and the allowed drop; ``failed`` (the CLI's non-zero exit)
    when the drop is larger than ``max_drop``."""
    drop = fp32 - value
    result: dict[str, Any] = {"agreement": agreement, "drop": drop, "max_drop": max_drop}
    if drop > max_drop:
        result["failed"] = (
            f"{precision} {metric} is {drop:.2f} points below fp32 ({value:.2f}{unit} vs {fp32:.2f}{unit}), "
            f"more than --max-drop {max_drop:g}; calibrate on more typical images or use another precision"
        )
    return result


__all__ = [
    "BACKEND_HELP",
    "CALIBRATION_HELP",
    "PRECISION_HELP",
    "THREADS_HELP",
    "DeployOptions",
    "compare_with_fp32",
    "max_drop_option",
]
