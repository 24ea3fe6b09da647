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

import importlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from metaformer.errors import ConfigError, DataError, check_number
from metaformer.models import VARIANTS, register_mixer
from metaformer.models.mixers import MIXERS
from metaformer.options import option
from metaformer.tasks import TaskCommands, command

logger = logging.getLogger(__name__)

BASE_MODEL = "poolformer_s12"
CELL_FILE = "cell.json"
STUDY_FILE = "study.json"
SUMMARY_FILE = "summary.json"  # written by the training loop (engine/state.py)
REPORT_FILE = "ablation.md"
PLOT_FILE = "ablation.png"
# The default scale fits the embedded digits (1,437 train images at 32x32) on a CPU: S12's depths with
# half of its widths, 10 epochs. dims (64, 128, 320, 512) is the real S12.
DEFAULT_DEPTHS = (2, 2, 6, 2)
DEFAULT_DIMS = (32, 64, 128, 256)
DEFAULT_EPOCHS = 10
# TrainConfig fields the study sets per cell (train_options may not override them).
_CELL_OPTIONS = frozenset(
    {"model", "model_kwargs", "epochs", "seed", "output", "data", "resume", "overwrite"}
)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class AblationVariant:
    """One row of Table 5: overrides on the S12 trunk and what the paper reports for it on ImageNet-1K."""

    name: str  # folder-safe id, e.g. "pool5"
    ablation: str  # Table 5 group, e.g. "pooling size"
    change: str  # the row's change, e.g. "pooling 3 -> 5"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    paper_params_m: float | None = None
    paper_gmacs: float | None = None
    paper_top1: float | None = None


def _from_model(name: str, ablation: str, change: str, model: str, keys: Sequence[str]) -> AblationVariant:
    """A row whose architecture and paper figures are already a registered model (no second copy)."""
    variant = VARIANTS[model]
    overrides = {key: getattr(variant.config, key) for key in keys}
    return AblationVariant(
        name, ablation, change, overrides, variant.paper_params_m, variant.paper_gmacs, variant.paper_top1
    )


BASELINE = _from_model("baseline", "baseline", "PoolFormer-S12 (pooling 3, MLN, GELU)", BASE_MODEL, ())
_HYBRID_KEYS = ("mixers", "mixer_kwargs", "norms", "pos_embed")  # attention hybrids also change the norm

# Paper figures not held by a registered model: PAPER.md 7.1 (params M, GMACs at 224, top-1 %).
STUDIES: dict[str, tuple[AblationVariant, ...]] = {
    "mixers": (
        BASELINE,
        _from_model("identity", "token mixer", "pooling -> identity", "metaformer_id_s12", ("mixers",)),
        AblationVariant("random", "token mixer", "pooling -> global random matrix (frozen)",
                        {"mixers": ("random",) * 4}, 11.9, 3.3, 75.8),
        AblationVariant("dwconv", "token mixer", "pooling -> depthwise conv 3x3",
                        {"mixers": ("dwconv",) * 4}, 11.9, 1.8, 78.1),
    ),
    "pool-size": (
        BASELINE,
        *(
            AblationVariant(f"pool{k}", "pooling size", f"pool size 3 -> {k}",
                            {"mixer_kwargs": {"pool_size": k}}, 11.9, 1.8, top1)
            for k, top1 in ((5, 77.2), (7, 77.1), (9, 76.8))
        ),
    ),
    "norm": (
        BASELINE,
        AblationVariant("layernorm", "normalisation", "MLN -> LayerNorm (channels)",
                        {"norms": ("layernorm",) * 4}, 11.9, 1.8, 76.5),
        AblationVariant("batchnorm", "normalisation", "MLN -> BatchNorm",
                        {"norms": ("batchnorm",) * 4}, 11.9, 1.8, 76.4),
        AblationVariant("nonorm", "normalisation", "MLN -> none", {"norms": ("none",) * 4}, 11.9, 1.8, 46.1),
    ),
    "activation": (
        BASELINE,
        AblationVariant("relu", "activation", "GELU -> ReLU", {"act": "relu"}, 11.9, 1.8, 76.4),
        AblationVariant("silu", "activation", "GELU -> SiLU", {"act": "silu"}, 11.9, 1.8, 77.2),
    ),
    "hybrid": (
        BASELINE,
        _from_model("pppa", "hybrid stages", "[P,P,P,P] -> [P,P,P,Attention]", "metaformer_pppa_s12_224",
                    _HYBRID_KEYS),
        _from_model("ppaa", "hybrid stages", "[P,P,P,P] -> [P,P,Attention,Attention]",
                    "metaformer_ppaa_s12_224", _HYBRID_KEYS),
        _from_model("pppf", "hybrid stages", "[P,P,P,P] -> [P,P,P,SpatialMLP]", "metaformer_pppf_s12_224",
                    _HYBRID_KEYS),
        _from_model("ppff", "hybrid stages", "[P,P,P,P] -> [P,P,SpatialMLP,SpatialMLP]",
                    "metaformer_ppff_s12_224", _HYBRID_KEYS),
    ),
}  # fmt: skip
STUDY_NAMES = (*STUDIES, "all")


