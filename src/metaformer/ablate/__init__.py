"""The PoolFormer paper's ablations (Table 5, PAPER.md 7.1) as one command: a study of training runs.

A study is data: ``STUDIES[name]`` lists ``AblationVariant`` rows, each a set of ``create_model``
overrides on a ``poolformer_s12`` trunk plus the paper's ImageNet-1K figures for that row. Every
(variant, seed) pair is a cell: one ``train_classifier`` run in its own folder, with the same recipe
and seeds for every variant. A cell whose ``summary.json`` records all its epochs is done and never
re-run; any other cell resumes from its ``last.pt`` (or starts over), so an interrupted study picks
up where it stopped. Cells run in parallel processes (``jobs``), each limited to its share of the
cores. The report (``ablation.md``, ``ablation.png``) reads every number it shows from the cells' own
files (``summary.json``, ``cell.json``), never from memory.

Output folder::

    OUTPUT/study.json                the recipe; resuming with another recipe is refused
    OUTPUT/runs/<variant>/seed<k>/   cell.json (variant, overrides, MACs) + the classify run's files
    OUTPUT/ablation.md  OUTPUT/ablation.png
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from metaformer.ablate.report import write_report
from metaformer.ablate.study import (
    BASE_MODEL,
    CELL_FILE,
    DEFAULT_DEPTHS,
    DEFAULT_DIMS,
    DEFAULT_EPOCHS,
    STUDIES,
    STUDY_NAMES,
    SUMMARY_FILE,
    AblationConfig,
    AblationResult,
    Cell,
    _check_recipe,
    _write_json,
    cell_is_done,
    cell_summary_complete,
    import_mixer,
    plan_cells,
    study_variants,
)
from metaformer.errors import ConfigError
from metaformer.models import register_mixer
from metaformer.models.mixers import MIXERS
from metaformer.options import COMPILE_MODES, option
from metaformer.tasks import TaskCommands, command

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- running cells
def _cell_payload(cell: Cell, config: AblationConfig) -> dict[str, Any]:
    """Everything a worker needs, as plain values (it crosses a process boundary)."""
    return {
        "folder": str(cell.folder),
        "seed": cell.seed,
        "variant": asdict(cell.variant),
        "data": config.data,
        "epochs": config.epochs,
        "depths": tuple(config.depths),
        "dims": tuple(config.dims),
        "train_options": dict(config.train_options),
        "compile": config.compile,
    }


def run_cell(payload: Mapping[str, Any]) -> str:
    """Train one cell (resuming it if it stopped mid-way), then record its MACs; returns its label.

    The training is ``tasks.classify.train_classifier``: the variant's overrides go in through
    ``model_kwargs``, so the cell is an ordinary classify run (``metaformer classify eval`` reads it).
    """
    from metaformer.engine import state as run_state
    from metaformer.tasks.classify import TrainConfig, train_classifier

    folder = Path(payload["folder"])
    variant = payload["variant"]
    label = f"{variant['name']}/seed{payload['seed']}"
    if _WORKER_HANDLER is not None:
        _WORKER_HANDLER.setFormatter(logging.Formatter(f"[{label}] %(message)s"))
    record = {"variant": variant, "seed": payload["seed"], "model": BASE_MODEL}
    _write_json(folder / CELL_FILE, record)
    resume = (folder / run_state.STATE_FILE).is_file()  # stopped after an epoch: continue bit-for-bit
    options = {"progress": False, "compile": payload.get("compile", "auto"), **payload["train_options"]}
    config = TrainConfig(
        model=BASE_MODEL,
        data=payload["data"],
        output=str(folder),
        epochs=payload["epochs"],
        seed=payload["seed"],
        model_kwargs={"depths": payload["depths"], "dims": payload["dims"], **variant["overrides"]},
        resume=resume,
        overwrite=not resume,  # a cell that never finished an epoch starts again
        **options,
    )
    logger.info("%s: %s", "resuming" if resume else "training", label)
    summary = train_classifier(config)
    if not cell_summary_complete(folder, payload["epochs"]):
        # killed between the last epoch's state and its summary: the resumed run had nothing left to
        # train and returns the summary from the saved history, so write that one
        run_state.write_json(folder / SUMMARY_FILE, summary)
    record.update(_complexity(folder))
    _write_json(folder / CELL_FILE, record)
    return label


def _complexity(folder: Path) -> dict[str, Any]:
    """MACs (fvcore convention) of the model the run trained, rebuilt from the run's config.json."""
    from metaformer.complexity import count_macs
    from metaformer.engine import state as run_state
    from metaformer.models import create_model

    saved = run_state.read_json(folder / run_state.CONFIG_FILE)
    kwargs = dict(saved["model_kwargs"])
    kwargs.setdefault("img_size", saved["img_size"])
    model = create_model(saved["model"], num_classes=len(saved["class_names"]), **kwargs)
    size = int(saved["img_size"])
    return {"img_size": [size, size], "macs": count_macs(model, size)}


