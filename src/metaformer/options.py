"""Config dataclasses as the one source of flags, help, choices, validation and config files.

Every train / eval / predict config is a frozen dataclass whose fields carry their CLI metadata
(``option``): the flag name, help text, metavar and choices, and the range ``check_number`` applies.
``add_flags`` writes a command's argparse flags from the dataclass, ``config_from_args`` builds the
dataclass from a ``--config FILE`` (JSON or YAML: a plain mapping of field values, such as a run's own
config.json) with the flags given on the command line over it, and the dataclass validates itself.
``RunOptions`` holds the run fields every training task shares, validated once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

from metaformer.errors import ConfigError, check_choice, check_number

AMP_MODES = ("off", "auto", "bf16", "fp16")
COMPILE_MODES = ("auto", "on", "off")  # --compile; metaformer.compiling runs it
MODEL_KWARGS_EXAMPLE = "'{\"depths\": [1, 1, 1, 1]}'"


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | tuple[str, ...] | None = None,
    metavar: str | tuple[str, ...] | None = None,
    choices: tuple[str, ...] | str | None = None,
    nargs: int | str | None = None,
    check: Mapping[str, Any] | None = None,
    negate: bool = False,
    append: bool = False,
    positional: bool = False,
    factory: Any = None,
) -> Any:
    """A dataclass field with its command-line form. ``choices`` may name a class attribute (a mapping
    whose keys are the choices, e.g. "RECIPES"); ``check``: keyword arguments of ``check_number``;
    ``negate``: a True-by-default bool whose flag (``--no-...``) turns it off; ``append``: a repeatable
    flag, one value each time; ``flag``: the flag (or flags) when not ``--field-name``."""
    metadata = {
        "help": help,
        "flag": flag,
        "metavar": metavar,
        "choices": choices,
        "nargs": nargs,
        "check": dict(check) if check is not None else None,
        "negate": negate,
        "append": append,
        "positional": positional,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


POSITIVE = {"low": 0, "low_open": True}
NON_NEGATIVE = {"low": 0}
AT_LEAST_1 = {"low": 1}
PROBABILITY = {"low": 0, "high": 1}
FRACTION = {"low": 0, "high": 1, "low_open": True}  # 0 < x <= 1: a crop, a share, a decay factor
BELOW_ONE = {"low": 0, "high": 1, "high_open": True}  # 0 <= x < 1: a drop rate, a beta
OPEN_UNIT = {"low": 0, "high": 1, "low_open": True, "high_open": True}  # 0 < x < 1: a split, an EMA
SEED_RANGE = {"low": -(2**63), "high": 2**64 - 1}  # what torch.manual_seed takes


def field_meta(cls: type, name: str) -> dict[str, Any]:
    """A field's metadata with the class's ``FLAG_OVERRIDES`` (per-task help texts, choices) applied."""
    meta = dict(next(f for f in dataclasses.fields(cls) if f.name == name).metadata)
    meta.update(getattr(cls, "FLAG_OVERRIDES", {}).get(name, {}))
    return meta


def check_fields(config: Any) -> None:
    """Every field's ``check`` range, in field order: the one sentence of ``check_number``."""
    for f in dataclasses.fields(config):
        check = field_meta(type(config), f.name).get("check")
        if check is not None:
            check_number(f.name, getattr(config, f.name), **check)