def study_variants(
    study: str, extra_mixers: Sequence[str] = (), only: Sequence[str] = ()
) -> list[AblationVariant]:
    """The rows of a study (``all``: every study, the shared baseline once), plus users' mixers.

    ``only`` keeps just the named rows (e.g. to add one variant to a finished study).
    """
    if study not in STUDY_NAMES:
        raise ConfigError(f"unknown study '{study}'; choose from {', '.join(STUDY_NAMES)}")
    groups = list(STUDIES.values()) if study == "all" else [STUDIES[study]]
    variants: dict[str, AblationVariant] = {}
    for group in groups:
        for variant in group:
            variants.setdefault(variant.name, variant)
    if extra_mixers and study not in ("mixers", "all"):
        raise ConfigError(
            f"a user's mixer joins the token-mixer study, not '{study}'; use --study mixers or --study all"
        )
    for name in extra_mixers:
        if name not in MIXERS:
            raise ConfigError(
                f"token mixer '{name}' is not registered; call register_mixer('{name}', MyMixer)"
            )
        if not _NAME_RE.match(name) or name in variants:
            raise ConfigError(
                f"mixer name '{name}' cannot name a study row (it must be letters, digits, '_', '.' or '-' "
                f"and differ from {', '.join(variants)}); register it under another name"
            )
        variants[name] = AblationVariant(
            name, "token mixer", f"pooling -> {name} (user)", {"mixers": (name,) * 4}
        )
    unknown = [name for name in only if name not in variants]
    if unknown:
        raise ConfigError(
            f"study '{study}' has no variant {', '.join(repr(n) for n in unknown)}; "
            f"its variants are {', '.join(variants)}"
        )
    return [v for v in variants.values() if not only or v.name in only]


def import_mixer(spec: str) -> str:
    """Register a user's mixer from ``NAME=module.path:Class`` (the CLI's ``--mixer``); returns NAME.

    The current folder is put on ``sys.path`` first (as uvicorn does), so a ``my_mixers.py`` next to
    the command imports with the ``metaformer`` console script too; worker processes inherit it.
    """
    name, sep, target = spec.partition("=")
    module_name, colon, attr = target.partition(":")
    if not sep or not colon or not name or not module_name or not attr:
        raise ConfigError(f"--mixer '{spec}' is not NAME=module.path:Class, e.g. shift=my_mixers:ShiftMixer")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"--mixer '{spec}': cannot import '{module_name}' ({err}); check the module path"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"--mixer '{spec}': module '{module_name}' has no '{attr}'; check the class name"
            )
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ConfigError(f"--mixer '{spec}': '{attr}' is not a torch.nn.Module class; pass a mixer class")
    register_mixer(name, obj)
    return name


@dataclass(frozen=True)
class AblationConfig:
    """One study: which rows, on which data, at which scale, with how many seeds and parallel jobs.

    ``train_options`` are further ``tasks.classify.TrainConfig`` fields (recipe, batch size, lr, ...)
    applied to every cell, so every variant sees the same recipe. ``extra_mixers`` are registered mixer
    names that join the token-mixer study; ``only`` restricts the study to the named rows.
    """

    study: str = "mixers"
    output: str = "ablation"
    data: str | None = None  # None: the embedded digits
    epochs: int = DEFAULT_EPOCHS
    seeds: int = 2
    jobs: int = 1
    depths: tuple[int, ...] = DEFAULT_DEPTHS
    dims: tuple[int, ...] = DEFAULT_DIMS
    extra_mixers: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    train_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.study not in STUDY_NAMES:
            raise ConfigError(f"unknown study '{self.study}'; choose from {', '.join(STUDY_NAMES)}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be at least 1, got {self.seeds}")
        if self.jobs < 1:
            raise ConfigError(f"jobs must be at least 1, got {self.jobs}")
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ConfigError(
                f"depths and dims need 4 stages (Table 5 swaps mixers per stage), "
                f"got {self.depths} and {self.dims}"
            )
        check_number("depths", self.depths, low=1)
        check_number("dims", self.dims, low=1)
        reserved = sorted(_CELL_OPTIONS & set(self.train_options))
        if reserved:
            raise ConfigError(
                f"train_options may not set {', '.join(reserved)}: the study sets them per cell; "
                "use the AblationConfig fields instead"
            )
        from metaformer.tasks.classify import TrainConfig

        # every cell trains with these options: a bad one fails here, not when the first cell starts
        TrainConfig(model=BASE_MODEL, data=self.data, epochs=self.epochs, **self.train_options).resolve()

    def recipe(self) -> dict[str, Any]:
        """What every cell shares; a finished cell only counts if it was trained with this recipe."""
        return {
            "base_model": BASE_MODEL,
            "data": None if self.data is None else str(Path(self.data).resolve()),
            "epochs": self.epochs,
            "depths": list(self.depths),
            "dims": list(self.dims),
            "train_options": _jsonable(dict(self.train_options)),
        }


