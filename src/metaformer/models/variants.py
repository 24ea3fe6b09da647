"""The model table: every named variant is one row. The only place a depth or width is written."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any

from metaformer.errors import ConfigError, UnknownModelError, close_matches_hint


@dataclass(frozen=True)
class MetaFormerConfig:
    """Architecture of one MetaFormer; fields are ``MetaFormer`` keyword arguments (JSON-friendly)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    mixers: tuple[str, ...] = ("pooling",) * 4
    mixer_kwargs: tuple[dict[str, Any], ...] = ({},) * 4
    norms: tuple[str, ...] = ("groupnorm1",) * 4
    stem_norm: str | None = None
    downsample_norm: str | None = None
    act: str = "gelu"
    mlp_ratio: float = 4.0
    mlp_bias: bool = True
    layer_scale_init: float | None = 1e-5
    res_scale_init: tuple[float | None, ...] = (None,) * 4
    pos_embed: tuple[bool, ...] = (False,) * 4
    final_norm: str = "map"
    head: str = "linear"


@dataclass(frozen=True)
class Variant:
    """A named config plus what the papers report for it (used by tables, tests and training defaults)."""

    config: MetaFormerConfig
    family: str
    drop_path_rate: float  # the paper's ImageNet training rate
    paper_top1: float | None = None
    paper_params_m: float | None = None
    paper_gmacs: float | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


_SIZES = {
    "s12": ((2, 2, 6, 2), (64, 128, 320, 512)),
    "s24": ((4, 4, 12, 4), (64, 128, 320, 512)),
    "s36": ((6, 6, 18, 6), (64, 128, 320, 512)),
    "m36": ((6, 6, 18, 6), (96, 192, 384, 768)),
    "m48": ((8, 8, 24, 8), (96, 192, 384, 768)),
}
_BASELINE_SIZES = {
    "s18": ((3, 3, 9, 3), (64, 128, 320, 512)),
    "s36": ((3, 12, 18, 3), (64, 128, 320, 512)),
    "m36": ((3, 12, 18, 3), (96, 192, 384, 576)),
    "b36": ((3, 12, 18, 3), (128, 256, 512, 768)),
}
_DROP_PATH = {"s12": 0.1, "s24": 0.1, "s36": 0.2, "m36": 0.3, "m48": 0.4}

# PoolFormer v1 (PAPER.md 2.1): GroupNorm-1 eps 1e-5, GELU MLP with biases, LayerScale, official head.
_V1 = MetaFormerConfig(depths=(), dims=())
# MetaFormer baselines (PAPER.md 8.1): bias-free norms eps 1e-6, StarReLU, ResScale in stages 3-4.
_BASELINE = MetaFormerConfig(
    depths=(),
    dims=(),
    norms=("groupnorm1_nobias",) * 4,
    stem_norm="layernorm_nobias",
    downsample_norm="layernorm_nobias",
    act="starrelu",
    mlp_bias=False,
    layer_scale_init=None,
    res_scale_init=(None, None, 1.0, 1.0),
    final_norm="pooled",
)

VARIANTS: dict[str, Variant] = {}


def _add(name: str, variant: Variant) -> None:
    if name in VARIANTS:
        raise ValueError(f"model name '{name}' is registered twice")
    VARIANTS[name] = variant


_V1_RESULTS = {  # size: (top-1, params M, GMACs) from PAPER.md 2.1
    "s12": (77.2, 11.9, 1.8), "s24": (80.3, 21.4, 3.4), "s36": (81.4, 30.8, 5.0),
    "m36": (82.1, 56.1, 8.8), "m48": (82.5, 73.4, 11.6),
}  # fmt: skip
_V2_RESULTS = {
    "s12": (78.0, 11.9, 1.8), "s24": (80.7, 21.3, 3.4), "s36": (81.6, 30.8, 5.0),
    "m36": (82.2, 56.1, 8.8), "m48": (82.6, 73.3, 11.5),
}  # fmt: skip
_ID_TOP1 = {"s12": 74.6, "s24": 78.2, "s36": 79.3, "m36": 80.0, "m48": 80.4}
_RAND_RESULTS = {  # top-1, GMACs, frozen params (M)
    "s12": (76.6, 1.9, 0.2),
    "s24": (78.2, 3.5, 0.5),
    "s36": (79.5, 5.2, 0.7),
    "m36": (81.2, 9.0, 0.7),
    "m48": (81.4, 11.9, 0.9),
}

