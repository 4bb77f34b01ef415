import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xception.layers import ConvBNAct, SamePadMaxPool2d, SeparableConv2d, tf_same_padding


@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    [(299, 3, 1, (1, 1)), (147, 3, 2, (1, 1)), (74, 3, 2, (0, 1)), (37, 3, 2, (1, 1)),
     (10, 3, 2, (0, 1)), (19, 1, 2, (0, 0)), (5, 3, 1, (1, 1))],
)  # fmt: skip
def test_tf_same_padding_matches_tensorflow_rule(size, kernel, stride, expected):
    assert tf_same_padding(size, kernel, stride) == expected


def test_keras_pool_is_asymmetric_on_even_inputs_and_pads_with_minus_inf():
    x = -torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # all negative: a zero pad would win
    out = SamePadMaxPool2d(3, 2, "keras")(x)
    # TensorFlow pads (0, 1): windows start at rows/cols 0 and 2.
    expected = torch.tensor([[-1.0, -3.0], [-9.0, -11.0]])
    assert torch.equal(out[0, 0], expected)
    symmetric = SamePadMaxPool2d(3, 2, "symmetric")(x)
    assert not torch.equal(symmetric, out)
    assert torch.equal(symmetric, F.max_pool2d(x, 3, 2, padding=1))


def test_keras_pool_equals_torch_pool_on_odd_inputs():
    x = torch.randn(2, 3, 147, 147)
    assert torch.equal(SamePadMaxPool2d(3, 2, "keras")(x), F.max_pool2d(x, 3, 2, padding=1))


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("order", ["depthwise_first", "pointwise_first"])
@pytest.mark.parametrize("segments", [1, 2, 4, 8, "depthwise"])
def test_separable_param_count_follows_the_segment_formula(order, segments):
    c_in, c_out = 16, 24
    spatial = c_in if order == "depthwise_first" else c_out
    k = spatial if segments == "depthwise" else segments
    expected = spatial * (spatial // k) * 9 + c_in * c_out
    m = SeparableConv2d(c_in, c_out, segments=segments, order=order)
    assert _params(m) == expected
    assert m.spatial.groups == k
    assert m(torch.randn(2, c_in, 9, 9)).shape == (2, c_out, 9, 9)


def test_order_changes_the_computation_not_just_the_names():
    m = SeparableConv2d(8, 16, order="pointwise_first", mid_activation="relu")
    x = torch.randn(2, 8, 7, 7)
    manual = m.spatial(torch.relu(m.pointwise(x)))
    assert torch.allclose(m(x), manual)
    d = SeparableConv2d(8, 16)
    assert torch.allclose(d(x), d.pointwise(d.spatial(x)))


@pytest.mark.parametrize("act,cls", [(None, type(None)), ("relu", nn.ReLU), ("elu", nn.ELU)])
def test_mid_activation_present_only_when_asked(act, cls):
    m = SeparableConv2d(8, 8, mid_activation=act)
    assert isinstance(m.mid_act, cls)
    n_act = sum(isinstance(x, nn.ReLU | nn.ELU) for x in m.modules())
    assert n_act == (0 if act is None else 1)
    x = torch.randn(1, 8, 5, 5)
    expected = m.spatial(x)
    if act == "relu":
        expected = torch.relu(expected)
    elif act == "elu":
        expected = F.elu(expected)
    assert torch.allclose(m(x), m.pointwise(expected), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, "x", True, 2.0])
def test_invalid_segments_named_in_error(bad):
    with pytest.raises(ValueError, match="segments"):
        SeparableConv2d(8, 8, segments=bad)


def test_segments_that_do_not_divide_channels_name_both():
    with pytest.raises(ValueError, match=r"segments=3 does not divide 8 channels"):
        SeparableConv2d(8, 8, segments=3)


def test_bad_order_and_activation_rejected():
    with pytest.raises(ValueError, match="order"):
        SeparableConv2d(8, 8, order="sideways")
    with pytest.raises(ValueError, match="mid_activation"):
        SeparableConv2d(8, 8, mid_activation="gelu")


def test_dilation_keeps_spatial_size():
    m = SeparableConv2d(4, 4, dilation=4)
    assert m.spatial.dilation == (4, 4)
    assert m(torch.randn(1, 4, 11, 11)).shape == (1, 4, 11, 11)


