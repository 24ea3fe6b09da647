"""The deployment flags every eval and predict command shares (classify's and segment's) and their help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metaformer.deploy import BACKENDS, PRECISIONS
from metaformer.errors import check_choice
from metaformer.options import NON_NEGATIVE, POSITIVE, PROBABILITY, option

BACKEND_HELP = (
    "inference runtime: torch (our fast path), onnxruntime or openvino (exported graph, CPU), compile (our "
    "fast path compiled by torch.compile, CPU, fp32/bf16; minutes the first time, cached after), or auto: "
    "the one measured faster here for the precision, compile only when the work pays for compiling (default)"
)
PRECISION_HELP = (
    "fp32 (exact, default), bf16, or int8 (post-training quantization calibrated on --calibration-data)"
)
THREADS_HELP = "CPU threads for PyTorch and the runtimes (default: PyTorch's)"
CALIBRATION_HELP = (
    "images to calibrate int8 on, a folder searched recursively (default: the training data named in "
    "config.json beside the checkpoint)"
)

MIN_AGREEMENT_HELP = (
    "with --precision int8: the top-1 agreement with fp32, on held-out calibration images, that a backend "
    "needs (a fraction; default 0.99 per image, 0.98 per pixel): auto drops those below it, a named "
    "--backend warns"
)


@dataclass(frozen=True, kw_only=True)
class DeployOptions:
    """The deployment flags every eval and predict command shares (classify's and segment's)."""

    backend: str = option("auto", BACKEND_HELP, choices=BACKENDS)
    precision: str = option("fp32", PRECISION_HELP, choices=PRECISIONS)
    threads: int | None = option(None, THREADS_HELP, metavar="N", check=POSITIVE)
    calibration_data: str | None = option(None, CALIBRATION_HELP, metavar="DIR")
    min_agreement: float | None = option(None, MIN_AGREEMENT_HELP, metavar="FRACTION", check=PROBABILITY)

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


def held_out_report(runner: Any) -> dict[str, Any]:
    """An int8 run's trust record for the eval report: its agreement with fp32 on the held-out
    calibration images, the threshold, and the candidates dropped below it (empty for fp32 and bf16)."""
    choice = getattr(runner, "choice", None)
    check = getattr(runner, "check", None) or {}
    if not choice or "agreement" not in check:
        return {}
    report = {
        "held_out_agreement": None if check["agreement"] is None else 100.0 * check["agreement"],
        "held_out_images": check.get("images"),
        "dropped": dict(choice.get("dropped", {})),
    }
    if "min_agreement" in choice:
        report["min_agreement"] = 100.0 * choice["min_agreement"]
    return report


def held_out_lines(result: Any) -> list[str]:
    """The terminal lines of ``held_out_report``'s fields, when there are any."""
    if result.get("held_out_agreement") is None:
        return []
    lines = [
        f"  held-out calibration images: agreement with fp32 {result['held_out_agreement']:.2f}% on "
        f"{result['held_out_images']} images (needed {result.get('min_agreement', 0):g}%)"
    ]
    lines += [f"  dropped {name}: {why}" for name, why in result.get("dropped", {}).items()]
    return lines


__all__ = [
    "BACKEND_HELP",
    "CALIBRATION_HELP",
    "MIN_AGREEMENT_HELP",
    "PRECISION_HELP",
    "THREADS_HELP",
    "DeployOptions",
    "compare_with_fp32",
    "held_out_lines",
    "held_out_report",
    "max_drop_option",
]
