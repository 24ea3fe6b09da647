import pytest
import torch
from torch import nn

from metaformer import ConfigError, create_model, register_mixer
from metaformer.models import MIXERS
from metaformer.models.mixers import Attention, DepthwiseConv, Pooling, SepConv


@pytest.mark.parametrize("name", ["identity", "pooling", "sepconv", "dwconv"])
def test_map_mixers_keep_the_shape(name):
    mixer = MIXERS[name](16)
    assert mixer(torch.randn(2, 16, 9, 13)).shape == (2, 16, 9, 13)


@pytest.mark.parametrize("name", ["random", "spatial_mlp"])
def test_grid_mixers_keep_the_shape(name):
    mixer = MIXERS[name](16, grid_size=(5, 7))
    assert mixer(torch.randn(2, 16, 5, 7)).shape == (2, 16, 5, 7)


def test_attention_keeps_token_shape():
    assert Attention(64)(torch.randn(2, 10, 64)).shape == (2, 10, 64)
    assert Attention.wants_tokens and not Pooling.wants_tokens


def test_pooling_mixer_maps_constant_input_to_zero():
    # padding is not counted, so even the borders average to the constant itself
    out = Pooling(4)(torch.full((1, 4, 6, 5), 3.7))
    torch.testing.assert_close(out, torch.zeros_like(out))


def test_pooling_corner_divides_by_in_image_count():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 4.0
    out = Pooling(1)(x)
    assert out[0, 0, 0, 0].item() == pytest.approx(4.0 / 4 - 4.0)  # 2x2 in-image neighbours at a corner
    assert out[0, 0, 1, 1].item() == pytest.approx(4.0 / 9)


@pytest.mark.parametrize("pool_size", [3, 5, 7, 9])
def test_pool_size_is_a_parameter(pool_size):
    model = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64),
                         mixer_kwargs={"pool_size": pool_size})  # fmt: skip
    assert model.stages[0].blocks[0].token_mixer.pool.kernel_size == pool_size


def test_sepconv_has_the_convformer_parameter_count():
    c = 64  # 2C^2 + 2 + 98C + 2C^2 (PAPER.md 8.7)
    assert sum(p.numel() for p in SepConv(c).parameters()) == 4 * c * c + 2 + 98 * c


def test_dwconv_is_a_plain_depthwise_3x3_conv_with_bias():
    mixer = DepthwiseConv(6)
    assert MIXERS["dwconv"] is DepthwiseConv and not DepthwiseConv.wants_tokens
    assert sum(p.numel() for p in mixer.parameters()) == 6 * 9 + 6  # k*k per channel plus one bias each
    x = torch.randn(1, 6, 5, 7)
    expected = torch.nn.functional.conv2d(x, mixer.conv.weight, mixer.conv.bias, padding=1, groups=6)
    torch.testing.assert_close(mixer(x), expected)
    x2 = x.clone()
    x2[:, 2] += 1.0  # depthwise: changing channel 2 changes only output channel 2
    changed = (mixer(x2) - mixer(x)).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.tolist() == [False, False, True, False, False, False]


def test_dwconv_builds_by_name_in_a_model():
    model = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), mixers="dwconv")
    assert isinstance(model.stages[3].blocks[0].token_mixer, DepthwiseConv)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


class ShiftMixer(nn.Module):
    """A user's mixer: rolls the map by one pixel."""

    wants_tokens = False
    fixed_grid = False

    def __init__(self, dim, **kwargs):
        super().__init__()

    def forward(self, x):
        return torch.roll(x, 1, dims=-1) - x


def test_a_registered_user_mixer_builds_by_name_and_by_class():
    register_mixer("test_shift", ShiftMixer)
    by_name = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), mixers="test_shift")
    by_class = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), mixers=ShiftMixer)
    for model in (by_name, by_class):
        assert isinstance(model.stages[0].blocks[0].token_mixer, ShiftMixer)
    with pytest.raises(ConfigError, match="already registered"):
        register_mixer("pooling", ShiftMixer)
