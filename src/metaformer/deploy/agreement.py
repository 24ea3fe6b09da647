"""Whether a low-precision model can be trusted: its agreement with fp32 on images it was not calibrated on.

An int8 model's ranges are fitted to the calibration images, so agreement measured on those says
little; and whether int8 keeps a model's answers depends on the model, the calibration images and the
CPU's int8 kernels (onnxruntime's U8S8 kernels saturate on x86-64 CPUs without VNNI). So every int8
candidate is measured, on the machine it runs on, on the calibration source's held-out images
(``Calibration.held_out_images``): top-1 agreement per image for a classifier, per pixel for a
segmenter. ``auto`` takes the fastest candidate at or above the threshold (``DEFAULT_MIN_AGREEMENT``, or
``min_agreement=`` / ``--min-agreement``); a backend the caller names runs below it after one warning
sentence; when no candidate passes, the error names each one's agreement and what to try instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from metaformer.errors import ExportError

logger = logging.getLogger(__name__)

# per image for a classifier (99%: one image in a hundred may change class), per pixel for a segmenter
# (98%: pixels at object borders flip first and matter least)
DEFAULT_MIN_AGREEMENT = {"image": 0.99, "pixel": 0.98}


def measure_agreement(runner: nn.Module, model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Top-1 agreement of ``runner`` with the fp32 ``model`` on ``batches`` (the held-out images): per
    image for (B, K) logits, per pixel for (B, K, H, W); ``agreement`` is None when there were none."""
    same = total = images = 0
    with torch.no_grad():
        for x in batches:
            agree = runner(x).argmax(1) == model(x).argmax(1)
            same += int(agree.sum())
            total += agree.numel()
            images += x.shape[0]
    unit = "image" if total == images else "pixel"
    return {"agreement": same / total if total else None, "images": images, "unit": unit}


def threshold(min_agreement: float | None, unit: str) -> float:
    """The agreement a candidate needs: ``min_agreement`` when given, else the default for ``unit``."""
    return (
        DEFAULT_MIN_AGREEMENT.get(unit, DEFAULT_MIN_AGREEMENT["image"])
        if min_agreement is None
        else (float(min_agreement))
    )


def passes(check: Mapping[str, Any], min_agreement: float | None) -> bool:
    """Whether a built candidate's ``check`` meets the threshold (one never measured passes only at 0)."""
    needed = threshold(min_agreement, str(check.get("unit", "image")))
    agreement = check.get("agreement")
    return needed <= 0 or (agreement is not None and agreement >= needed)


def describe(check: Mapping[str, Any]) -> str:
    """ "97.3% of 100 held-out images"-style text."""
    agreement, images = check.get("agreement"), int(check.get("images", 0))
    where = f"{images} held-out images"
    where = f"pixels of {where}" if check.get("unit") == "pixel" else where
    return "unmeasured (no held-out images)" if agreement is None else f"{100 * agreement:.1f}% of {where}"


def why_dropped(check: Mapping[str, Any], min_agreement: float | None) -> str:
    needed = threshold(min_agreement, str(check.get("unit", "image")))
    return f"agrees with fp32 on {describe(check)}, below {100 * needed:g}%"


def warn_below(backend: str, precision: str, check: Mapping[str, Any], min_agreement: float | None) -> None:
    """The one warning sentence a backend named by the caller gets when it falls below the threshold."""
    if not passes(check, min_agreement):
        logger.warning(
            "warning: %s %s %s; its answers may differ from the fp32 model's (calibrate on more typical "
            "images or use --precision fp32)",
            backend,
            precision,
            why_dropped(check, min_agreement),
        )


def none_passes(
    precision: str, checks: Mapping[str, Mapping[str, Any]], min_agreement: float | None
) -> ExportError:
    """The error when no candidate meets the threshold: each one's agreement, and what to try."""
    unit = next((str(c.get("unit")) for c in checks.values() if c.get("unit")), "image")
    needed = threshold(min_agreement, unit)
    found = ", ".join(f"{name} {describe(check)}" for name, check in checks.items()) or "none could be built"
    return ExportError(
        f"no {precision} backend agrees with fp32 on at least {100 * needed:g}% of the held-out "
        f"{'pixels' if unit == 'pixel' else 'images'} ({found}); calibrate on more typical images "
        "(--calibration-data), lower --min-agreement, or use --precision fp32"
    )


__all__ = [
    "DEFAULT_MIN_AGREEMENT",
    "describe",
    "measure_agreement",
    "none_passes",
    "passes",
    "threshold",
    "warn_below",
    "why_dropped",
]
