"""Loading a state dict into a model: the strict key-and-shape check, what may differ (a classifier of
another size, a backbone's output norms), the error that names a likely fix, and released weights.

Knows the model classes and the variant table (``models.metaformer``, ``models.variants``), never the
factory: ``create_model(pretrained=True)`` calls in here, so this module must not call back.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from metaformer.errors import CheckpointError
from metaformer.models.metaformer import MetaFormer, MetaFormerFeatures
from metaformer.models.variants import VARIANTS, model_kwargs
from metaformer.weights.download import download_weights
from metaformer.weights.folder import check_transformers_config, is_transformers_config
from metaformer.weights.io import read_checkpoint, read_folder_config
from metaformer.weights.layouts import _OPENMMLAB_PARTS, _POOLFORMER_ONLY, detect_layout, to_ours
from metaformer.weights.pretrained import get_weights

logger = logging.getLogger(__name__)


def compare_state_dict(
    state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """Missing, unexpected and wrong-shape keys of ``state`` against the model's expected shapes."""
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    mismatched = [k for k in state if k in shapes and tuple(state[k].shape) != tuple(shapes[k])]
    return missing, unexpected, mismatched


@dataclass
class LoadReport:
    """What ``load_weights`` did beyond a plain strict load.

    missing: model keys left as initialised (new ``out_norms``, a re-initialised classifier);
    unexpected: checkpoint keys not used (the head, for a backbone or a model with num_classes=0);
    mismatched: checkpoint classifier keys whose shape differed from the model's.
    """

    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    reinitialized_classifier: bool = False


def _num_classes(state: Mapping[str, torch.Tensor]) -> int:
    for key in ("head.fc.weight", "head.fc.fc2.weight"):
        if key in state:
            return int(state[key].shape[0])
    return 0