@dataclass(frozen=True)
class Cell:
    variant: AblationVariant
    seed: int
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"


@dataclass(frozen=True)
class AblationResult:
    """Where the report went and which cells this call trained or found already done."""

    report: Path
    plot: Path
    trained: tuple[str, ...]
    skipped: tuple[str, ...]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _write_json(path: Path, obj: Any) -> None:
    from metaformer.weights import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(
            f"'{path}' is not valid JSON ({err}); delete its cell folder to train it again"
        ) from None


def cell_is_done(folder: Path, epochs: int) -> bool:
    """Done = summary.json records every planned epoch and cell.json holds the MACs.

    The training loop rewrites summary.json after each epoch, so its mere existence is not enough.
    """
    cell_path = folder / CELL_FILE
    return cell_summary_complete(folder, epochs) and cell_path.is_file() and "macs" in _read_json(cell_path)


def cell_summary_complete(folder: Path, epochs: int) -> bool:
    path = folder / SUMMARY_FILE
    return path.is_file() and int(_read_json(path).get("epochs") or 0) >= epochs


def plan_cells(config: AblationConfig) -> list[Cell]:
    variants = study_variants(config.study, config.extra_mixers, config.only)
    runs = Path(config.output) / "runs"
    return [Cell(v, seed, runs / v.name / f"seed{seed}") for v in variants for seed in range(config.seeds)]


def _check_recipe(output: Path, recipe: Mapping[str, Any]) -> None:
    path = output / STUDY_FILE
    if path.exists():
        saved = _read_json(path)
        changed = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
        if changed:
            detail = "; ".join(f"{k}: {saved.get(k)!r} there, {recipe.get(k)!r} now" for k in changed[:3])
            raise ConfigError(
                f"'{output}' holds a study with another recipe ({detail}); "
                "rerun with the same options or pass another --output"
            )
    else:
        _write_json(path, recipe)


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
    options = {"progress": False, **payload["train_options"]}
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
        "Paper columns: ImageNet-1K, 224x224, the full S12, 300 epochs (PAPER.md 7.1).",
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
    for variant in variants:
        for seed in range(config.seeds):
            path = output / "runs" / variant.name / f"seed{seed}" / "config.json"
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


# --------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class AblateOptions:
    """The ``metaformer ablate`` command line: an AblationConfig, with the classify options every cell
    shares as flags and ``--mixer`` specs to import."""

    TASK: ClassVar[str] = "ablate"

    study: str = option("mixers", "which Table 5 block (default mixers)", choices=STUDY_NAMES)
    data: str | None = option(None, "ImageFolder root with train/ and val/ (default: the embedded digits)")
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
        None, "training preset for every run (see classify train)", choices=("paper", "small")
    )
    img_size: int | None = option(None, "training input size (digits 32, folders 224)", metavar="PX")
    batch_size: int | None = option(None, "batch size (default: the recipe's)", metavar="N")
    lr: float | None = option(None, "learning rate (default: the recipe's, scaled by batch size)")
    limit_train: int | None = option(None, "train each run on a seeded subset of N images", metavar="N")
    limit_val: int | None = option(None, "validate on a seeded subset of N images", metavar="N")

    def to_config(self) -> AblationConfig:
        names = ("recipe", "img_size", "batch_size", "lr", "limit_train", "limit_val")
        shared = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        copied = ("study", "output", "data", "epochs", "seeds", "jobs")
        same = {name: getattr(self, name) for name in copied}
        extra = tuple(import_mixer(spec) for spec in self.mixer)
        tuples = {"depths": tuple(self.depths), "dims": tuple(self.dims), "only": tuple(self.only)}
        return AblationConfig(**same, **tuples, extra_mixers=extra, train_options=shared)


@command(
    "ablate",
    AblateOptions,
    "train the paper's Table 5 ablations (mixers, pool sizes, norms, activations, hybrids)",
    "Each (variant, seed) is one training run in OUTPUT/runs/; finished runs are never re-run, so rerunning "
    "the command resumes an interrupted study. Writes OUTPUT/ablation.md and .png.",
)
def ablate(options: AblateOptions) -> AblationResult:
    """Run (or resume) the study the command line describes."""
    return run_ablation(options.to_config())


def ablate_report(result: AblationResult) -> str:
    trained, skipped = len(result.trained), len(result.skipped)
    return (
        f"{result.report.read_text()}\nwrote {result.report} and {result.plot} "
        f"({trained} cells trained, {skipped} already done)"
    )


COMMANDS = TaskCommands(__name__, None)