def test_conv_bn_act_has_no_bias_and_keras_bn_defaults():
    m = ConvBNAct(3, 8, 3, 2, act=False)
    assert m.conv.bias is None
    assert m.bn.eps == 1e-3 and m.bn.momentum == 0.01
    assert not hasattr(m, "act")


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("kernel", [3, 5])
def test_same_pool_without_a_padded_copy_equals_padding_with_minus_inf(kernel, stride):
    """The asymmetric 'same' pool runs with ceil_mode instead of an -inf padded copy where that
    is exact; values and gradients must equal the padded reference at every size."""
    from xception import layers

    pool = SamePadMaxPool2d(kernel, stride, "keras")
    fast_sizes = 0
    for h in range(kernel, 40):
        w = h + 1  # rows and columns padded differently
        x = (-1 - torch.rand(2, 3, h, w, dtype=torch.float64)).requires_grad_()  # all < 0
        top, bottom = tf_same_padding(h, kernel, stride)
        left, right = tf_same_padding(w, kernel, stride)
        ref_in = x.detach().clone().requires_grad_()
        ref = F.max_pool2d(F.pad(ref_in, (left, right, top, bottom), value=float("-inf")),
                           kernel, stride)  # fmt: skip
        out = pool(x)
        assert out.shape == ref.shape and torch.equal(out, ref), (h, w)
        g = torch.randn_like(ref)
        out.backward(g)
        ref.backward(g)
        assert torch.equal(x.grad, ref_in.grad), (h, w)
        fast_sizes += layers._ceil_mode_pads_after(
            h, kernel, stride, top, bottom
        ) and layers._ceil_mode_pads_after(w, kernel, stride, left, right)
    assert fast_sizes > 10  # the copy-free path really ran
    assert layers._ceil_mode_pads_after(74, 3, 2, 0, 1)  # Xception's block-2 pool at 299x299


def test_init_weights_takes_layers_without_bias_or_affine_parameters():
    """A Linear(bias=False) or a BatchNorm2d(affine=False) used to crash `init_weights` with an
    AttributeError (zeros_ of None)."""
    from xception.layers import init_weights

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten(),
                          nn.Linear(4, 2, bias=False), nn.BatchNorm2d(2), nn.Linear(2, 2))  # fmt: skip
    init_weights(model)
    assert model[3].bias is None and model[1].weight is None
    assert torch.equal(model[4].weight, torch.ones(2)) and torch.equal(
        model[5].bias, torch.zeros(2)
    )


@pytest.mark.parametrize("kernel", [2, 4])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # speed
def test_even_kernels_keep_the_same_size_padding_like_tensorflow(kernel):
    """'same' with an even window pads one more after than before; the stride-1 pool and the
    separable conv padded (k-1)//2 on both sides and lost a row and a column."""
    x = -1 - torch.rand(1, 4, 9, 10)
    top, bottom = tf_same_padding(9, kernel, 1)
    left, right = tf_same_padding(10, kernel, 1)
    padded = F.pad(x, (left, right, top, bottom), value=float("-inf"))
    assert torch.equal(SamePadMaxPool2d(kernel, 1, "keras")(x), F.max_pool2d(padded, kernel, 1))
    for order in ("depthwise_first", "pointwise_first"):
        m = SeparableConv2d(4, 6, kernel, order=order)
        assert m(x).shape == (1, 6, 9, 10)
    m = SeparableConv2d(4, 6, kernel)
    zero_padded = F.pad(x, (left, right, top, bottom))
    expected = m.pointwise(F.conv2d(zero_padded, m.spatial.weight, groups=4))
    assert torch.allclose(m(x), expected, atol=1e-6)
    assert SeparableConv2d(4, 6, 3).spatial.padding == (1, 1)  # odd kernels as before


@pytest.mark.parametrize(
    "size,kernel,stride,dilation,expected",
    [(10, 3, 1, 2, (2, 2)), (10, 3, 2, 2, (1, 2)), (9, 3, 1, 4, (4, 4)), (8, 2, 1, 3, (1, 2))],
)
def test_tf_same_padding_widens_the_window_by_the_dilation(
    size, kernel, stride, dilation, expected
):
    """A dilated window spans (kernel - 1) * dilation + 1 pixels, and 'same' pads for that span:
    e.g. 10 pixels, 3x3 dilated by 2 (span 5) at stride 2 -> 5 outputs, (5-1)*2 + 5 - 10 = 3
    padded, 1 before and 2 after. Checked against a dilated conv's output size too."""
    assert tf_same_padding(size, kernel, stride, dilation) == expected
    before, after = expected
    x = F.pad(torch.zeros(1, 1, 1, size), (before, after))
    out = F.conv2d(x, torch.zeros(1, 1, 1, kernel), stride=(1, stride), dilation=(1, dilation))
    assert out.shape[-1] == -(-size // stride)


def test_init_weights_follows_its_documented_distributions():
    """He-normal on the fan-out for convs (std sqrt(2 / (out * k * k))), Glorot-uniform for
    Linears (bound sqrt(6 / (in + out))), and batch norms reset to weight 1 and bias 0, even
    after training moved them. The fan-in (or torch's defaults) would differ by far more than
    the sampling error of these many weights."""
    from xception.layers import init_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 256, 3), nn.BatchNorm2d(256), nn.Linear(300, 100))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
        model[1].bias.fill_(-2.0)
    init_weights(model)
    conv_std = (2 / (256 * 9)) ** 0.5  # fan-in would be 8 * 9 -> std 0.167
    assert model[0].weight.std().item() == pytest.approx(conv_std, rel=0.03)
    assert abs(model[0].weight.mean().item()) < 0.05 * conv_std
    bound = (6 / (300 + 100)) ** 0.5  # torch's default bound would be 1 / sqrt(300) = 0.058
    w = model[2].weight
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.03)
    assert torch.equal(model[2].bias, torch.zeros(100))
    assert torch.equal(model[1].weight, torch.ones(256))
    assert torch.equal(model[1].bias, torch.zeros(256))
