"""The model as a researcher rerunning the paper checks it: parameter counts of every switch
worked out from Figure 5 by hand, the whole network recomputed from the paper with functional
ops, the ablation switches acting where the paper puts them, output strides, Keras' 'same'
padding on odd and non-square inputs, and the config's checks and round trips."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import keras_predict, save_keras_h5, trained_like

import xception
from xception.layers import SeparableConv2d
from xception.model import Xception, XceptionConfig

PAPER = 22_855_952

# A small network with the paper's topology whose widths all divide by 8 (so segments 2, 4 and
# 8 fit every conv), for the checks that do not need the full model.
SMALL = dict(stem_channels=(8, 16), entry_channels=(16, 24, 32), exit_channels=40,
             head_channels=(48, 64), middle_blocks=2, num_classes=5)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Parameter counts from first principles
# ---------------------------------------------------------------------------------------------
def _sep(cin: int, cout: int, order: str = "depthwise_first", segments="depthwise") -> int:
    """A separable conv and its batch norm: the 3x3 spatial conv runs on cin channels
    (depthwise first) or cout (pointwise first) in `segments` groups; the 1x1 conv is
    cin x cout; no biases; the BN has gamma and beta."""
    s = cin if order == "depthwise_first" else cout
    k = s if segments == "depthwise" else segments
    return 9 * s * (s // k) + cin * cout + 2 * cout


def _by_hand(stem=(32, 64), entry=(128, 256, 728), exit_=1024, head=(1536, 2048), middle=8,
             classes=1000, in_chans=3, residual=True, fc=(), **sep) -> int:  # fmt: skip
    """Figure 5's trainable parameters, counted layer by layer."""
    c1, c2 = stem
    e1, e2, e3 = entry
    h1, h2 = head
    total = 9 * in_chans * c1 + 2 * c1 + 9 * c1 * c2 + 2 * c2  # the two stem convs + BN
    shortcut = lambda cin, cout: (cin * cout + 2 * cout) if residual else 0  # noqa: E731
    cin = c2
    for e in (e1, e2, e3):  # entry flow: two separable convs, max pool, 1x1/2 shortcut
        total += _sep(cin, e, **sep) + _sep(e, e, **sep) + shortcut(cin, e)
        cin = e
    total += middle * 3 * _sep(e3, e3, **sep)  # middle flow: identity shortcut, no weights
    total += _sep(e3, e3, **sep) + _sep(e3, exit_, **sep) + shortcut(e3, exit_)  # exit block
    total += _sep(exit_, h1, **sep) + _sep(h1, h2, **sep)  # last module: no shortcut
    width = h2
    for units in (*fc, classes):  # hidden Dense layers and the logistic regression layer
        if units:
            total += width * units + units
            width = units
    return total


def _trainable_on_meta(**overrides) -> int:
    with torch.device("meta"):
        model = Xception(**overrides)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (dict(), PAPER),
        # The paper's ablations of Figures 9 and 10: no residuals, an activation between the
        # two halves of the separable convs (no weights), the other order of the halves.
        (dict(residual=False), _by_hand(residual=False)),
        (dict(mid_activation="elu"), PAPER),
        (dict(mid_activation="relu"), PAPER),
        (dict(order="pointwise_first"), _by_hand(order="pointwise_first")),
        # Inception-like segments between regular convs (1) and depthwise (one per channel).
        (dict(segments=1), _by_hand(segments=1)),
        (dict(segments=8, order="pointwise_first"),
         _by_hand(segments=8, order="pointwise_first")),
        # The JFT runs' two 4096-unit FC layers, a grey input, no classifier, depth.
        (dict(fc_layers=(4096, 4096)), _by_hand(fc=(4096, 4096))),
        (dict(in_chans=1), _by_hand(in_chans=1)),
        (dict(num_classes=0), _by_hand(classes=0)),
        (dict(middle_blocks=0), _by_hand(middle=0)),
        (dict(middle_blocks=12), _by_hand(middle=12)),
        # width 0.5: each width halved and rounded to the nearest multiple of 8 (364 -> 368).
        (dict(width=0.5), _by_hand(stem=(16, 32), entry=(64, 128, 368), exit_=512,
                                   head=(768, 1024))),
    ],
)  # fmt: skip
def test_parameter_counts_of_every_switch_match_figure_5_by_hand(overrides, expected):
    assert _by_hand() == PAPER  # the hand count itself is the paper's number
    assert _trainable_on_meta(**overrides) == expected


