"""One MetaFormer class for every variant: stem, four stages of blocks, head.

A block is ``x = x + TokenMixer(Norm(x))`` then ``x = x + ChannelMLP(Norm(x))`` (plus LayerScale,
ResScale and stochastic depth where a variant uses them). PoolFormer, PoolFormerV2, ConvFormer,
CAFormer, IdentityFormer and RandFormer are rows of ``variants.VARIANTS``, not classes.
Parameter names follow timm's ``metaformer.py``, so timm checkpoints load as they are.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from metaformer.errors import ConfigError, InputSizeError
from metaformer.models.features import FeatureInfo, check_out_indices, take_indices
from metaformer.models.heads import FINAL_NORMS, HEADS, ClassifierHead, check_global_pool
from metaformer.models.kernels import (
    COMPILED_OPS,
    fx_tracing,
    native_available,
    pool_mix_train,
    pool_mix_train_supported,
    portable,
)
from metaformer.models.kernels.triton_pool import pool_mix_triton, triton_supported
from metaformer.models.layers import (
    ACTIVATIONS,
    DropPath,
    GroupNorm1,
    Mlp,
    NoShortcut,
    Scale,
    make_activation,
    make_norm,
)
from metaformer.models.mixers import Pooling, resolve_mixer
from metaformer.models.routes import bucket, choose, step_probe

MIN_INPUT_SIZE = 32


def _per_stage(value: Any, num_stages: int, name: str) -> tuple:
    """Broadcast a scalar option to every stage, or check a per-stage sequence's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ConfigError(f"{name} has {len(value)} entries but the model has {num_stages} stages")
        return tuple(value)
    return (value,) * num_stages


def stage_grid_sizes(img_size: tuple[int, int], num_stages: int = 4) -> list[tuple[int, int]]:
    """Token grid of each stage: stem 7x7/s4/p2, then 3x3/s2/p1 downsampling (exact for any size)."""
    h, w = img_size
    h, w = (h - 3) // 4 + 1, (w - 3) // 4 + 1
    sizes = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        sizes.append((h, w))
    return sizes


