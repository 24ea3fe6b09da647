"""A MetaFormer backbone with a torchvision FeaturePyramidNetwork: the neck detection and segmentation share.

The contract is torchvision's ``BackboneWithFPN``: ``forward(images)`` returns an OrderedDict of
``out_channels``-wide maps, finest first, which is all RetinaNet, Mask R-CNN and the Semantic FPN head
need. The FPN's input widths come from the backbone's ``feature_info``, never from a hand-typed list.
The end of the file holds the few helpers the detection and segmentation tasks share (file I/O,
subsets, class checks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from metaformer.data import images
from metaformer.data.segmentation import IMAGE_EXTENSIONS
from metaformer.errors import CheckpointError, ConfigError, check_number
from metaformer.models import create_model, get_variant
from metaformer.models.metaformer import MetaFormerFeatures
from metaformer.options import NON_NEGATIVE, EvalOptions, RunOptions, check_fields, option
from metaformer.weights import atomic_write

logger = logging.getLogger(__name__)


def create_backbone(
    name: str,
    *,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    checkpoint_path: str | Path | None = None,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> MetaFormerFeatures:
    """The official dense backbone: stage maps at ``out_indices``, each through its own fresh GroupNorm.

    ``checkpoint_path`` takes a classification checkpoint (official, timm or ours); its head is unused.
    Drop path defaults to 0, as in the paper's detection and segmentation configs (PAPER.md 1.11).
    """
    return create_model(
        name,
        features_only=True,
        out_indices=out_indices,
        out_norm=True,
        checkpoint_path=checkpoint_path,
        drop_path_rate=drop_path_rate,
        **overrides,
    )


class LastLevelP6P7OnInput(ExtraFPNBlock):
    """RetinaNet's P6 = conv3x3/2(C5) and P7 = conv3x3/2(P6), mmdetection's ``add_extra_convs='on_input'``.

    Unlike torchvision's LastLevelP6P7 it always reads C5 (also when C5 already has the FPN's width) and,
    as mmdetection's default ``relu_before_extra_convs=False``, applies no ReLU before P7.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)

    def forward(
        self, p: list[torch.Tensor], c: list[torch.Tensor], names: list[str]
    ) -> tuple[list[torch.Tensor], list[str]]:
        p6 = self.p6(c[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


class BackboneFPN(nn.Module):
    """Backbone -> OrderedDict {'0': finest, ..., extra levels} of ``out_channels`` maps.

    ``extra``: None (the Semantic FPN), ``"pool"`` (Mask R-CNN's max-pooled P6) or ``"p6p7"``
    (RetinaNet's P6/P7 from C5). ``frozen_stages`` freezes the stem (0) and stages 1..k (k >= 1),
    mmdetection's convention; -1 trains everything. Frozen parts stay in eval mode.
    """

    def __init__(
        self,
        backbone: MetaFormerFeatures,
        *,
        out_channels: int = 256,
        extra: str | None = None,
        frozen_stages: int = -1,
    ):
        super().__init__()
        in_channels = backbone.out_channels
        if extra == "pool":
            extra_block: ExtraFPNBlock | None = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_block = LastLevelP6P7OnInput(in_channels[-1], out_channels)
        elif extra is None:
            extra_block = None
        else:
            raise ConfigError(f"unknown FPN extra levels '{extra}'; choose 'pool', 'p6p7' or None")
        num_stages = len(backbone.stages)
        if not -1 <= frozen_stages <= num_stages:
            raise ConfigError(f"frozen_stages must be in -1..{num_stages}, got {frozen_stages}")
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        self.strides = list(backbone.strides)
        self.frozen_stages = frozen_stages
        for module in self.fpn.modules():  # the paper initialises the added layers with Xavier
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self._frozen_modules():
            for param in module.parameters():
                param.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.body.stem, *list(self.body.stages)[: self.frozen_stages]]

    def train(self, mode: bool = True) -> BackboneFPN:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


# --------------------------------------------------------------------------- shared by detect and segment
def check_classes(checkpoint: str | Path, trained: Sequence[str], data: Sequence[str], where: str) -> None:
    """A checkpoint only fits data with as many classes as it was trained for."""
    if len(trained) != len(data):
        raise CheckpointError(
            f"checkpoint '{checkpoint}' was trained for {len(trained)} classes but {where} has {len(data)}; "
            "evaluate on data with the classes it was trained on, or train a new model"
        )
    if list(trained) != list(data):
        logger.warning(
            "class names differ between the checkpoint (%s) and the data (%s)",
            list(trained)[:5],
            list(data)[:5],
        )


def image_paths(inputs: str | Path) -> list[Path]:
    """One image file, or every image in a folder and its subfolders (sorted)."""
    return images.image_paths(inputs, IMAGE_EXTENSIONS)


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as a (3, H, W) float tensor in [0, 1]."""
    array = np.asarray(images.open_rgb(path), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


def save_png(image: torch.Tensor, path: Path) -> None:
    """A (3, H, W) or (H, W) uint8 tensor as a PNG file, atomically."""
    array = image.permute(1, 2, 0).numpy() if image.ndim == 3 else image.numpy()
    with atomic_write(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict(strict=True) with a one-sentence CheckpointError naming the first problem."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0])[:200]
        raise CheckpointError(
            f"the weights in '{path}' do not fit the model they describe ({first}); re-save them"
        ) from None


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


def save_task_weights(
    model: nn.Module, path: str | Path, config: Any, *, task: str, class_names: Sequence[str], **metadata: Any
) -> None:
    """Safetensors with the model's config dataclass, class names and ``metadata``, so eval/predict rebuild
    the model from the file alone."""
    from metaformer.weights import write_weights

    write_weights(
        model.state_dict(),
        path,
        model_name=config.backbone,
        config=dataclasses.asdict(config),
        num_classes=config.num_classes,
        class_names=class_names,
        metadata={"task": task, **metadata},
    )


def read_task_metadata(path: str | Path, task: str, kind: str) -> dict[str, Any]:
    """The metadata of a file ``save_task_weights`` wrote for ``task``; CheckpointError for any other."""
    from metaformer.weights import read_metadata

    meta = read_metadata(path)
    if meta.get("task") != task:
        raise CheckpointError(
            f"'{path}' is not a {kind} checkpoint (task {meta.get('task') or 'classify'}); pass the "
            f"best.safetensors or last.safetensors of a `metaformer {task} train` run"
        )
    return meta


def default_workers() -> int:
    """Data-loading processes for folder data: up to 4, leaving one core to the training process."""
    return min(4, max(1, (os.cpu_count() or 2) - 1))


def tuple_values(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Lists to tuples in a dict of model overrides, so a config read back from JSON equals the original."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