def test_paper_model_has_keras_non_trainable_count_and_compact_preset_counts_by_hand():
    """Keras' summary of keras.applications.Xception: 22,855,952 trainable and 54,528
    non-trainable parameters (the batch norms' moving mean and variance)."""
    with torch.device("meta"):
        model = Xception()
        compact = xception.create_model("xception-compact", num_classes=10)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("_mean", "_var")))
    assert stats == 54_528
    expected = _by_hand(stem=(16, 32), entry=(48, 96, 192), exit_=256, head=(384, 512),
                        middle=3, classes=10)  # fmt: skip
    assert sum(p.numel() for p in compact.parameters()) == expected == 907_706


# ---------------------------------------------------------------------------------------------
# The whole network recomputed from the paper with functional ops
# ---------------------------------------------------------------------------------------------
def _tf_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's 'same': output ceil(n / stride), the padding's odd pixel after."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _reference_forward(model: Xception, x: torch.Tensor) -> torch.Tensor:
    """Figure 5 written out, reading only the model's weights by their documented names."""
    cfg = model.config
    sd = model.state_dict()
    act = {None: lambda t: t, "relu": F.relu, "elu": F.elu}[cfg.mid_activation]

    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"],
                            sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, cfg.bn_eps)  # fmt: skip

    def sep(t, p):
        ws, wp = sd[f"{p}.spatial.weight"], sd[f"{p}.pointwise.weight"]
        s = ws.shape[0]
        groups = s if cfg.segments == "depthwise" else cfg.segments
        spatial = lambda u: F.conv2d(u, ws, padding=1, groups=groups)  # noqa: E731
        pointwise = lambda u: F.conv2d(u, wp)  # noqa: E731
        if cfg.order == "depthwise_first":
            return pointwise(act(spatial(t)))
        return spatial(act(pointwise(t)))

    def pool(t):
        return F.max_pool2d(_tf_pad(t, 3, 2, float("-inf")), 3, 2)

    def shortcut(t, b):
        if not cfg.residual:
            return 0
        return bn(F.conv2d(t, sd[f"{b}.shortcut.conv.weight"], stride=2), f"{b}.shortcut.bn")

    # Entry flow: conv 32 3x3 (stride 2, valid) + BN + ReLU, conv 64 3x3 + BN + ReLU.
    s = cfg.stem_stride
    if cfg.stem_padding == "valid":
        t = F.conv2d(x, sd["block1.conv1.conv.weight"], stride=s)
    else:
        t = F.conv2d(_tf_pad(x, 3, s), sd["block1.conv1.conv.weight"], stride=s)
    t = F.relu(bn(t, "block1.conv1.bn"))
    t = F.relu(bn(F.conv2d(t, sd["block1.conv2.conv.weight"],
                           padding=0 if cfg.stem_padding == "valid" else 1), "block1.conv2.bn"))  # fmt: skip
    # Three modules: [ReLU] sep, BN, ReLU, sep, BN, max pool 3x3/2; + 1x1/2 conv + BN.
    for i, b in enumerate(("block2", "block3", "block4")):
        u = t if i == 0 else F.relu(t)  # block2 follows the stem's ReLU
        u = bn(sep(u, f"{b}.sepconv1"), f"{b}.sepconv1_bn")
        u = bn(sep(F.relu(u), f"{b}.sepconv2"), f"{b}.sepconv2_bn")
        t = pool(u) + shortcut(t, b)
    # Middle flow: ReLU, sep, BN three times; identity shortcut.
    for j in range(cfg.middle_blocks):
        b = f"block{5 + j}"
        u = t
        for k in (1, 2, 3):
            u = bn(sep(F.relu(u), f"{b}.sepconv{k}"), f"{b}.sepconv{k}_bn")
        t = u + t if cfg.residual else u
    # Exit flow: ReLU sep 728, ReLU sep 1024, max pool; 1x1/2 shortcut. Then sep 1536 + ReLU,
    # sep 2048 + ReLU, global average pooling, optional FC layers, logistic regression.
    b = f"block{5 + cfg.middle_blocks}"
    u = bn(sep(F.relu(t), f"{b}.sepconv1"), f"{b}.sepconv1_bn")
    u = bn(sep(F.relu(u), f"{b}.sepconv2"), f"{b}.sepconv2_bn")
    t = pool(u) + shortcut(t, b)
    b = f"block{6 + cfg.middle_blocks}"
    t = F.relu(bn(sep(t, f"{b}.sepconv1"), f"{b}.sepconv1_bn"))
    t = F.relu(bn(sep(t, f"{b}.sepconv2"), f"{b}.sepconv2_bn"))
    t = t.mean((2, 3))
    for i in range(len(cfg.fc_layers)):
        t = F.relu(F.linear(t, sd[f"fc_hidden.{2 * i}.weight"], sd[f"fc_hidden.{2 * i}.bias"]))
    return F.linear(t, sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize(
    "switches",
    [
        dict(),
        dict(residual=False),
        dict(mid_activation="relu"),
        dict(mid_activation="elu", order="pointwise_first"),
        dict(segments=4),
        dict(segments=1, order="pointwise_first", residual=False),
        dict(fc_layers=(12, 7), stem_stride=1, stem_padding="same"),
        dict(stem_padding="same", mid_activation="elu", segments=8),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "paper",
)
def test_every_switch_computes_what_the_paper_describes(switches):
    """The model equals Figure 5 recomputed by hand, for each ablation: the activation sits
    between the two convs of each separable conv and nowhere else, pointwise-first applies the
    1x1 first, k segments group the spatial conv's channels, residual=False drops exactly the
    shortcuts (projection and identity) and nothing else. A non-square input with odd and even
    maps exercises the asymmetric 'same' pools."""
    torch.manual_seed(3)
    model = trained_like(Xception(**SMALL, **switches))
    x = torch.randn(2, 3, 37, 44)
    with torch.no_grad():
        ours = model(x)
        ref = _reference_forward(model, x)
    assert ours.shape == (2, 5)
    scale = ref.abs().max()
    assert scale > 0.01
    assert (ours - ref).abs().max() < 1e-4 * scale
    # Sensitivity: the reference of another switch setting would differ.
    if switches.get("mid_activation"):
        plain = Xception(**SMALL, **{**switches, "mid_activation": None}).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert not torch.allclose(plain(x), ours, atol=1e-3)


@pytest.mark.parametrize("order", ["depthwise_first", "pointwise_first"])
def test_segments_group_the_spatial_conv_channels_inside_the_model(order):
    """k segments: changing the input of one group changes that group's spatial outputs and
    no other, for both orders (pointwise first: the groups are the 1x1 conv's outputs)."""
    model = Xception(**SMALL, segments=4, order=order).eval()
    sep = model.block4.sepconv2  # 32 -> 32 channels: groups of 8
    assert isinstance(sep, SeparableConv2d) and sep.spatial.groups == 4
    seen = {}
    sep.spatial.register_forward_hook(lambda m, i, o: seen.update(out=o))
    sep.spatial.register_forward_pre_hook(lambda m, i: seen.update(inp=i[0]))
    x = torch.randn(1, 32, 6, 7)
    with torch.no_grad():
        sep(x)
        base_in, base_out = seen["inp"].clone(), seen["out"].clone()
        if order == "depthwise_first":
            assert torch.equal(base_in, x)  # the spatial conv comes first
            changed = x.clone()
            changed[:, 8:16] = 0  # group 1 of the spatial conv's input
            sep(changed)
        else:  # the spatial conv's input is the 1x1 conv's output: change that
            assert torch.allclose(base_in, sep.pointwise(x))
            bumped = base_in.clone()
            bumped[:, 8:16] = 0
            sep.spatial(bumped)
    diff = (seen["out"] - base_out).abs().amax((0, 2, 3))
    assert (diff[8:16] > 0).all()
    assert (diff[:8] == 0).all() and (diff[16:] == 0).all()
    # segments=1 is a regular 3x3 conv over all channels; "depthwise" one filter per channel.
    assert Xception(**SMALL, segments=1).block5.sepconv1.spatial.weight.shape == (32, 32, 3, 3)
    assert Xception(**SMALL).block5.sepconv1.spatial.weight.shape == (32, 1, 3, 3)


def test_residual_false_removes_exactly_the_shortcuts_the_paper_removes():
    """Figure 9's non-residual model: no projection shortcut (blocks 2-4 and the exit block)
    and no identity addition (the middle flow); everything else, names and shapes, stays."""
    res = Xception(**SMALL)
    plain = Xception(**SMALL, residual=False)
    with_shortcut = [n for n in res.block_names if getattr(getattr(res, n), "shortcut", None)]
    assert with_shortcut == ["block2", "block3", "block4", "block7"]
    res_keys = set(res.state_dict())
    assert set(plain.state_dict()) == {k for k in res_keys if ".shortcut." not in k}
    assert not any(getattr(plain, n).residual for n in plain.block_names[1:])
    # The last module has no shortcut in either model (the paper: all modules but the first
    # and last), and the middle blocks' identity shortcuts have no weights to drop.
    assert res.block8.shortcut is None and not res.block8.residual


# ---------------------------------------------------------------------------------------------
# Output stride, feature maps and odd sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(71, 71), (72, 100), (301, 97)])
@pytest.mark.parametrize("compact", [False, True])
def test_output_stride_gives_the_sizes_its_strides_imply_on_odd_and_non_square_inputs(
    size, compact
):
    """With a 'same' stem every map is ceil(input / stride) on each axis, as feature_info's
    strides say; output_stride caps the stride and dilation keeps the size from there."""
    stem = dict(stem_padding="same", stem_stride=1 if compact else 2)
    for output_stride in (32, 16, 8):
        model = Xception(width=0.125, middle_blocks=1, num_classes=0, pooling=None,
                         output_stride=output_stride, **stem).eval()  # fmt: skip
        strides = [i["stride"] for i in model.feature_info]
        first = 1 if compact else 2
        assert strides == [min(first * 2**i, output_stride) for i in range(5)]
        with torch.no_grad():
            maps = model.feature_maps(torch.randn(1, 3, *size))
        assert [tuple(m.shape[-2:]) for m in maps] == [
            (math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in strides
        ]
        assert [m.shape[1] for m in maps] == [i["channels"] for i in model.feature_info]


def test_output_stride_8_keeps_the_exit_flow_on_the_stride_32_networks_grid():
    """With output_stride=8 the exit block's max pool ran undilated on the 4x denser map, so
    the exit features were not the stride-32 network's features sampled densely (the a-trous
    equivalence that holds for output_stride=16 and for the middle flow broke).

    71 px keeps every map odd, where 'same' windows are centred on the even pixels, so every
    4th row and column of the stride-8 map must be the stride-32 map exactly (it is for
    output_stride 16, every 2nd). Dilating the pool of a block whose stride was dropped by the
    block's own dilation (max pool 3x3, stride 1, dilation 2 here) makes it so."""
    cfg = XceptionConfig(width=0.125, middle_blocks=2, num_classes=0, pooling=None)
    torch.manual_seed(0)
    ref = trained_like(Xception(cfg))
    x = torch.randn(2, 3, 71, 71)
    with torch.no_grad():
        maps32 = ref.feature_maps(x)
        model = Xception(cfg.replace(output_stride=8)).eval()
        model.load_state_dict(ref.state_dict())
        maps8 = model.feature_maps(x)
    assert maps8[4].shape[-1] == 9 and maps32[4].shape[-1] == 3
    assert torch.allclose(maps8[3][..., ::2, ::2], maps32[3], atol=1e-5)  # holds today
    assert torch.allclose(maps8[4][..., ::4, ::4], maps32[4], atol=1e-5)


@pytest.fixture(scope="module")
def keras_any_size(tmp_path_factory):
    """keras.applications.Xception without its top for any input size (KERAS_BACKEND=torch,
    weights=None), with random batch-norm parameters and moving statistics of real
    activations, and the same weights in our model through a Keras HDF5 file."""
    import keras

    keras.utils.set_random_seed(0)
    kmodel = keras.applications.Xception(weights=None, include_top=False,
                                         input_shape=(None, None, 3), pooling=None)  # fmt: skip
    rng = np.random.default_rng(0)
    bns = [la for la in kmodel.layers if isinstance(la, keras.layers.BatchNormalization)]
    for layer in bns:
        gamma, beta, mean, var = layer.get_weights()
        n = gamma.shape
        layer.set_weights([rng.uniform(0.5, 1.5, n).astype("f4"),
                           rng.normal(0, 0.2, n).astype("f4"), mean, var])  # fmt: skip
        layer.momentum = 0.0
    kmodel(rng.uniform(-1, 1, (4, 96, 96, 3)).astype("f4"), training=True)
    for layer in bns:
        layer.momentum = 0.99
    path = tmp_path_factory.mktemp("keras") / "xception_notop.h5"
    save_keras_h5(kmodel, path)
    ours = xception.create_model("xception", weights=path, num_classes=0, pooling=None).eval()
    return kmodel, ours, path


@pytest.mark.parametrize("size", [(71, 71), (100, 73), (301, 300)])
def test_odd_and_non_square_inputs_match_keras_same_padding(keras_any_size, size):
    """Keras' minimum 71, a non-square input whose maps are odd on one axis and even on the
    other, and 301x300, whose maps are even at 148/74 px: the feature maps equal Keras'."""
    kmodel, ours, _ = keras_any_size
    x = torch.rand(1, 3, *size) * 2 - 1
    theirs = keras_predict(kmodel, x)
    with torch.no_grad():
        mine = ours(x).numpy()
    assert mine.shape == theirs.shape
    assert np.abs(theirs).max() > 0.5
    assert np.abs(mine - theirs).max() < 1e-4 * np.abs(theirs).max()


def test_symmetric_padding_differs_from_keras_where_maps_are_even(keras_any_size):
    """Sensitivity of the comparison above: timm's symmetric padding is measurably not
    Keras' on a 300 px input (a 74 px map is pooled)."""
    kmodel, _, path = keras_any_size
    sym = xception.create_model("xception", weights=path, num_classes=0, pooling=None,
                                padding="symmetric").eval()  # fmt: skip
    x = torch.rand(1, 3, 300, 300) * 2 - 1
    with torch.no_grad():
        assert np.abs(sym(x).numpy() - keras_predict(kmodel, x)).max() > 0.1


# ---------------------------------------------------------------------------------------------
# README's table of fields
# ---------------------------------------------------------------------------------------------
def test_head_fields_do_what_the_readme_table_says():
    """fc_layers: hidden Dense + ReLU before the classifier; drop_rate: dropout before the
    classifier in training only; pooling max/avg/None; in_chans: the first conv's input."""
    torch.manual_seed(0)
    model = trained_like(Xception(**{**SMALL, "num_classes": 3}, fc_layers=(12,), drop_rate=0.5,
                                  pooling="max", in_chans=2))  # fmt: skip
    assert model.block1.conv1.conv.in_channels == 2
    x = torch.randn(4, 2, 23, 23)
    with torch.no_grad():
        feats = model.forward_features(x)
        hidden = F.relu(model.fc_hidden[0](feats.amax((2, 3))))
        assert torch.allclose(model(x), model.fc(hidden), atol=1e-6)
        assert torch.allclose(model.forward_head(feats, pre_logits=True), hidden, atol=1e-6)
        model.train()
        model.dropout.train()
        dropped = model.forward_head(feats.detach(), pre_logits=True)
    zeroed = dropped == 0
    assert zeroed.any() and torch.allclose(dropped[~zeroed], 2 * hidden[~zeroed], atol=1e-5)
    bare = Xception(**{**SMALL, "num_classes": 0}, pooling=None).eval()
    with torch.no_grad():
        assert bare(torch.randn(1, 3, 23, 23)).shape == (1, 64, 1, 1)


def test_middle_blocks_and_width_change_the_model_as_documented():
    deep = Xception(**{**SMALL, "middle_blocks": 5})
    assert deep.block_names == [f"block{i}" for i in range(1, 12)]
    assert [deep.feature_info[3]["module"], deep.feature_info[4]["module"]] == ["block9", "block11"]
    half = Xception(**SMALL, width=0.5)
    # 8, 16, 24, 32, 40, 48, 64 halved to the nearest multiple of 8 (4, 8, 12, 16, 20, 24,
    # 32 -> 8, 8, 16, 16, 24, 24, 32), never below 8.
    assert [i["channels"] for i in half.feature_info] == [8, 8, 16, 16, 32]
    assert half.block6.sepconv1.spatial.in_channels == 16
    assert half.block8.sepconv1.pointwise.in_channels == 24  # exit width 40 -> 20 -> 24


# ---------------------------------------------------------------------------------------------
# Config checks and round trips
# ---------------------------------------------------------------------------------------------
def test_segments_that_fit_no_model_width_name_the_values_that_do():
    """Segments that do not divide every separable conv's width were refused with "choose a
    divisor of N" for the first block that failed, a fix that failed in the next block (a
    divisor of 728 does not divide 64), instead of the segment counts this model can take.

    The paper's separable convs have 64, 128, 256, 728, 1024 and 1536 input channels: only 1,
    2, 4 and 8 (or 'depthwise') divide all of them. segments=64 was told "choose a divisor of
    728"; segments=3 "a divisor of 64", and 16, a divisor of 64, then failed at 728."""
    for segments in (3, 64):
        with pytest.raises(ValueError, match=rf"segments={segments}\b") as err:
            Xception(segments=segments)
        message = str(err.value)
        assert re.search(r"\b1, 2, 4,? (or |and )?8\b", message), message


@pytest.mark.parametrize(
    "overrides,match",
    [(dict(width=0), r"width=0 is not valid"),
     (dict(width=-0.5), r"width=-0.5 is not valid"),
     (dict(middle_blocks=-1), r"middle_blocks=-1 is not valid"),
     (dict(middle_blocks=2.5), r"middle_blocks=2.5 is not valid"),
     (dict(segments="Depthwise"), r"segments='Depthwise' is not valid"),
     (dict(segments=0), r"segments=0 is not valid"),
     (dict(output_stride=16.0), r"output_stride=16.0 is not valid"),
     (dict(pooling=None), r"pooling=None is not valid: .*num_classes=0")],
)  # fmt: skip
def test_impossible_configs_are_refused_by_name_through_every_entry_point(overrides, match):
    for build in (XceptionConfig, Xception,
                  lambda **kw: xception.model_config("xception-compact", **kw),
                  lambda **kw: xception.create_model("xception-compact", **kw)):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            build(**overrides)


def test_unknown_fields_are_named():
    with pytest.raises(TypeError, match="widht"):
        XceptionConfig(widht=0.5)
    with pytest.raises(TypeError, match="widht"):
        Xception({"widht": 0.5})
    with pytest.raises(ValueError, match=r"unknown option\(s\) widht .*width"):
        xception.create_model("xception-compact", widht=0.5)


def test_every_field_round_trips_through_a_dict_and_a_safetensors_file(tmp_path):
    from xception.weights import read_safetensors_metadata, save_safetensors

    cfg = XceptionConfig(num_classes=7, in_chans=2, residual=False, mid_activation="elu",
                         order="pointwise_first", segments=4, middle_blocks=2, width=0.25,
                         stem_channels=(16, 32), entry_channels=(32, 64, 128), exit_channels=160,
                         head_channels=(192, 256), stem_stride=1, stem_padding="same",
                         padding="symmetric", bn_eps=1e-5, bn_momentum=0.1, drop_rate=0.3,
                         fc_layers=(40, 24), pooling="max", output_stride=16)  # fmt: skip
    assert XceptionConfig(**cfg.to_dict()) == cfg
    assert hash(XceptionConfig(**cfg.to_dict())) == hash(cfg)
    model = trained_like(Xception(cfg))
    path = save_safetensors(model, tmp_path / "m.safetensors")
    stored, _ = read_safetensors_metadata(path)
    assert XceptionConfig(**stored) == cfg
    again = xception.create_model("xception", weights=path).eval()
    assert again.config == cfg
    x = torch.randn(2, 2, 19, 22)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