def jsonable(obj: Any) -> Any:
    """Tuples to lists, keys to strings: what a config.json holds."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- the shared run fields
@dataclass(frozen=True)
class RunOptions:
    """The run fields every training task shares. A task's config adds its own fields; None fields come
    from the task's recipe (``RECIPES``, a plain mapping of field values) in its ``resolve``."""

    TASK: ClassVar[str] = "run"
    RECIPES: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    DEMO_RECIPE: ClassVar[str] = "shapes"  # the recipe without --data (the embedded or generated data)
    # keys a run's config.json records besides the fields; --config of that file ignores them
    RECORD_KEYS: ClassVar[tuple[str, ...]] = (
        "world_size",
        "class_names",
        "epochs_run",
        "iters_run",
        "compile_decision",
    )
    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {}

    model: str = option("poolformer_s12", "backbone name (`metaformer models` lists them)")
    data: str | None = option(None, "data folder", metavar="DIR")
    recipe: str | None = option(None, "preset (paper with --data, else the demo's)", choices="RECIPES")
    output: str | None = option(None, "run folder (default runs/TASK/MODEL-TIMESTAMP)", metavar="DIR")
    resume: bool = option(False, "continue the run in --output from its last checkpoint")
    overwrite: bool = option(False, "replace the run files in --output")
    epochs: int | None = option(None, "epochs", metavar="N", check=POSITIVE)
    batch_size: int | None = option(None, "images per process per step", metavar="N", check=POSITIVE)
    lr: float | None = option(None, "AdamW learning rate (used as given)", metavar="LR", check=POSITIVE)
    weight_decay: float | None = option(None, "AdamW weight decay", metavar="WD", check=NON_NEGATIVE)
    accum_steps: int | None = option(1, "gradient accumulation steps", metavar="N", check=AT_LEAST_1)
    amp: str | None = option(
        None,
        "autocast dtype (default: the recipe's); auto: bf16 where native (CUDA, AVX512-BF16, AMX)",
        choices=AMP_MODES,
    )
    clip_grad: float | None = option(
        None, "clip the gradient norm (paper: off)", metavar="NORM", check=POSITIVE
    )
    seed: int | None = option(0, "random seed", metavar="N", check=SEED_RANGE)
    num_workers: int | None = option(
        None, "data-loading processes", flag="--workers", metavar="N", check=NON_NEGATIVE
    )
    limit_train: int | None = option(
        None, "train on a seeded random subset of N images", metavar="N", check=AT_LEAST_1
    )
    limit_val: int | None = option(
        None, "validate on a seeded random subset of N images", metavar="N", check=AT_LEAST_1
    )
    stop_after_epoch: int | None = option(None, "stop (resumably) after epoch N", metavar="N")
    channels_last: bool | None = option(
        None, "channels-last memory format (default: on for CPU, where it is faster; off for CUDA)"
    )
    compile: str = option(
        "auto",
        "torch.compile the training steps; auto: when the announced steps pay the compile time back",
        choices=COMPILE_MODES,
    )
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available)")
    progress: bool | None = option(None, "tqdm progress bars (default: only when stderr is a terminal)")
    eval_every: int | None = option(
        None, "validate every N epochs and the last", metavar="N", check=AT_LEAST_1
    )
    model_kwargs: Mapping[str, Any] = option(
        help="model overrides, e.g. '{\"depths\": [1,1,1,1]}'", metavar="JSON", factory=dict
    )

    def __post_init__(self) -> None:
        from metaformer.models import get_variant

        get_variant(self.model)  # UnknownModelError with close matches
        if self.recipe is not None and self.recipe not in self.RECIPES:
            raise ConfigError(f"unknown recipe '{self.recipe}'; choose one of {', '.join(self.RECIPES)}")
        check_fields(self)
        check_number("stop_after_epoch", self.stop_after_epoch, low=1, high=self.epochs)
        if self.amp is not None:
            check_choice("amp", self.amp, AMP_MODES)
        if self.resume and self.overwrite:
            raise ConfigError("pass either --resume or --overwrite, not both")
        if self.resume and self.output is None:
            raise ConfigError("--resume needs --output naming the run folder to continue")

    @property
    def recipe_name(self) -> str:
        return self.recipe or (self.DEMO_RECIPE if self.data is None else "paper")

    def recipe_values(self, names: Iterable[str], values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Each named field as the user set it, or the recipe's value (``values``: the recipe with
        model-dependent defaults added) where they left it None."""
        values = self.RECIPES[self.recipe_name] if values is None else values
        return {
            name: getattr(self, name) if getattr(self, name) is not None else values[name] for name in names
        }

    def resolve(self, world_size: int = 1) -> Any:
        """A copy with every recipe field filled in: what a run records in config.json and trains with."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists) of every field: what config.json records."""
        return jsonable(dataclasses.asdict(self))


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """The fields every eval command shares: the data, how to load it and where to run."""

    TASK: ClassVar[str] = "eval"
    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {}

    data: str | None = option(None, "data folder", metavar="DIR")
    num_workers: int = option(0, "data-loading processes", flag="--workers", metavar="N", check=NON_NEGATIVE)
    limit: int | None = option(
        None, "evaluate a seeded random subset of N images", metavar="N", check=AT_LEAST_1
    )
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available)")
    progress: bool | None = option(None, "tqdm progress bars (default: only when stderr is a terminal)")

    def __post_init__(self) -> None:
        check_fields(self)


# --------------------------------------------------------------------------- argparse from dataclasses
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # each field's annotation in the namespace of the class declaring it


def _strip_none(kind: Any) -> Any:
    if typing.get_origin(kind) in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def _choices(cls: type, meta: Mapping[str, Any]) -> tuple[str, ...] | None:
    choices = meta.get("choices")
    if isinstance(choices, str):
        return tuple(getattr(cls, choices))
    return choices


