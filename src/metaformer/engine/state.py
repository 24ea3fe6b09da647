"""The run folder: resume state, metrics.jsonl, summary.json, config.json and curves.png.

A training state holds everything needed to continue a run bit-for-bit: model, optimizer, scheduler,
grad scaler, EMA, completed epochs, optimizer steps, every rank's RNG states, best metric and the
metrics history. It holds only tensors and plain Python values, so it reloads with
``torch.load(weights_only=True)``; the run's configuration lives in ``config.json``, not in the pickle.
Every file here is written atomically (temp file, then ``os.replace``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaformer.errors import ConfigError
from metaformer.weights import atomic_write, leftover_temp_files

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "last.pt"
LAST_WEIGHTS = "last.safetensors"
BEST_WEIGHTS = "best.safetensors"
CURVES_FILE = "curves.png"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, STATE_FILE, LAST_WEIGHTS, BEST_WEIGHTS, CURVES_FILE)


# --------------------------------------------------------------------------- JSON files
def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def read_run_config(checkpoint: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` of the run folder a checkpoint sits in; None where there is none, or it is not
    a readable JSON object (a file copied out of its run folder, say)."""
    try:
        config = json.loads((Path(checkpoint).parent / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"'{path}' is not valid JSON ({err}); fix or delete it") from None
    except OSError as err:
        raise ConfigError(f"cannot read '{path}' ({err.strerror or err}); fix or delete it") from None


def write_metrics(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Rewrite metrics.jsonl (one JSON object per epoch) in one atomic step."""
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(dict(r)) + "\n" for r in records))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- run folder
def prepare_run_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Create or check the output folder; never overwrite another run without resume or overwrite.

    ``overwrite`` deletes only the files a run writes (RUN_FILES), nothing else in the folder.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path '{out}' is a file, not a folder; pass --output a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create output folder '{out}' ({err.strerror}); pass --output a writable folder"
        ) from None
    probe = out / ".metaformer-write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"output folder '{out}' is not writable ({err.strerror}); pass another --output"
        ) from None
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume or overwrite:  # a killed run's half-written temp files: this run now owns the folder
        for stale in (tmp for name in RUN_FILES for tmp in leftover_temp_files(out / name)):
            stale.unlink(missing_ok=True)
    if resume:
        if not (out / STATE_FILE).exists():
            raise ConfigError(
                f"nothing to resume in '{out}' (no {STATE_FILE}: the run stopped before its first epoch ended"
                " or never started); drop --resume, or use --overwrite to start again"
            )
    elif existing:
        if not overwrite:
            raise ConfigError(
                f"output folder '{out}' already holds a run ({', '.join(existing)}); "
                "pass --resume to continue it, --overwrite to replace it, or another --output"
            )
        for name in existing:
            (out / name).unlink()
        logger.info("--overwrite: removed %s from %s", ", ".join(existing), out)
    return out


def check_resume_config(
    saved: Mapping[str, Any], current: Mapping[str, Any], may_differ: Sequence[str] = ()
) -> None:
    """A resumed run must use the options it was started with (except ``may_differ``)."""
    changed = sorted(
        key
        for key in set(saved) | set(current)
        if key not in may_differ and saved.get(key) != current.get(key)
    )
    if changed:
        detail = "; ".join(f"{k}: run has {saved.get(k)!r}, now {current.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"--resume with different options ({detail}); rerun the original command plus --resume, "
            "or start a new run in another --output"
        )


def open_run_dir(
    output_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    config: Mapping[str, Any],
    may_differ: Sequence[str] = (),
) -> Path:
    """``prepare_run_dir``, then on resume the check that ``config`` is the one the run was started with.

    Every task opens its run folder this way (on rank 0): classify, detect and segment.
    """
    out = prepare_run_dir(output_dir, resume=resume, overwrite=overwrite)
    if resume and (out / CONFIG_FILE).exists():
        check_resume_config(read_json(out / CONFIG_FILE), config, may_differ=may_differ)
    return out


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's random in one call."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` captured, so a resumed run draws the same random numbers."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- training state
def training_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    scaler: Any | None,
    ema: torch.nn.Module | None,
    epoch: int,
    num_updates: int,
    best_metric: float | None,
    best_epoch: int | None,
    history: list[dict[str, Any]],
    rng: list[dict[str, Any]],
) -> dict[str, Any]:
    """The dict ``save_state`` writes: ``epoch`` is the number of completed epochs."""
    return {
        "format": "metaformer-train-state",
        "epoch": epoch,
        "num_updates": num_updates,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "history": history,
        "rng": rng,
    }


# --------------------------------------------------------------------------- curves
def plot_curves(records: Sequence[Mapping[str, Any]], path: str | Path, metric_names: Sequence[str]) -> None:
    """Loss, the task's metrics and the learning rate against epochs, as one PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if any(key in r for r in records):
            axes[0].plot(epochs, [r.get(key) for r in records], marker="o", label=label)
    axes[0].set_title("loss")
    axes[0].legend()
    for name in metric_names:
        if any(name in r for r in records):
            axes[1].plot(epochs, [r.get(name) for r in records], marker="o", label=name)
    axes[1].set_title("validation metrics")
    if axes[1].get_lines():  # no validation yet: no legend (matplotlib would warn)
        axes[1].legend()
    axes[2].plot(epochs, [r.get("lr") for r in records], marker="o")
    axes[2].set_title("learning rate (start of epoch)")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