for _size, (_depths, _dims) in _SIZES.items():
    _top1, _params, _macs = _V1_RESULTS[_size]
    _add(
        f"poolformer_{_size}",
        Variant(
            replace(
                _V1, depths=_depths, dims=_dims, layer_scale_init=1e-5 if _size in ("s12", "s24") else 1e-6
            ),
            "poolformer",
            _DROP_PATH[_size],
            _top1,
            _params,
            _macs,
        ),
    )
    _top1, _params, _macs = _V2_RESULTS[_size]
    _base = replace(_BASELINE, depths=_depths, dims=_dims)
    _add(f"poolformerv2_{_size}", Variant(_base, "poolformerv2", _DROP_PATH[_size], _top1, _params, _macs))
    _add(
        f"identityformer_{_size}",
        Variant(replace(_base, mixers=("identity",) * 4), "identityformer", _DROP_PATH[_size],
                _ID_TOP1[_size], _params, _macs),
    )  # fmt: skip
    _top1, _macs, _frozen = _RAND_RESULTS[_size]  # the paper counts the frozen matrices separately
    _add(
        f"randformer_{_size}",
        Variant(
            replace(_base, mixers=("identity", "identity", "random", "random")),
            "randformer",
            0.3 if _size == "m48" else _DROP_PATH[_size],
            _top1,
            round(_V2_RESULTS[_size][1] + _frozen, 1),
            _macs,
            note="frozen random token-mixing matrices fix the input size (224 by default; set img_size)",
        ),
    )

_CONV_RESULTS = {
    "s18": (83.0, 27, 3.9),
    "s36": (84.1, 40, 7.6),
    "m36": (84.5, 57, 12.8),
    "b36": (84.8, 100, 22.6),
}
_CA_RESULTS = {
    "s18": (83.6, 26, 4.1),
    "s36": (84.5, 39, 8.0),
    "m36": (85.2, 56, 13.2),
    "b36": (85.5, 99, 23.2),
}
_CONV_DROP = {"s18": 0.2, "s36": 0.3, "m36": 0.4, "b36": 0.6}
_CA_DROP = {"s18": 0.15, "s36": 0.3, "m36": 0.4, "b36": 0.6}
_CA_HEAD_DROP = {"s18": 0.0, "s36": 0.4, "m36": 0.4, "b36": 0.5}

for _size, (_depths, _dims) in _BASELINE_SIZES.items():
    _conv = replace(_BASELINE, depths=_depths, dims=_dims, mixers=("sepconv",) * 4,
                    norms=("layernorm_nobias",) * 4, head="mlp")  # fmt: skip
    _top1, _params, _macs = _CONV_RESULTS[_size]
    _add(f"convformer_{_size}", Variant(_conv, "convformer", _CONV_DROP[_size], _top1, _params, _macs))
    _top1, _params, _macs = _CA_RESULTS[_size]
    _add(
        f"caformer_{_size}",
        Variant(
            replace(_conv, mixers=("sepconv", "sepconv", "attention", "attention")),
            "caformer",
            _CA_DROP[_size],
            _top1,
            _params,
            _macs,
            train_overrides={"head_dropout": _CA_HEAD_DROP[_size]},
        ),
    )

# PoolFormer paper ablations (PAPER.md 7.1): S12 trunk with other mixers in some stages. Attention hybrids
# use channel LayerNorm (eps 1e-5), attention with an output-projection bias, and a zero-initialised
# position embedding before the first attention stage.
_S12_DEPTHS, _S12_DIMS = _SIZES["s12"]
_S12 = replace(_V1, depths=_S12_DEPTHS, dims=_S12_DIMS)
_ATTN = {"proj_bias": True}
_ABLATIONS = {
    "metaformer_id_s12": (replace(_S12, mixers=("identity",) * 4), 74.3, 11.9, 1.8),
    "metaformer_pppa_s12_224": (
        replace(_S12, mixers=("pooling",) * 3 + ("attention",), mixer_kwargs=({}, {}, {}, _ATTN),
                norms=("layernorm",) * 4, pos_embed=(False, False, False, True)),
        78.3, 14.0, 1.9,
    ),
    "metaformer_ppaa_s12_224": (
        replace(_S12, mixers=("pooling",) * 2 + ("attention",) * 2, mixer_kwargs=({}, {}, _ATTN, _ATTN),
                norms=("layernorm",) * 4, pos_embed=(False, False, True, False)),
        81.0, 16.5, 2.5,
    ),
    "metaformer_pppf_s12_224": (replace(_S12, mixers=("pooling",) * 3 + ("spatial_mlp",)), 77.5, 11.9, 1.8),
    "metaformer_ppff_s12_224": (
        replace(_S12, mixers=("pooling",) * 2 + ("spatial_mlp",) * 2), 77.9, 12.2, 1.9,
    ),
}  # fmt: skip
for _name, (_config, _top1, _params, _macs) in _ABLATIONS.items():
    _add(_name, Variant(_config, "ablation", 0.1, _top1, _params, _macs))


# Keyword arguments of MetaFormer that create_model accepts as overrides beyond the config fields.
_EXTRA_OVERRIDES = ("head_dropout", "drop_rate", "img_size", "residual")


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UnknownModelError(
            f"unknown model '{name}'{close_matches_hint(name, VARIANTS)} (`metaformer models` lists them all)"
        )
    return VARIANTS[name]


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The full MetaFormer keyword arguments of a named variant with overrides applied and checked."""
    config = get_variant(name).config
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(MetaFormerConfig)}
    valid = set(kwargs) | set(_EXTRA_OVERRIDES) | {"num_classes", "in_chans", "drop_path_rate"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(
            f"unknown model option(s) {', '.join(unknown)} for '{name}'; "
            f"valid options are {', '.join(sorted(valid))}"
        )
    kwargs.update(overrides)
    return kwargs
