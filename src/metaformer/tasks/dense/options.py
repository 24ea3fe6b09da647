"""The options detect and segment share: their run, eval and predict fields and defaults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from metaformer.errors import check_number
from metaformer.models import get_variant
from metaformer.options import NON_NEGATIVE, EvalOptions, RunOptions, check_fields, option


@dataclass(frozen=True)
class DenseRunOptions(RunOptions):
    """The run fields detect train and segment train add to RunOptions: a backbone to start from, the
    stages to freeze and a warmup counted in steps. None fields come from the recipe."""

    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "weight_decay": {"help": "AdamW weight decay (paper 1e-4)"},
        "num_workers": {"help": "data-loading processes (shapes 0, folders 4)"},
        "recipe": {"help": "preset (paper with --data, else shapes)"},
        "model_kwargs": {"help": "backbone overrides, e.g. '{\"depths\": [1,1,1,1]}'"},
    }

    warmup_iters: int | None = option(None, "linear warmup steps", metavar="N", check=NON_NEGATIVE)
    frozen_stages: int = option(-1, "freeze the stem (0) and stages 1..N (-1: none)", metavar="N")
    backbone_checkpoint: str | None = option(
        None,
        "initialise the backbone from classification weights (official, timm or metaformer)",
        metavar="PATH",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        depths = self.model_kwargs.get("depths", get_variant(self.model).config.depths)
        check_number("frozen_stages", self.frozen_stages, low=-1, high=len(depths))

    def recipe_filled(self, fields: Iterable[str]) -> dict[str, Any]:
        """The recipe's value of each field left as None; the backbone overrides merged (the user's win)."""
        filled = self.recipe_values(fields)
        filled["model_kwargs"] = {**self.RECIPES[self.recipe_name]["model_kwargs"], **self.model_kwargs}
        return filled

    def resolved_with(self, filled: dict[str, Any]) -> Any:
        """A copy with the recipe and the ``filled`` fields set, and the data-loading processes chosen."""
        workers = (
            self.num_workers
            if self.num_workers is not None
            else (0 if self.data is None else default_workers())
        )
        return dataclasses.replace(self, recipe=self.recipe_name, num_workers=workers, **filled)


@dataclass(frozen=True, kw_only=True)
class DenseEvalOptions(EvalOptions):
    """The eval fields detect and segment share: a checkpoint of their own and a split of the data."""

    checkpoint: str = option(help="best/last.safetensors of a TASK run", metavar="PATH")
    split: str | None = option(None, "split to evaluate", metavar="NAME")


@dataclass(frozen=True, kw_only=True)
class DensePredictOptions:
    """The predict fields detect and segment share: images in, a checkpoint, a folder out."""

    TASK: ClassVar[str] = "predict"

    inputs: str = option(
        help="an image file or a folder (searched recursively)", metavar="IMAGE|DIR", positional=True
    )
    checkpoint: str = option(help="best/last.safetensors of a TASK run", metavar="PATH")
    output: str = option("predictions", "where the drawings go", metavar="DIR")
    device: str | None = option(None, "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        check_fields(self)


def default_workers() -> int:
    """Data-loading processes for folder data: up to 4, leaving one core to the training process."""
    return min(4, max(1, (os.cpu_count() or 2) - 1))
