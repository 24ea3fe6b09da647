"""The terminal text of ``metaformer segment`` train, eval and predict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metaformer.tasks.segment.deploy import compare_report


def train_report(summary: Mapping[str, Any]) -> str:
    last = summary.get("last") or {}
    miou, acc = last.get("mIoU", float("nan")), last.get("pixel_acc", float("nan"))
    return (
        f"mIoU {miou:.3f}, pixel accuracy {acc:.3f} after {summary['epochs']} epochs; "
        f"run folder {summary['output']}"
    )


def eval_report(result: Mapping[str, Any]) -> str:
    lines = [
        f"{result['checkpoint']} on {result['data']}: {result['images']} images",
        f"  mIoU {100 * result['mIoU']:.2f}  mAcc {100 * result['mAcc']:.2f}  "
        f"pixel accuracy {100 * result['pixel_acc']:.2f}",
        f"  {result['seconds']:.1f} s ({result.get('runs_with', result.get('backend', 'torch'))}"
        f"{', with the fp32 reference' if 'fp32_mIoU' in result else ''})",
        *compare_report(result),
    ]
    for name, iou in result["per_class_IoU"].items():
        lines.append(f"  {name:<24}{'n/a' if iou is None else f'{100 * iou:.2f}':>8}")
    return "\n".join(lines)


def predict_report(result: Mapping[str, Any]) -> str:
    return "\n".join(
        f"{item['path']}: overlay {item['overlay']}, labels {item['labels']}" for item in result["images"]
    )