_WORKER_HANDLER: logging.Handler | None = None  # set in spawned workers only


def _init_worker(threads: int, mixers: Mapping[str, type[nn.Module]], log_level: int) -> None:
    """Spawned worker: its share of the cores, the parent's user mixers, log lines tagged by cell.

    Workers ignore Ctrl-C: the parent catches it and terminates them, so one interrupt stops the study.
    """
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    for name, cls in mixers.items():
        if MIXERS.get(name) is not cls:
            register_mixer(name, cls)
    global _WORKER_HANDLER
    _WORKER_HANDLER = logging.StreamHandler(sys.stderr)  # run_cell tags its lines with the cell
    root = logging.getLogger("metaformer")
    root.handlers[:] = [_WORKER_HANDLER]
    root.setLevel(log_level)
    root.propagate = False


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _run_cells(cells: Sequence[Cell], config: AblationConfig) -> None:
    payloads = [_cell_payload(cell, config) for cell in cells]
    if config.jobs == 1 or len(cells) <= 1:
        for payload in payloads:
            run_cell(payload)
        return
    jobs = min(config.jobs, len(cells))
    threads = max(1, _cpu_count() // jobs)
    mixers = {name: MIXERS[name] for name in config.extra_mixers}
    for name, cls in mixers.items():  # workers import the class by reference, as pickle does
        try:
            pickle.dumps(cls)
        except (pickle.PicklingError, AttributeError, TypeError):
            raise ConfigError(
                f"mixer '{name}' ({cls.__qualname__}) cannot be sent to worker processes; define it at the "
                "top level of an importable module, or use jobs=1"
            ) from None
    level = logging.getLogger("metaformer").getEffectiveLevel()
    if config.data is not None and "num_workers" not in config.train_options:
        for payload in payloads:  # the recipe's default (up to 8 loaders per run) would oversubscribe
            payload["train_options"]["num_workers"] = max(0, threads - 1)
    logger.info("running %d cells in %d processes, %d torch thread(s) each", len(cells), jobs, threads)
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has started threads
    pool = context.Pool(jobs, initializer=_init_worker, initargs=(threads, mixers, level))
    try:
        for label in pool.imap_unordered(run_cell, payloads):
            logger.info("finished %s", label)
        pool.close()
    except BaseException:
        # Ctrl-C or a failed cell: stop the other runs now. Their finished epochs are on disk, so the
        # next call resumes them.
        pool.terminate()
        raise
    finally:
        pool.join()


def run_ablation(config: AblationConfig) -> AblationResult:
    """Train every cell of the study not done yet, then write ablation.md and ablation.png."""
    output = Path(config.output)
    cells = plan_cells(config)
    output.mkdir(parents=True, exist_ok=True)
    _check_recipe(output, config.recipe())
    todo = [cell for cell in cells if not cell_is_done(cell.folder, config.epochs)]
    skipped = tuple(cell.label for cell in cells if cell not in todo)
    if skipped:
        logger.info("%d of %d cells already done: %s", len(skipped), len(cells), ", ".join(skipped))
    start = time.perf_counter()
    _run_cells(todo, config)
    if todo:
        logger.info("trained %d cells in %.0f s", len(todo), time.perf_counter() - start)
    variants = study_variants(config.study, config.extra_mixers, config.only)
    report, plot = write_report(output, variants, config)
    return AblationResult(report, plot, tuple(cell.label for cell in todo), skipped)


# --------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class AblateOptions:
    """The ``metaformer ablate`` command line: an AblationConfig, with the classify options every cell
    shares as flags and ``--mixer`` specs to import."""

    TASK: ClassVar[str] = "ablate"

    study: str = option("mixers", "which Table 5 block (default mixers)", choices=STUDY_NAMES)
    list_studies: bool = option(
        False, "print each study's variants (the names --only takes) and exit", flag="--list"
    )
    data: str | None = option(
        None,
        "ImageFolder root with train/ (and val/, else a tenth is held out), or fashion-mnist[:DIR] "
        "(default: the embedded digits)",
    )
    epochs: int = option(DEFAULT_EPOCHS, f"epochs per run (default {DEFAULT_EPOCHS})")
    seeds: int = option(2, "seeds per variant: 0..K-1 (default 2)")
    output: str = option("ablation", "study folder (default ./ablation)")
    jobs: int = option(1, "runs in parallel, each with cores/N threads (default 1)")
    depths: tuple[int, ...] = option(DEFAULT_DEPTHS, "blocks per stage", metavar="D", nargs=4)
    dims: tuple[int, ...] = option(
        DEFAULT_DIMS,
        f"widths per stage (default {' '.join(map(str, DEFAULT_DIMS))}; 64 128 320 512 is the real S12)",
        metavar="C",
        nargs=4,
    )
    mixer: tuple[str, ...] = option(
        (),
        "add your own token mixer to the mixers study (repeatable)",
        metavar="NAME=module.path:Class",
        append=True,
    )
    only: tuple[str, ...] = option((), "run only these rows, e.g. baseline relu", metavar="VARIANT")
    recipe: str | None = option(
        None,
        "training preset for every run (see classify train)",
        choices=("paper", "small", "fashion-mnist"),
    )
    img_size: int | None = option(
        None, "training input size (digits and fashion-mnist 32, folders 224)", metavar="PX"
    )
    batch_size: int | None = option(None, "batch size (default: the recipe's)", metavar="N")
    lr: float | None = option(None, "learning rate (default: the recipe's, scaled by batch size)")
    limit_train: int | None = option(None, "train each run on a seeded subset of N images", metavar="N")
    limit_val: int | None = option(None, "validate on a seeded subset of N images", metavar="N")
    compile: str = option(
        "auto",
        "torch.compile each run's training steps; auto: when its steps pay the compile time back",
        choices=COMPILE_MODES,
    )

    def to_config(self) -> AblationConfig:
        names = ("recipe", "img_size", "batch_size", "lr", "limit_train", "limit_val")
        shared = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        copied = ("study", "output", "data", "epochs", "seeds", "jobs")
        same = {name: getattr(self, name) for name in copied}
        extra = tuple(import_mixer(spec) for spec in self.mixer)
        tuples = {"depths": tuple(self.depths), "dims": tuple(self.dims), "only": tuple(self.only)}
        return AblationConfig(
            **same, **tuples, extra_mixers=extra, train_options=shared, compile=self.compile
        )


@command(
    "ablate",
    AblateOptions,
    "train the paper's Table 5 ablations (mixers, pool sizes, norms, activations, other, hybrids)",
    "Each (variant, seed) is one training run in OUTPUT/runs/; finished runs are never re-run, so rerunning "
    "the command resumes an interrupted study. Writes OUTPUT/ablation.md and .png.",
)
def ablate(options: AblateOptions) -> AblationResult | StudyListing:
    """Run (or resume) the study the command line describes; with ``list``, only name its rows."""
    if options.list_studies:
        return list_studies()
    return run_ablation(options.to_config())


@dataclass(frozen=True)
class StudyListing:
    """Every study and its rows: variant name, the change it makes, the paper's top-1."""

    studies: dict[str, list[dict[str, Any]]]


def list_studies() -> StudyListing:
    return StudyListing(
        {
            study: [{"variant": v.name, "change": v.change, "paper_top1": v.paper_top1} for v in variants]
            for study, variants in STUDIES.items()
        }
    )


def ablate_report(result: AblationResult | StudyListing) -> str:
    if isinstance(result, StudyListing):
        lines = ["study        variant       change (paper ImageNet-1K top-1)"]
        for study, rows in result.studies.items():
            for row in rows:
                lines.append(f"{study:<13}{row['variant']:<14}{row['change']} ({row['paper_top1']})")
        lines.append("run one with --study STUDY, or some rows with --only VARIANT ...")
        return "\n".join(lines)
    trained, skipped = len(result.trained), len(result.skipped)
    return (
        f"{result.report.read_text()}\nwrote {result.report} and {result.plot} "
        f"({trained} cells trained, {skipped} already done)"
    )


COMMANDS = TaskCommands(__name__, None)
