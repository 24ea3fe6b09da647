"""Released weights as typed records, keyed by timm's tags ("poolformer_s12.sail_in1k").

Each record says where the file lives, how to check it (sha256, or None when no hash was ever
published: loading then warns "unverified"), and how the model was evaluated (preprocessing,
reported top-1), like torchvision's ``Weights`` and timm's ``PretrainedCfg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metaformer.errors import UnknownModelError, close_matches_hint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval preprocessing of a model without released weights (timm's keys): our recipe's centre crop 0.9.
DEFAULT_PREPROCESSING = {
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "crop_pct": 0.9,
    "crop_mode": "center",
    "interpolation": "bicubic",
}


@dataclass(frozen=True)
class PretrainedWeights:
    """One released checkpoint: location, integrity and the evaluation setup it was reported with."""

    tag: str
    url: str
    sha256: str | None = None  # None: no published hash, so the file is not verified
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    top1: float | None = None  # reported ImageNet-1K top-1 (%) at input_size
    num_params: int | None = None  # parameters of the model with this record's num_classes
    layout: str = "official"  # key layout of the file: "official" (v1) or "official_baselines"

    @property
    def model_name(self) -> str:
        return self.tag.split(".", 1)[0]

    @property
    def filename(self) -> str:
        """Name of the file in the download cache (the URL's last component)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def preprocessing(self) -> dict[str, Any]:
        """Eval preprocessing in timm's data-config keys (for timm.data.create_transform)."""
        return {
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }


PRETRAINED: dict[str, PretrainedWeights] = {}
DEFAULT_TAGS: dict[str, str] = {}  # model name -> the tag `pretrained=True` loads


def _add(record: PretrainedWeights, default: bool = False) -> None:
    if record.tag in PRETRAINED:
        raise ValueError(f"weights tag '{record.tag}' is listed twice")
    PRETRAINED[record.tag] = record
    if default:
        DEFAULT_TAGS[record.model_name] = record.tag


_GITHUB = "https://github.com/sail-sg/poolformer/releases/download/v1.0/{}.pth.tar"
_HF = "https://huggingface.co/sail/dl/resolve/main/{}/{}.pth"

# PoolFormer v1 (PAPER.md 2.1, 3.1): exact parameter counts, reported top-1, eval crop 0.9 (S) / 0.95 (M).
for _size, _params, _top1 in (
    ("s12", 11_915_176, 77.2),
    ("s24", 21_388_968, 80.3),
    ("s36", 30_862_760, 81.4),
    ("m36", 56_172_520, 82.1),
    ("m48", 73_473_448, 82.5),
):
    _add(
        PretrainedWeights(
            f"poolformer_{_size}.sail_in1k",
            _GITHUB.format(f"poolformer_{_size}"),
            crop_pct=0.9 if _size.startswith("s") else 0.95,
            top1=_top1,
            num_params=_params,
        ),
        default=True,
    )

# PoolFormer paper ablations (PAPER.md 7.1, 3.1), same release. Parameter counts are the S12 trunk
# plus the hybrid mixers' weights and position embeddings (the paper rounds them to 14.0/16.5/11.9/12.2 M).
for _name, _crop, _params, _top1 in (
    ("metaformer_id_s12", 0.9, 11_915_176, 74.3),
    ("metaformer_pppa_s12_224", 0.95, 14_038_440, 78.3),
    ("metaformer_ppaa_s12_224", 0.95, 16_535_592, 81.0),
    ("metaformer_pppf_s12_224", 0.9, 11_919_978, 77.5),
    ("metaformer_ppff_s12_224", 0.95, 12_150_474, 77.9),
):
    _add(PretrainedWeights(f"{_name}.sail_in1k", _GITHUB.format(_name), crop_pct=_crop, top1=_top1,
                           num_params=_params), default=True)  # fmt: skip

# MetaFormer baselines (PAPER.md 2.2, 8.6): IdentityFormer, RandFormer, PoolFormerV2 at 224 only.
_V2_PARAMS = {"s12": 11_891_712, "s24": 21_341_464, "s36": 30_791_216, "m36": 56_077_168, "m48": 73_346_056}
_RAND_FROZEN = {"s12": 235_298, "s24": 470_596, "s36": 705_894, "m36": 705_894, "m48": 941_192}
_BASELINE_TOP1 = {
    "identityformer": {"s12": 74.6, "s24": 78.2, "s36": 79.3, "m36": 80.0, "m48": 80.4},
    "randformer": {"s12": 76.6, "s24": 78.2, "s36": 79.5, "m36": 81.2, "m48": 81.4},
    "poolformerv2": {"s12": 78.0, "s24": 80.7, "s36": 81.6, "m36": 82.2, "m48": 82.6},
}
for _family, _top1s in _BASELINE_TOP1.items():
    for _size, _top1 in _top1s.items():
        _params = _V2_PARAMS[_size] + (_RAND_FROZEN[_size] if _family == "randformer" else 0)
        _name = f"{_family}_{_size}"
        _add(
            PretrainedWeights(
                f"{_name}.sail_in1k",
                _HF.format(_family, _name),
                top1=_top1,
                num_params=_params,
                layout="official_baselines",
            ),
            default=True,
        )

# ConvFormer / CAFormer (PAPER.md 8.6): ImageNet-1K at 224 and 384, ImageNet-21K pre-trained then
# fine-tuned on 1K (224, 384), and the 21K (21,841 classes) checkpoints. Top-1: 224, 384, 21K->1K 224, 384.
_CONV_CA = {
    "convformer_s18": (26_774_448, 512, (83.0, 84.4, 83.7, 85.0)),
    "convformer_s36": (40_012_152, 512, (84.1, 85.4, 85.4, 86.4)),
    "convformer_m36": (57_051_640, 576, (84.5, 85.6, 86.1, 86.9)),
    "convformer_b36": (99_882_616, 768, (84.8, 85.7, 87.0, 87.6)),
    "caformer_s18": (26_341_656, 512, (83.6, 85.0, 84.1, 85.4)),
    "caformer_s36": (39_297_102, 512, (84.5, 85.7, 85.8, 86.9)),
    "caformer_m36": (56_204_878, 576, (85.2, 86.2, 86.6, 87.5)),
    "caformer_b36": (98_753_614, 768, (85.5, 86.4, 87.4, 88.1)),
}
for _name, (_params, _dim, (_t224, _t384, _t21_224, _t21_384)) in _CONV_CA.items():
    _family = _name.split("_")[0]
    _params_21k = _params + (21_841 - 1000) * (4 * _dim + 1)  # the MLP head's fc2 grows to 21,841 rows
    _big = (3, 384, 384)
    for _suffix, _file, _size, _top1, _classes in (
        ("sail_in1k", _name, (3, 224, 224), _t224, 1000),
        ("sail_in1k_384", f"{_name}_384", _big, _t384, 1000),
        ("sail_in22k_ft_in1k", f"{_name}_in21ft1k", (3, 224, 224), _t21_224, 1000),
        ("sail_in22k_ft_in1k_384", f"{_name}_384_in21ft1k", _big, _t21_384, 1000),
        ("sail_in22k", f"{_name}_in21k", (3, 224, 224), None, 21_841),
    ):
        _add(
            PretrainedWeights(
                f"{_name}.{_suffix}",
                _HF.format(_family, _file),
                num_classes=_classes,
                input_size=_size,
                top1=_top1,
                num_params=_params if _classes == 1000 else _params_21k,
                layout="official_baselines",
            ),
            default=_suffix == "sail_in1k",
        )


def resolve_tag(name_or_tag: str) -> str:
    """A weights tag for a model name (its default tag) or a tag; UnknownModelError with close matches."""
    if name_or_tag in PRETRAINED:
        return name_or_tag
    if name_or_tag in DEFAULT_TAGS:
        return DEFAULT_TAGS[name_or_tag]
    hint = close_matches_hint(name_or_tag, list(DEFAULT_TAGS) + list(PRETRAINED))
    raise UnknownModelError(
        f"no released weights named '{name_or_tag}'{hint} (`metaformer models` lists the models; "
        "for your own weights pass checkpoint_path=...)"
    )


def get_weights(name_or_tag: str) -> PretrainedWeights:
    """The record for a model name (its default weights) or a tag such as 'caformer_s18.sail_in1k_384'."""
    return PRETRAINED[resolve_tag(name_or_tag)]
