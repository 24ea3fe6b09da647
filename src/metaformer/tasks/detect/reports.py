"""The terminal text of ``metaformer detect`` train, eval and predict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def train_report(summary: Mapping[str, Any]) -> str:
    last = summary.get("last") or {}
    ap = ", ".join(f"{k} {last[k]:.3f}" for k in ("bbox_AP", "bbox_AP50", "segm_AP") if k in last)
    return f"{ap} after {summary['epochs']} epochs; run folder {summary['output']}"


def eval_report(result: Mapping[str, Any]) -> str:
    lines = [f"{result['checkpoint']} on {result['data']} ({result['split']}): {result['images']} images"]
    for kind in ("bbox", "segm"):
        if f"{kind}_AP" in result:
            lines.append(
                f"  {kind}: " + "  ".join(f"{m} {100 * result[f'{kind}_{m}']:.1f}" for m in COCO_NAMES)
            )
    if result["results"]:
        lines.append(f"  COCO results: {result['results']}")
    return "\n".join(lines)


def predict_report(result: Mapping[str, Any]) -> str:
    lines = [
        f"{item['path']}: {item['detections']} detection(s) -> {item['drawn']}" for item in result["images"]
    ]
    lines.append(f"COCO results ({result['detections']} detections): {result['results']}")
    return "\n".join(lines)