def _architecture(state: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(dims, depths, in_chans) read from the shapes of an ours-layout state dict."""
    dims, depths = {}, {}
    for key, value in state.items():
        if key == "stem.conv.weight":
            dims[0] = int(value.shape[0])
        elif m := re.fullmatch(r"stages\.(\d+)\.downsample\.conv\.weight", key):
            dims[int(m.group(1))] = int(value.shape[0])
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key):
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    stem = state.get("stem.conv.weight")
    num_stages = max([*dims, *depths], default=-1) + 1
    return (
        tuple(dims.get(i, 0) for i in range(num_stages)),
        tuple(depths.get(i, 0) for i in range(num_stages)),
        int(stem.shape[1]) if stem is not None else 0,
    )


@functools.lru_cache(maxsize=64)
def _variant_shapes(name: str, num_classes: int, in_chans: int) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MetaFormer(**model_kwargs(name, num_classes=num_classes, in_chans=in_chans))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def matching_models(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered model names whose state dict has exactly the keys and shapes of ``state`` (ours layout).

    Several names can match: mixers without weights (pooling, identity) leave no trace in a checkpoint.
    """
    dims, depths, in_chans = _architecture(state)
    has_head = any(k.startswith("head.") for k in state)
    backbone = {k: v for k, v in state.items() if not k.startswith("out_norms.")}
    names = []
    for name, variant in VARIANTS.items():
        if tuple(variant.config.dims) != dims or tuple(variant.config.depths) != depths:
            continue
        shapes = _variant_shapes(name, _num_classes(state), in_chans or 3)
        if not has_head:
            shapes = {k: s for k, s in shapes.items() if not k.startswith("head.")}
        if not any(compare_state_dict(backbone, shapes)):
            names.append(name)
    return names


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _span(values: tuple[int, ...]) -> str:
    return f"{values[0]}..{values[-1]}" if values else "none"


def _guess_fix(state: Mapping[str, torch.Tensor], model: nn.Module, layout: str = "") -> str:
    """A likely cause and fix for a checkpoint that does not fit ``model``."""
    dims, depths, in_chans = _architecture(state)
    model_dims = tuple(getattr(model, "dims", ()) or ())
    model_depths = tuple(getattr(model, "depths", ()) or ())
    if not model_dims:  # a MetaFormerFeatures backbone: read the wrapped stages' shapes
        model_dims, model_depths, _ = _architecture(model.state_dict())
    model_in = getattr(model, "in_chans", in_chans)
    if any(k.startswith("stage_norms.") for k in state) and not isinstance(model, MetaFormerFeatures):
        return (
            "it is a detection/segmentation backbone (output norms norm0/2/4/6, no classifier): load it "
            "with create_backbone(...) or create_model(..., features_only=True, out_norm=True)"
        )
    state = {k: v for k, v in state.items() if not k.startswith("stage_norms.")}
    candidates = [n for n in matching_models(state) if n != getattr(model, "model_name", None)]
    if layout in _POOLFORMER_ONLY:
        candidates = [n for n in candidates if set(VARIANTS[n].config.mixers) == {"pooling"}]
    candidates = candidates[:3]
    guess = f"a {' or '.join(candidates)} checkpoint? pass the matching model name" if candidates else ""
    if in_chans and in_chans != model_in:
        return (
            f"the checkpoint takes {in_chans} input channels and the model {model_in}: "
            f"pass in_chans={in_chans}"
        )
    if dims and model_dims and len(dims) != len(model_dims):
        return f"the checkpoint has {len(dims)} stages and the model {len(model_dims)}: " + (
            guess or "rebuild the model the checkpoint was saved from"
        )
    if dims and model_dims and dims != model_dims:
        size = {96: "an M-size", 64: "an S-size", 128: "a B-size"}.get(dims[0], "a different-size")
        return f"checkpoint dims {_span(dims)} but model dims {_span(model_dims)}: " + (
            guess or f"{size} checkpoint? pass the matching model name"
        )
    if depths and model_depths and depths != model_depths:
        return (
            f"checkpoint depths {','.join(map(str, depths))} but model depths "
            f"{','.join(map(str, model_depths))}: " + (guess or "pass the matching model name")
        )
    if guess:
        return f"the tensors look like {guess}"
    return (
        "the checkpoint comes from a model with other options (mixers, norms, head); build the model it was "
        "saved from (model_from_weights does this for metaformer files)"
    )


def _mismatch_error(
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    model: nn.Module,
    layout: str,
    source: str,
) -> CheckpointError:
    """One sentence: counts and first few missing / unexpected / wrong-shape keys, and a guessed fix."""
    missing, unexpected, mismatched = compare_state_dict(state, shapes)
    if isinstance(model, MetaFormerFeatures):
        missing = [k for k in missing if not k.startswith("out_norms.")]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if mismatched:
        shown = ", ".join(f"{k} {list(state[k].shape)} vs {list(shapes[k])}" for k in mismatched[:3])
        more = ", ..." if len(mismatched) > 3 else ""
        parts.append(f"{len(mismatched)} with the wrong shape ({shown}{more})")
    name = getattr(model, "model_name", None) or type(model).__name__
    return CheckpointError(
        f"checkpoint '{source}' ({layout} layout) does not fit {name}: {', '.join(parts)} keys; "
        f"{_guess_fix(state, model, layout)}"
    )


def build_loaded(
    build: Callable[[], nn.Module], state: dict[str, torch.Tensor], layout: str, source: str
) -> nn.Module:
    """``build()`` with ``state`` loaded into it, skipping the random init where it would be overwritten.

    A model's init (truncated-normal draws over every weight) costs more than reading its checkpoint,
    most of a one-image ``classify predict``. So the model is first built on the meta device (shapes
    only, no memory, no init) and takes the checkpoint's tensors as its own (``assign=True``) when the
    strict check passes: the same keys, shapes and dtypes, and no tensor left on meta (a buffer the state
    dict does not hold). Otherwise it is built for real and loaded by ``_load_into``, with its checks,
    messages and partial loads (a re-initialised classifier, a backbone's fresh norms)."""
    with torch.device("meta"):
        skeleton = build()
    expected = skeleton.state_dict()
    exact = state.keys() == expected.keys() and all(
        state[k].shape == v.shape and state[k].dtype == v.dtype and state[k].device.type == "cpu"
        for k, v in expected.items()
    )
    if exact:
        skeleton.load_state_dict(state, strict=True, assign=True)
        if not any(_meta_tensors(skeleton)):
            name = getattr(skeleton, "model_name", None) or type(skeleton).__name__
            logger.info("loaded %s (%s layout) into %s", source, layout, name)
            return skeleton
    model = build()
    _load_into(model, state, layout, source)
    return model


def _meta_tensors(model: nn.Module) -> Iterator[str]:
    """Names of the tensors ``model`` still holds on the meta device (parameters, buffers, attributes)."""
    for module_name, module in model.named_modules():
        tensors = {**module._parameters, **module._buffers, **vars(module)}
        for name, value in tensors.items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                yield f"{module_name}.{name}"


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], layout: str, source: str) -> LoadReport:
    """Check keys and shapes of an ours-layout state dict against ``model``, then load it."""
    name = getattr(model, "model_name", None) or type(model).__name__
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = LoadReport(layout=layout)
    tolerated: set[str] = set()

    def drop(keep: Callable[[str], bool]) -> None:
        for key in [k for k in state if not keep(k)]:
            report.unexpected.append(key)
            del state[key]

    if layout == "mmdet_mmseg":
        parts = sorted({k.split(".", 1)[0] for k in state if k.startswith(_OPENMMLAB_PARTS)})
        drop(lambda k: not k.startswith(_OPENMMLAB_PARTS))
        if parts:
            logger.info(
                "%s: using the backbone only; its %s weights are not loaded", source, ", ".join(parts)
            )
    if isinstance(model, MetaFormerFeatures):
        num_stages = len(model.stages)
        _place_stage_norms(model, state, report, source)
        drop(lambda k: not k.startswith("head.") and not _stage_at_least(k, num_stages))
        tolerated = {k for k in shapes if k.startswith("out_norms.")}  # fresh layers of the backbone
    elif not any(k.startswith("head.fc.") for k in shapes):  # num_classes == 0
        drop(lambda k: not k.startswith("head.fc."))

    missing, unexpected, mismatched = compare_state_dict(state, shapes)
    missing = [k for k in missing if k not in tolerated]
    problems = missing + unexpected + mismatched
    classifier_only = (
        problems
        and isinstance(model, MetaFormer)
        and model.num_classes > 0
        and all(k.startswith("head.fc.") for k in problems)
    )
    if problems and not classifier_only:
        raise _mismatch_error(state, shapes, model, layout, source)
    if classifier_only:
        ckpt_classes = _num_classes(state)
        model.reset_classifier(model.num_classes)
        for key in unexpected + mismatched:
            del state[key]
        report.reinitialized_classifier = True
        report.mismatched = mismatched
        report.unexpected += unexpected
        what = f"{ckpt_classes} classes" if ckpt_classes else "no classifier"
        logger.warning("checkpoint has %s, model has %d: classifier re-initialised", what, model.num_classes)
    result = model.load_state_dict(state, strict=False)
    report.missing = sorted(result.missing_keys)
    expected_missing = set(missing) | tolerated | (set(mismatched) if classifier_only else set())
    if result.unexpected_keys or not set(result.missing_keys) <= expected_missing:
        raise CheckpointError(  # cannot happen after the checks above unless the model changed underneath
            f"loading '{source}' into {name} left keys unloaded ({_first(sorted(result.missing_keys))}); "
            "report this as a bug"
        )
    logger.info("loaded %s (%s layout) into %s", source, layout, name)
    return report


