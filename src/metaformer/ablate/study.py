"""An ablation study as data: the variants of the paper's Table 5 (PAPER.md 7.1) as ``create_model``
overrides on a ``poolformer_s12`` trunk, the ``AblationConfig`` of a study, its cells (one training run per
variant and seed) and the files that record them (``study.json``, ``cell.json``). ``metaformer.ablate`` runs
the cells, ``ablate.report`` reads them back."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from metaformer.errors import ConfigError, DataError, check_choice, check_number
from metaformer.models import VARIANTS, register_mixer
from metaformer.models.mixers import MIXERS
from metaformer.options import COMPILE_MODES

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
    "other": (
        BASELINE,
        AblationVariant("noresidual", "other", "residual connection -> none", {"residual": False},
                        11.9, 1.8, 0.1),
        AblationVariant("nomlp", "other", "channel MLP -> none", {"mlp_ratio": 0}, 2.5, 0.2, 5.7),
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
    compile: str = "auto"  # each cell's --compile; not in the recipe: it changes speed, not results

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
        check_choice("compile", self.compile, COMPILE_MODES)
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
            "data": _data_record(self.data),
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


def _data_record(data: str | None) -> str | None:
    """How the study records its data: a folder by its absolute path, Fashion-MNIST by its files' folder."""
    from metaformer.data.fashion_mnist import fashion_mnist_dir, is_fashion_mnist

    if data is None:
        return None
    if is_fashion_mnist(data):
        return f"fashion-mnist:{fashion_mnist_dir(data)}"
    return str(Path(data).resolve())


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