def flag_names(cls: type, name: str) -> tuple[str, ...]:
    flag = field_meta(cls, name).get("flag") or "--" + name.replace("_", "-")
    return (flag,) if isinstance(flag, str) else tuple(flag)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse argument per field of ``cls`` that has a command-line form. Every flag's default is
    "not given" (SUPPRESS), so ``config_from_args`` can tell a flag from a config file's value."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = field_meta(cls, f.name)
        kind = _strip_none(hints[f.name])
        text = (meta.get("help") or "").replace("TASK", getattr(cls, "TASK", "run")) or None
        kwargs: dict[str, Any] = {"help": text, "dest": f.name}
        if meta.get("positional"):
            parser.add_argument(f.name, metavar=meta.get("metavar"), help=kwargs["help"])
            continue
        kwargs["default"] = argparse.SUPPRESS
        if kind is bool:
            if meta.get("negate"):
                kwargs["action"] = "store_false"
            elif f.default is None:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_true"
        else:
            if meta.get("metavar") is not None:
                kwargs["metavar"] = meta["metavar"]
            if typing.get_origin(kind) is tuple:
                args = typing.get_args(kind)
                kwargs["type"] = args[0]
                if meta.get("append"):
                    kwargs["action"] = "append"
                else:
                    kwargs["nargs"] = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
            elif kind in (int, float):
                kwargs["type"] = kind
            choices = _choices(cls, meta)
            if choices is not None:
                kwargs["choices"] = choices
            if meta.get("nargs") is not None:
                kwargs["nargs"] = meta["nargs"]
        parser.add_argument(*flag_names(cls, f.name), **kwargs)


def model_kwargs_json(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """--model-kwargs: a JSON object of model overrides (a config file gives the mapping itself)."""
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    if not isinstance(text, str):  # a config file's list or number
        raise ConfigError(f"--model-kwargs must be a JSON object, e.g. {MODEL_KWARGS_EXAMPLE}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--model-kwargs is not valid JSON ({err}); e.g. {MODEL_KWARGS_EXAMPLE}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, e.g. {MODEL_KWARGS_EXAMPLE}")
    return value


def read_config_file(path: str | Path, cls: type, command: str) -> dict[str, Any]:
    """The field values a JSON or YAML file holds for ``cls``; keys a run records besides its fields
    (``RECORD_KEYS``) are skipped, any other unknown key is an error naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist; pass a JSON or YAML file") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise ConfigError(f"config file '{path}' is not a text file; pass a JSON or YAML file") from None
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - json and yaml each raise their own error types
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config file '{path}' is not valid JSON or YAML ({first}); fix it") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of field names to values, "
            f"not a {type(values).__name__}"
        )
    names = [f.name for f in dataclasses.fields(cls)]
    ignored = set(getattr(cls, "RECORD_KEYS", ()))
    out = {}
    for key, value in values.items():
        if key in ignored:
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"config file '{path}' sets '{key}', which `metaformer {command}` does not take{hint}; "
                "remove it"
            )
        out[key] = value
    return out


def config_from_args(
    cls: type, args: argparse.Namespace, command: str, parser: argparse.ArgumentParser | None = None
) -> Any:
    """``cls`` from the dataclass defaults, then ``--config FILE``, then the flags given. A field without
    a default that neither gives is argparse's "required" error (exit 2) on ``parser``."""
    values = read_config_file(args.config, cls, command) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({name: value for name, value in vars(args).items() if name in names})
    missing = [
        flag_names(cls, f.name)[0]
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        if parser is not None:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
        raise ConfigError(f"missing {', '.join(missing)}; give it as a flag or in --config")
    hints = _hints(cls)
    for name, value in list(values.items()):
        kind = _strip_none(hints[name])
        if kind is bool and value is not None and not isinstance(value, bool):  # YAML's "yes" is a string
            raise ConfigError(f"{name} must be true or false, got {value!r}; fix it in {args.config}")
        if typing.get_origin(kind) is tuple and isinstance(value, list):
            values[name] = tuple(value)
        elif typing.get_origin(kind) is Mapping or kind is Mapping:
            values[name] = model_kwargs_json(value)
    return cls(**values)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or YAML file of field values (a run's own config.json works); flags given override it",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )


__all__ = [
    "AMP_MODES",
    "EvalOptions",
    "RunOptions",
    "add_config_flags",
    "add_flags",
    "check_fields",
    "config_from_args",
    "jsonable",
    "option",
    "read_config_file",
]