class Stem(nn.Module):
    """Patch embedding: Conv 7x7 stride 4 padding 2, then an optional norm (baselines only)."""

    def __init__(self, in_chans: int, dim: int, norm: str | None):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=2)
        self.norm = make_norm(norm, dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Downsampling(nn.Module):
    """Between stages: an optional norm (baselines only), then Conv 3x3 stride 2 padding 1."""

    def __init__(self, in_dim: int, out_dim: int, norm: str | None):
        super().__init__()
        self.norm = make_norm(norm, in_dim) if norm else nn.Identity()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


def _optional_scale(dim: int, init_value: float | None, tokens: bool) -> nn.Module:
    return Scale(dim, init_value, tokens=tokens) if init_value is not None else nn.Identity()


class MetaFormerBlock(nn.Module):
    """x = rs1(x) + ls1(drop(mixer(norm1(x)))); x = rs2(x) + ls2(drop(mlp(norm2(x)))).

    ``residual=False`` drops both shortcuts and ``mlp_ratio=0`` the second half: two rows of the
    PoolFormer paper's Table 5 ablations."""

    def __init__(
        self,
        dim: int,
        mixer: type[nn.Module],
        mixer_kwargs: dict[str, Any],
        norm: str | Callable[[int], nn.Module],
        act: str | Callable[[], nn.Module],
        mlp_ratio: float,
        mlp_bias: bool,
        drop_rate: float,
        drop_path: float,
        layer_scale_init: float | None,
        res_scale_init: float | None,
        tokens: bool,
        residual: bool = True,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, dim, tokens=tokens)
        self.token_mixer = mixer(dim, **mixer_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale1 = _optional_scale(dim, layer_scale_init, tokens)
        self.res_scale1 = _optional_scale(dim, res_scale_init, tokens) if residual else NoShortcut()
        self.channel_mlp = mlp_ratio > 0  # mlp_ratio 0: Table 5 "channel MLP -> none", the mixer half alone
        if self.channel_mlp:
            self.norm2 = make_norm(norm, dim, tokens=tokens)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, bias=mlp_bias, drop=drop_rate, tokens=tokens)
            self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
            self.layer_scale2 = _optional_scale(dim, layer_scale_init, tokens)
            self.res_scale2 = _optional_scale(dim, res_scale_init, tokens) if residual else NoShortcut()

    def _native_pool_radius(self) -> int | None:
        """The pooling window's radius when the mixer half can run as one native kernel (a PoolFormer
        block: GroupNorm with one group, pooling, optional layer scale and stochastic depth), else
        None. Checked per call: a swapped-in module or a hook on one of the parts means torch ops."""
        mixer, norm = self.token_mixer, self.norm1
        plain_norm = type(norm) in (nn.GroupNorm, GroupNorm1) and norm.num_groups == 1
        if type(mixer) is not Pooling or not plain_norm or not isinstance(self.res_scale1, nn.Identity):
            return None
        parts = (norm, mixer, mixer.pool, self.layer_scale1, self.drop_path1)
        if any(p._forward_hooks or p._forward_pre_hooks or p._backward_hooks for p in parts):
            return None
        return mixer.pool.padding

    def _pool_half_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k = gn.weight * ls`` and stochastic depth's per-sample factor, drawn as DropPath draws it."""
        k = self.norm1.weight if self.norm1.weight is not None else x.new_ones(x.shape[1])
        if isinstance(self.layer_scale1, Scale):
            k = k * self.layer_scale1.scale
        multiplier = None
        drop = self.drop_path1
        if isinstance(drop, DropPath) and drop.training and drop.drop_prob > 0:
            keep = 1.0 - drop.drop_prob
            multiplier = x.new_empty((x.shape[0], 1, 1, 1), dtype=torch.float32).bernoulli_(keep).div_(keep)
        return k, multiplier

    def _pool_half_triton(self, x: torch.Tensor, radius: int) -> torch.Tensor:
        """The same in Triton kernels (``kernels.triton_pool``, opt-in on CUDA)."""
        k, multiplier = self._pool_half_factors(x)
        return pool_mix_triton(
            x, k, radius=radius, eps=self.norm1.eps, bias=self.norm1.bias, multiplier=multiplier
        )

    def _pool_half_native(self, x: torch.Tensor, radius: int) -> torch.Tensor:
        """``x + ls * drop(pool(gn(x)) - gn(x))`` in one kernel each way; the same values and gradients."""
        k, multiplier = self._pool_half_factors(x)
        return pool_mix_train(
            x.float(), k.float(), radius=radius, eps=self.norm1.eps,
            bias=self.norm1.bias, multiplier=multiplier,
        )  # fmt: skip

    def _pool_half_torch(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.token_mixer(self.norm1(x))))

    def _pool_half_route(self, x: torch.Tensor, radius: int) -> str:
        """Native kernel or torch ops for this shape, measured on it (``models.routes``)."""
        b, c, h, w = x.shape
        mode = "train" if torch.is_grad_enabled() else "eval"
        shape_class = f"{x.dtype}-{mode}-b{bucket(b)}-c{c}-hw{bucket(h * w)}-r{radius}"
        candidates = {
            "torch": step_probe(self._pool_half_torch, x),
            "native": step_probe(lambda t: self._pool_half_native(t, radius), x),
        }
        return choose("train_pool_mix", shape_class, candidates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            x = self._pool_half_torch(x)
        else:
            x = self._pool_half(x)
        if not self.channel_mlp:
            return x
        return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))

    def _pool_half(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer half through a kernel where one takes this input; torch ops while FX tracing, where
        the input is a proxy that no routing check may inspect."""
        if fx_tracing():
            return self._pool_half_torch(x)
        native_ops = COMPILED_OPS[0]  # compiling: the native kernels as custom ops (they beat Inductor's)
        if native_ops is not None and native_ops.takes(x):
            radius = self._native_pool_radius()
            if radius is not None:
                k, multiplier = self._pool_half_factors(x)
                return native_ops.pool_mix_train(
                    x, k, radius=radius, eps=self.norm1.eps, bias=self.norm1.bias, multiplier=multiplier
                )
        use_triton = triton_supported(x)
        radius = self._native_pool_radius() if use_triton or _native_ok(x) else None
        if radius is not None and use_triton:
            return self._pool_half_triton(x, radius)
        if radius is not None and self._pool_half_route(x, radius) == "native":
            return self._pool_half_native(x, radius)
        return self._pool_half_torch(x)


def add_pos_embed(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x + pos``, the embedding resized (bicubic) when the map's size differs from the one it was made
    for. A leaf for torch.fx (``torch.fx.wrap``): the size check runs on real tensors, not proxies."""
    if pos.shape[-2:] != x.shape[-2:]:
        pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
    return x + pos


torch.fx.wrap("add_pos_embed")


def _native_ok(x: torch.Tensor) -> bool:
    """CPU fp32 channels-last maps in eager mode (bf16 ones under autocast, where the norm runs in fp32)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and native_available()
    return pool_mix_train_supported(x)


class MetaFormerStage(nn.Module):
    """Optional downsampling, optional position embedding, then blocks of one mixer type.

    Token-layout mixers (``wants_tokens``) get (B, N, C) sequences: the stage flattens once before
    its blocks and restores the map after them, never per block.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        mixer: str | type[nn.Module],
        mixer_kwargs: dict[str, Any],
        grid_size: tuple[int, int],
        downsample_norm: str | None,
        drop_path_rates: Sequence[float],
        pos_embed: bool = False,
        downsample: bool = True,
        **block_kwargs: Any,
    ):
        super().__init__()
        mixer_cls = resolve_mixer(mixer)
        self.tokens = bool(getattr(mixer_cls, "wants_tokens", False))
        self.grid_size = grid_size
        kwargs = dict(mixer_kwargs)
        self.fixed_grid = bool(getattr(mixer_cls, "fixed_grid", False))
        if self.fixed_grid:
            kwargs.setdefault("grid_size", grid_size)
        # every stage after the first downsamples (by position, as timm does), even when widths are equal
        self.downsample = Downsampling(in_dim, dim, downsample_norm) if downsample else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid_size)) if pos_embed else None
        self.blocks = nn.Sequential(
            *[
                MetaFormerBlock(dim, mixer_cls, kwargs, drop_path=rate, tokens=self.tokens, **block_kwargs)
                for rate in drop_path_rates
            ]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.pos_embed is not None:
            x = add_pos_embed(x, self.pos_embed)
        b, c, h, w = x.shape
        if self.tokens:
            x = x.flatten(2).transpose(1, 2)
        checkpointed = False
        if not torch.jit.is_scripting():  # TorchScript cannot compile checkpoint()
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                for block in self.blocks:
                    x = checkpoint(block, x, use_reentrant=False)
                checkpointed = True
        if not checkpointed:
            x = self.blocks(x)
        if self.tokens:
            x = x.transpose(1, 2).reshape(b, c, h, w)
        return x


class MetaFormer(nn.Module):
    """The MetaFormer backbone and classifier. Options that differ per stage take a 4-tuple or a scalar.

    Shapes: (B, in_chans, H, W) with H, W >= 32 -> logits (B, num_classes). Stage maps have strides
    4, 8, 16, 32 (``feature_info``).
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (64, 128, 320, 512),
        mixers: str | type[nn.Module] | Sequence[str | type[nn.Module]] = "pooling",
        mixer_kwargs: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        norms: str | Callable[[int], nn.Module] | Sequence[str | Callable[[int], nn.Module]] = "groupnorm1",
        stem_norm: str | None = None,
        downsample_norm: str | None = None,
        act: str | Callable[[], nn.Module] = "gelu",
        mlp_ratio: float = 4.0,
        mlp_bias: bool = True,
        layer_scale_init: float | None | Sequence[float | None] = 1e-5,
        res_scale_init: float | None | Sequence[float | None] = None,
        pos_embed: bool | Sequence[bool] = False,
        residual: bool = True,
        final_norm: str = "map",
        head: str = "linear",
        head_dropout: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | Sequence[int] = 224,
        global_pool: str = "avg",
    ):
        super().__init__()
        num_stages = len(depths)
        if num_stages == 0 or len(dims) != num_stages:
            raise ConfigError(
                f"depths ({len(depths)} entries) and dims ({len(dims)}) must have the same length > 0"
            )
        if any(d < 0 for d in depths) or any(c <= 0 for c in dims):
            raise ConfigError(
                f"depths must be >= 0 and dims > 0, got depths={tuple(depths)} dims={tuple(dims)}"
            )
        if final_norm not in FINAL_NORMS:
            raise ConfigError(f"final_norm must be one of {FINAL_NORMS}, got '{final_norm}'")
        if head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got '{head}'")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if num_classes < 0 or in_chans <= 0:
            raise ConfigError(f"num_classes must be >= 0 and in_chans > 0, got {num_classes} and {in_chans}")
        if isinstance(act, str) and act not in ACTIVATIONS:
            make_activation(act)  # raises the unknown-name error
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]  # pre-logits width, as timm names it
        self.depths = tuple(depths)
        self.dims = tuple(dims)

        mixers = _per_stage(mixers, num_stages, "mixers")
        stage_mixer_kwargs = _per_stage(mixer_kwargs or {}, num_stages, "mixer_kwargs")
        norms = _per_stage(norms, num_stages, "norms")
        layer_scales = _per_stage(layer_scale_init, num_stages, "layer_scale_init")
        res_scales = _per_stage(res_scale_init, num_stages, "res_scale_init")
        pos_embeds = _per_stage(pos_embed, num_stages, "pos_embed")
        total = sum(depths)
        rates = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]  # linspace(0, rate, total)
        grids = stage_grid_sizes(self.img_size, num_stages)

        self.stem = Stem(in_chans, dims[0], stem_norm)
        stages = []
        prev_dim, start = dims[0], 0
        for i in range(num_stages):
            stages.append(
                MetaFormerStage(
                    prev_dim,
                    dims[i],
                    depths[i],
                    mixers[i],
                    stage_mixer_kwargs[i],
                    grids[i],
                    downsample_norm,
                    rates[start : start + depths[i]],
                    pos_embed=pos_embeds[i],
                    downsample=i > 0,
                    norm=norms[i],
                    act=act,
                    mlp_ratio=mlp_ratio,
                    mlp_bias=mlp_bias,
                    drop_rate=drop_rate,
                    layer_scale_init=layer_scales[i],
                    res_scale_init=res_scales[i],
                    residual=residual,
                )
            )
            prev_dim, start = dims[i], start + depths[i]
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(
            dims[-1], num_classes, final_norm, head, head_dropout, drop_rate, global_pool
        )
        self.feature_info = [
            {"num_chs": dims[i], "reduction": 4 * 2**i, "module": f"stages.{i}"} for i in range(num_stages)
        ]
        self.pretrained_cfg = self.default_cfg = self.architecture_cfg()  # create_model adds preprocessing
        self.apply(_init_weights)

    def architecture_cfg(self) -> dict[str, Any]:
        """The keys of timm's ``pretrained_cfg`` that the architecture decides: input and pooled map
        sizes, the first conv's and the classifier's parameter names."""
        h, w = self.img_size
        return {
            "num_classes": self.num_classes,
            "input_size": (self.in_chans, h, w),
            "pool_size": stage_grid_sizes(self.img_size, len(self.stages))[-1],
            "fixed_input_size": any(stage.fixed_grid for stage in self.stages),
            "min_input_size": (self.in_chans, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
            "first_conv": "stem.conv",
            "classifier": "head.fc.fc2" if self.head.head_type == "mlp" else "head.fc",
        }

    # --- classification API (timm-compatible) ---
    def check_input(self, x: torch.Tensor) -> None:
        """Fail with a clear sentence, not a conv shape error, on inputs the model cannot take."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InputSizeError(
                f"expected a (B, {self.in_chans}, H, W) batch but got shape {tuple(x.shape)}; "
                "pass in_chans=... to create_model for other channel counts"
            )
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise InputSizeError(
                f"input {x.shape[-2]}x{x.shape[-1]} is too small; MetaFormer needs at least "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (resize or pad the images)"
            )
        fixed = [i for i, stage in enumerate(self.stages) if stage.fixed_grid]
        if fixed:
            grids = stage_grid_sizes(tuple(x.shape[-2:]), len(self.stages))
            if any(grids[i] != self.stages[i].grid_size for i in fixed):
                h, w = self.img_size
                raise InputSizeError(
                    f"this model takes {h}x{w} inputs only (its stage-{fixed[0] + 1} mixer owns a fixed "
                    f"{self.stages[fixed[0]].grid_size[0]}x{self.stages[fixed[0]].grid_size[1]} token grid) "
                    f"but got {x.shape[-2]}x{x.shape[-1]}; resize the images or build it with "
                    f"img_size=({x.shape[-2]}, {x.shape[-1]})"
                )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> last stage map (B, C4, H/32, W/32), before the final norm."""
        if not torch.jit.is_scripting():
            if not portable():  # a traced or compiled graph takes no Python checks on its input
                self.check_input(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's contract: the stage maps at ``indices`` (None: all; an int n: the last n; negative
        indices count from the end) and, unless ``intermediates_only``, the final map as
        ``forward_features`` gives it: ``(final, [maps])``. ``norm`` puts the head's final norm on the
        last stage's map; ``stop_early`` skips the stages after the last index asked for."""
        if output_fmt != "NCHW":
            raise ConfigError(f"output_fmt must be 'NCHW' (maps are channel-first), got {output_fmt!r}")
        taken, last = take_indices(len(self.stages), indices)
        if not torch.jit.is_scripting():
            if not portable():
                self.check_input(x)
        x = self.stem(x)
        stages = self.stages[: last + 1] if stop_early or intermediates_only else self.stages
        final_stage = len(self.stages) - 1
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in taken:
                intermediates.append(self.head.norm_map(x) if norm and i == final_stage else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` and (``prune_head``) the pooling and classifier,
        as timm does before wrapping ``forward_intermediates``; ``prune_norm`` drops the final norm too.
        Returns the stage indices taken."""
        taken, last = take_indices(len(self.stages), indices)
        self.stages = self.stages[: last + 1]
        if prune_norm:
            self.head.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (the final norm is kept); ``global_pool`` "avg" or ""
        (no pooling: the head returns the normalised map), None keeps the current one."""
        if global_pool is not None:
            self.head.global_pool = check_global_pool(global_pool)
        self.num_classes = self.head.num_classes = num_classes
        self.head.fc = self.head._make_fc(num_classes)
        self.head.fc.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass: less memory, about a third more compute."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Groups for timm's layer-wise lr decay: stem, one per block (per stage if coarse), head."""
        return _group_matcher(coarse)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters timm's optimizer factory leaves without weight decay."""
        return _no_weight_decay(self)


class MetaFormerFeatures(nn.Module):
    """The backbone without its head, returning stage maps (strides 4, 8, 16, 32) for dense tasks.

    ``out_norm`` adds one fresh norm per output, as the official detection/segmentation backbones do.
    Its parameter names (``stem.*``, ``stages.*``) equal the classifier's, so classification
    checkpoints load into it once their ``head.*`` keys are dropped.
    """

    def __init__(
        self, model: MetaFormer, out_indices: Sequence[int] = (0, 1, 2, 3), out_norm: str | None = None
    ):
        super().__init__()
        self.out_indices = check_out_indices(out_indices, len(model.stages))  # non-negative, as saved
        self.out_norm = out_norm  # recorded so saved weights can rebuild the wrapper
        self.stem = model.stem
        self.stages = model.stages[: max(self.out_indices) + 1]
        self.in_chans = model.in_chans
        self.img_size = model.img_size
        self.check_input = model.check_input
        self.feature_info = FeatureInfo([model.feature_info[i] for i in self.out_indices])
        self.pretrained_cfg = self.default_cfg = model.pretrained_cfg
        self.out_norms = nn.ModuleList(
            [
                make_norm(out_norm, info["num_chs"]) if out_norm else nn.Identity()
                for info in self.feature_info
            ]
        )

    @property
    def out_channels(self) -> list[int]:
        return self.feature_info.channels()

    @property
    def strides(self) -> list[int]:
        return self.feature_info.reduction()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.jit.is_scripting():
            if not portable():
                self.check_input(x)
        x = self.stem(x)
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outputs.append(self.out_norms[len(outputs)](x))
        return outputs

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Groups for timm's layer-wise lr decay: stem, one per block (per stage if coarse), head."""
        return _group_matcher(coarse)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters timm's optimizer factory leaves without weight decay."""
        return _no_weight_decay(self)


def _group_matcher(coarse: bool) -> dict[str, Any]:
    """timm's layer grouping (``timm.models._manipulate.group_with_matcher``) for a MetaFormer trunk.

    The stem comes first; then one group per block (``coarse``: per stage), each stage's downsampling
    and position embedding joining the group of the stage's first block (as timm's ConvNeXt does);
    whatever matches nothing (the head, a features wrapper's output norms) is last. Layer-wise lr
    decay (``create_optimizer_v2(model, layer_decay=...)``) scales the lr by these groups.
    """
    if coarse:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}
    return {
        "stem": r"^stem",
        "blocks": [
            (r"^stages\.(\d+)\.(?:downsample|pos_embed)", (0,)),
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
        ],
    }


def _no_weight_decay(module: nn.Module) -> set[str]:
    """Every parameter but a convolution's or linear layer's weight: norms, biases, layer/res scales,
    activation scales and position embeddings, so weight decay never pulls them towards zero."""
    decayed = {
        f"{name}.weight" if name else "weight"
        for name, m in module.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    return {name for name, _ in module.named_parameters() if name not in decayed}


def _init_weights(module: nn.Module) -> None:
    """timm's init: truncated normal (std 0.02) for every conv and linear weight, zero bias."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


__all__ = ["MetaFormer", "MetaFormerFeatures", "MetaFormerBlock", "MetaFormerStage"]
