"""The report of an ablation study: ``ablation.md`` (a table beside the paper's Table 5 figures) and
``ablation.png``, every number read from the cells' own files (``summary.json``, ``cell.json``), never from
memory."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaformer.ablate.study import (
    BASE_MODEL,
    CELL_FILE,
    PLOT_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    AblationConfig,
    AblationVariant,
    _read_json,
    cell_is_done,
)
from metaformer.errors import DataError


# --------------------------------------------------------------------------- report
@dataclass(frozen=True)
class VariantResult:
    """One table row, every number read from the cells' files."""

    variant: AblationVariant
    top1: tuple[float, ...]  # final-epoch validation top-1 (%) of each finished seed
    params: int | None
    macs: int | None
    images_per_s: float | None  # mean over the finished seeds of each run's mean train images/s
    img_size: tuple[int, int] | None

    @property
    def mean(self) -> float | None:
        return sum(self.top1) / len(self.top1) if self.top1 else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (None for fewer than two)."""
        if len(self.top1) < 2:
            return None
        mean = sum(self.top1) / len(self.top1)
        return math.sqrt(sum((t - mean) ** 2 for t in self.top1) / (len(self.top1) - 1))


def read_cell(folder: Path) -> dict[str, Any]:
    """A finished cell's numbers, straight from its own files.

    top-1: the last epoch's validation top-1 in summary.json (not the best epoch, which picks on the
    validation set); params and train images/s (mean over epochs): summary.json; MACs: cell.json,
    counted with ``metaformer.complexity`` on the model the run built.
    """
    summary = _read_json(folder / SUMMARY_FILE)
    cell = _read_json(folder / CELL_FILE)
    last = summary.get("last") or {}
    if "top1" not in last:
        raise DataError(
            f"'{folder / SUMMARY_FILE}' has no final top-1; delete its cell folder to train it again"
        )
    return {
        "top1": float(last["top1"]),
        "images_per_s": summary.get("train_images_per_s"),
        "params": summary.get("params"),
        "macs": cell["macs"],
        "img_size": tuple(cell["img_size"]),
    }


def collect_results(
    output: Path, variants: Sequence[AblationVariant], config: AblationConfig
) -> list[VariantResult]:
    results = []
    for variant in variants:
        cells = []
        for seed in range(config.seeds):
            folder = output / "runs" / variant.name / f"seed{seed}"
            if cell_is_done(folder, config.epochs):
                cells.append(read_cell(folder))
        speeds = [c["images_per_s"] for c in cells if c["images_per_s"] is not None]
        results.append(
            VariantResult(
                variant,
                tuple(c["top1"] for c in cells),
                cells[0]["params"] if cells else None,
                cells[0]["macs"] if cells else None,
                sum(speeds) / len(speeds) if speeds else None,
                cells[0]["img_size"] if cells else None,
            )
        )
    return results


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(
    results: Sequence[VariantResult], config: AblationConfig, data_name: str, recipe: str
) -> str:
    img = next((r.img_size for r in results if r.img_size), None)
    size = f"{img[0]}x{img[1]}" if img else "?"
    epochs = f"{config.epochs} epoch{'s' if config.epochs > 1 else ''}"
    lines = [
        f"# Ablations: PoolFormer paper Table 5 on {data_name}",
        "",
        f"Trunk: {BASE_MODEL} with depths {tuple(config.depths)}, dims {tuple(config.dims)}, input {size}; "
        f"{epochs}, {recipe}, seeds 0..{config.seeds - 1}; the same recipe for every row. "
        "Top-1 is the final epoch's validation accuracy, mean ± sample std over the finished seeds; "
        "params, MACs (fvcore convention, at the input size) and train images/s come from each run's files "
        "(images/s is shared-CPU wall time: compare rows of one study only). "
        "Paper columns: ImageNet-1K, 224x224, the full S12, 300 epochs (Table 5 of Yu et al., "
        '"MetaFormer Is Actually What You Need for Vision", CVPR 2022, arXiv:2111.11418).',
        "",
        "| ablation | variant | top-1 (%) | seeds | params (M) | MACs (M) | train img/s "
        "| paper params (M) | paper MACs (G) | paper top-1 (%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        v = r.variant
        if r.mean is None:
            top1 = "-"
        elif r.std is None:
            top1 = f"{r.mean:.2f}"
        else:
            top1 = f"{r.mean:.2f} ± {r.std:.2f}"
        lines.append(
            f"| {v.ablation} | {v.change} | {top1} | {len(r.top1)}/{config.seeds} "
            f"| {_fmt(None if r.params is None else r.params / 1e6, '.3f')} "
            f"| {_fmt(None if r.macs is None else r.macs / 1e6, '.2f')} | {_fmt(r.images_per_s, '.0f')} "
            f"| {_fmt(v.paper_params_m, 'g')} | {_fmt(v.paper_gmacs, 'g')} | {_fmt(v.paper_top1, 'g')} |"
        )
    return "\n".join(lines) + "\n"


def render_plot(results: Sequence[VariantResult], path: Path, title: str) -> None:
    """Two horizontal bar panels: ours (mean, error bar = std over seeds) and the paper's ImageNet top-1."""
    from matplotlib.figure import Figure

    ys = list(range(len(results)))[::-1]
    fig = Figure(figsize=(11, 0.45 * len(results) + 1.6))
    ours, paper = fig.subplots(1, 2, sharey=True)
    means = [r.mean or 0.0 for r in results]
    errors = [r.std or 0.0 for r in results]
    ours.barh(ys, means, xerr=errors, capsize=3, color="tab:blue")
    finished = [m - e for r, m, e in zip(results, means, errors, strict=True) if r.mean is not None]
    if finished:  # zoom in: on small data sets the rows differ by a few points near the top
        low = min(finished)
        ours.set_xlim(max(0.0, low - 0.25 * (100 - low) - 1), 100)
    left = ours.get_xlim()[0]
    for y, r in zip(ys, results, strict=True):  # values at the bars' left ends, clear of the error bars
        if r.mean is not None:
            ours.annotate(f"{r.mean:.2f}", (left, y), xytext=(4, 0), textcoords="offset points",
                          va="center", color="white", fontsize=8)  # fmt: skip
    ours.set_yticks(ys, [r.variant.change for r in results])
    ours.set_xlabel("top-1 (%), mean ± std over seeds")
    ours.set_title(title, fontsize=10)
    paper.barh(ys, [r.variant.paper_top1 or 0.0 for r in results], color="tab:gray")
    paper.set_xlim(40, 85)
    for y, r in zip(ys, results, strict=True):
        if r.variant.paper_top1 is not None:
            paper.annotate(f"{r.variant.paper_top1:g}", (40, y), xytext=(4, 0), textcoords="offset points",
                           va="center", color="white", fontsize=8)  # fmt: skip
    paper.set_xlabel("top-1 (%)")
    paper.set_title("paper: ImageNet-1K, full S12 at 224", fontsize=10)
    for ax in (ours, paper):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with _atomic(path) as tmp:
        fig.savefig(tmp, dpi=100)


