"""What ``metaformer classify train|eval|predict`` print on the terminal (``--json`` prints the result
itself instead)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from metaformer.deploy.options import held_out_lines


def train_report(summary: Mapping[str, Any]) -> str:
    best = summary["best_top1"]
    best_text = "n/a" if best is None else f"{best:.2f}%"
    return (
        f"best top-1 {best_text} at epoch {summary['best_epoch']} of {summary['epochs']}; "
        f"run folder {summary['output']}"
    )


def eval_report(result: Mapping[str, Any]) -> str:
    lines = [
        f"{result['model']} on {result['data']}: {result['images']} images",
        f"  top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}",
        f"  {result['images_per_s']:.1f} images/s ({result.get('runs_with', result['backend'])}); "
        f"confusion matrix: {result['confusion_png']}",
    ]
    if "fp32_top1" in result:
        lines.append(
            f"  {result['precision']} against fp32 on the same images: top-1 {result['top1']:.2f}% vs "
            f"{result['fp32_top1']:.2f}% (drop {result['drop']:.2f} points, allowed {result['max_drop']:g}); "
            f"top-1 agreement {result['agreement']:.2f}%"
        )
    lines.extend(held_out_lines(result))
    per_class = {k: v for k, v in (result.get("per_class_top1") or {}).items() if v is not None}
    if per_class:
        shown = list(per_class.items())
        if len(shown) > 20:
            shown = sorted(shown, key=lambda item: item[1])[:10]
            lines.append(f"  per-class top-1, the 10 lowest of {len(per_class)} (--json lists all):")
        else:
            lines.append("  per-class top-1:")
        width = max(len(name) for name, _ in shown)
        lines.extend(f"    {name:<{width}}  {value:6.2f}%" for name, value in shown)
    if result["skipped_images"]:
        lines.append(f"  skipped {result['skipped_images']} unreadable image(s)")
    return "\n".join(lines)


def predict_report(results: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for item in results:
        if "error" in item:
            lines.append(f"{item['path']}: skipped ({item['error']})")
            continue
        ranked = ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in item["predictions"])
        lines.append(f"{item['path']}: {ranked}")
        if "cam" in item:
            cam = item["cam"]
            lines.append(f"  Grad-CAM for '{cam['class']}' (stage {cam['stage']}): {cam['path']}")
    return "\n".join(lines)