def _place_stage_norms(
    model: MetaFormerFeatures, state: dict[str, torch.Tensor], report: LoadReport, source: str
) -> None:
    """Move a dense checkpoint's ``stage_norms.{s}`` onto the ``out_norms`` of the backbone's outputs.

    A norm for a stage the backbone does not output is reported and logged, never dropped silently; an
    output with no norm in the checkpoint (stage 0 of a RetinaNet file) keeps its fresh init, logged too.
    """
    found = {int(m.group(1)) for k in state if (m := re.match(r"stage_norms\.(\d+)\.", k))}
    if not found:
        return
    has_norms = model.out_norm is not None
    for key in [k for k in state if k.startswith("stage_norms.")]:
        _, stage, param = key.split(".", 2)
        value = state.pop(key)
        if has_norms and int(stage) in model.out_indices:
            state[f"out_norms.{model.out_indices.index(int(stage))}.{param}"] = value
        else:
            report.unexpected.append(key)
    unused = sorted(found - set(model.out_indices)) if has_norms else sorted(found)
    if unused:
        why = "the backbone has no output norms (pass out_norm=True)" if not has_norms else "not an output"
        logger.warning(
            "%s: output norms of stage(s) %s are not loaded (%s)", source, ", ".join(map(str, unused)), why
        )
    fresh = sorted(set(model.out_indices) - found) if has_norms else []
    if fresh:
        logger.warning(
            "%s has no output norm for stage(s) %s (a RetinaNet checkpoint: FORK_LAST3 made norm0 an "
            "Identity); those norms keep their fresh init",
            source,
            ", ".join(map(str, fresh)),
        )


def _stage_at_least(key: str, num_stages: int) -> bool:
    match = re.match(r"stages\.(\d+)\.", key)
    return bool(match) and int(match.group(1)) >= num_stages


def load_weights(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a checkpoint file or hub-style folder of any layout in LAYOUTS into ``model`` after a strict
    key-and-shape check.

    A classifier of another size is not an error: it is re-initialised (and logged). For a
    ``MetaFormerFeatures`` backbone the checkpoint's head is ignored and its ``out_norms`` load from a
    dense checkpoint's output norms, or keep their fresh init. A transformers folder's config.json must
    agree with the model on what the shapes cannot show (mixer, pool size, activation).
    """
    state, metadata = read_checkpoint(path)
    layout = detect_layout(state, metadata)
    folder_config = read_folder_config(path)
    if layout == "transformers" and is_transformers_config(folder_config):
        check_transformers_config(folder_config, model, path)  # type: ignore[arg-type]
    return _load_into(model, to_ours(state, layout), layout, str(path))


def load_pretrained(model: nn.Module, name: str) -> Any:
    """Download (cached) the released weights for ``name`` (a model name or a tag) and load them.

    Returns the ``LoadReport``. Logs a warning when the record has no sha256, since the file then
    could not be verified.
    """
    record = get_weights(name)
    path = download_weights(record.tag)
    if record.sha256 is None:
        logger.warning(
            "weights %s are unverified: no sha256 was published for %s, so the file was not checked",
            record.tag,
            record.url,
        )
    return load_weights(model, path)


__all__ = [
    "LoadReport",
    "compare_state_dict",
    "load_pretrained",
    "load_weights",
    "matching_models",
]