def _recipe_text(output: Path, variants: Sequence[AblationVariant], config: AblationConfig) -> str:
    """The training recipe as the runs resolved it (from a finished cell's config.json)."""
    from metaformer.engine.state import CONFIG_FILE

    for variant in variants:
        for seed in range(config.seeds):
            path = output / "runs" / variant.name / f"seed{seed}" / CONFIG_FILE
            if path.is_file():
                c = _read_json(path)
                return (
                    f"classify recipe '{c['recipe']}' ({c['opt']}, lr {c['lr']:g}, batch {c['batch_size']}, "
                    f"{c['sched']} schedule, label smoothing {c['label_smoothing']:g}, "
                    f"drop path {c['drop_path_rate']:g})"
                )
    return "no finished run yet"


def write_report(
    output: Path, variants: Sequence[AblationVariant], config: AblationConfig
) -> tuple[Path, Path]:
    """ablation.md and ablation.png from the cells' files, each written atomically."""
    results = collect_results(output, variants, config)
    data_name = "the embedded digits" if config.data is None else f"'{config.data}'"
    report = output / REPORT_FILE
    text = render_markdown(results, config, data_name, _recipe_text(output, variants, config))
    with _atomic(report) as tmp:
        tmp.write_text(text)
    plot = output / PLOT_FILE
    epochs = f"{config.epochs} epoch{'s' if config.epochs > 1 else ''}"
    render_plot(results, plot, f"ours: {data_name}, {epochs}, {config.seeds} seed(s)")
    return report, plot


def _atomic(path: Path) -> Any:
    from metaformer.weights import atomic_write

    return atomic_write(path)
