"""The options detect and segment share: their run, eval and predict fields and defaults."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from metaformer.errors import ConfigError, check_number
from metaformer.models import get_variant
from metaformer.options import NON_NEGATIVE, EvalOptions, RunOptions, check_fields, option

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseRunOptions(RunOptions):
    """The run fields detect train and segment train add to RunOptions: a backbone to start from (a
    classification checkpoint, or with ``pretrained`` the released weights of ``model``), the stages to
    freeze and a warmup counted in steps. None fields come from the recipe."""

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
        flag=("--backbone-checkpoint", "--init-checkpoint"),
        metavar="PATH",
    )
    pretrained: bool = option(False, "initialise the backbone from --model's released ImageNet weights")

    def __post_init__(self) -> None:
        super().__post_init__()
        depths = self.model_kwargs.get("depths", get_variant(self.model).config.depths)
        check_number("frozen_stages", self.frozen_stages, low=-1, high=len(depths))
        if self.pretrained and self.backbone_checkpoint is not None:
            raise ConfigError(
                "pass either --pretrained or --init-checkpoint (--backbone-checkpoint), not both"
            )
        if self.pretrained:
            from metaformer.weights import get_weights

            get_weights(self.model)  # a model without released weights fails here, before any download

    def recipe_filled(self, fields: Iterable[str]) -> dict[str, Any]:
        """The recipe's value of each field left as None; the backbone overrides merged (the user's win)."""
        filled = self.recipe_values(fields)
        filled["model_kwargs"] = self.backbone_overrides(self.RECIPES[self.recipe_name]["model_kwargs"])
        return filled

    def backbone_overrides(self, recipe_trunk: Mapping[str, Any]) -> dict[str, Any]:
        """The backbone's overrides: the recipe's trunk (the shapes recipe's small one) under the user's
        --model-kwargs, but not when the backbone starts from weights, whose shapes are --model's."""
        starts_from_weights = self.pretrained or self.backbone_checkpoint is not None
        return {**({} if starts_from_weights else recipe_trunk), **self.model_kwargs}  # the user's win

    def backbone_weights(self) -> str | None:
        """The classification weights the backbone starts from: ``backbone_checkpoint``, or with
        ``pretrained`` the released weights of ``model`` (downloaded once into the cache); None for a
        random start, where frozen stages would stay random (a warning says so)."""
        if self.pretrained:
            from metaformer.weights import download_weights, get_weights

            record = get_weights(self.model)
            if record.sha256 is None:
                logger.warning("weights %s are unverified: no sha256 was published for them", record.tag)
            return str(download_weights(record.tag))
        if self.backbone_checkpoint is None and self.frozen_stages >= 0 and not self.resume:
            logger.warning(
                "--frozen-stages %d freezes randomly initialised stages, which then never learn; start "
                "from weights with --pretrained or --init-checkpoint, or leave --frozen-stages out",
                self.frozen_stages,
            )
        return self.backbone_checkpoint

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
