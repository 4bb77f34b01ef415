"""Building blocks of Xception: the separable convolution with every switch the paper studies,
TensorFlow-style 'same' pooling, and conv + batch norm (+ ReLU).

The separable convolution is the paper's object of study, so it carries the ablation switches:
`segments` (channel groups of the spatial 3x3 conv: 1 = a regular conv, k = an Inception-like
module with k segments, "depthwise" = one segment per channel), `order` (depthwise first, as built,
or pointwise first, as in "extreme Inception") and `mid_activation` (none, ReLU or ELU between the
two halves).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvBNAct",
    "SeparableConv2d",
    "SamePadMaxPool2d",
    "init_weights",
    "make_activation",
    "resolve_segments",
    "same_max_pool2d",
    "tf_same_pad",
    "tf_same_padding",
]

ORDERS = ("depthwise_first", "pointwise_first")
MID_ACTIVATIONS = (None, "relu", "elu")


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """Padding (before, after) that TensorFlow's 'same' applies along one axis.

    TensorFlow puts total // 2 before and the remainder after, so an even input under a 3x3/2
    window is padded (0, 1), not (1, 1) as a symmetric PyTorch padding would do.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


# The two functions below decide their padding from the input's size in Python. torch.fx cannot
# trace that (a size is a Proxy there), so `torch.fx.wrap` makes each one node of an fx graph:
# `torch.fx.symbolic_trace` and what builds on it (torchvision's create_feature_extractor) then
# trace every model, where they failed with a TraceError.
def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """`x` zero-padded on both spatial axes as TensorFlow's 'same' pads it for a `kernel`
    window at `stride`."""
    top, bottom = tf_same_padding(x.shape[-2], kernel, stride)
    left, right = tf_same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom))


def same_max_pool2d(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Max pooling with TensorFlow's 'same' padding (asymmetric on even inputs; padding never
    wins a window)."""
    k, s = kernel, stride
    top, bottom = tf_same_padding(x.shape[-2], k, s)
    left, right = tf_same_padding(x.shape[-1], k, s)
    if top == bottom and left == right:
        return F.max_pool2d(x, k, s, padding=(top, left))
    if _ceil_mode_pads_after(x.shape[-2], k, s, top, bottom) and _ceil_mode_pads_after(
        x.shape[-1], k, s, left, right
    ):
        # One more pad row/column after than before: ceil_mode's last window hangs one past the
        # edge and takes the max of what is inside, as -inf padding would, with no padded copy
        # (an 88 MiB one at 74x74, batch 8; its backward too, in training).
        return F.max_pool2d(x, k, s, padding=(top, left), ceil_mode=True)
    x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
    return F.max_pool2d(x, k, s)


torch.fx.wrap("tf_same_pad")
torch.fx.wrap("same_max_pool2d")


def make_activation(name: str | None) -> nn.Module | None:
    """ReLU, ELU or nothing; the name is checked so a typo fails loudly."""
    if name is None:
        return None
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "elu":
        return nn.ELU(inplace=True)
    raise ValueError(f"unknown activation {name!r}: use None, 'relu' or 'elu'")


def resolve_segments(segments: int | str, channels: int) -> int:
    """Number of channel groups of the spatial conv over `channels` channels."""
    if segments == "depthwise":
        return channels
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise ValueError(
            f"segments={segments!r} is not valid: use a positive integer (1 = regular conv) "
            "or 'depthwise' (one segment per channel)"
        )
    if channels % segments:
        raise ValueError(
            f"segments={segments} does not divide {channels} channels: choose a divisor of "
            f"{channels} or 'depthwise'"
        )
    return segments


class SeparableConv2d(nn.Module):
    """Spatial 3x3 conv over channel segments and a pointwise 1x1 conv, no bias, nothing between
    them by default (the paper's best setting).

    With order="depthwise_first" the spatial conv runs on the `in_channels` input channels (this is
    Keras' SeparableConv2D when segments="depthwise"); with "pointwise_first" the 1x1 conv maps to
    `out_channels` first and the spatial conv runs on those.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        dilation: int = 1,
        segments: int | str = "depthwise",
        order: str = "depthwise_first",
        mid_activation: str | None = None,
    ) -> None:
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not valid: use one of {ORDERS}")
        if mid_activation not in MID_ACTIVATIONS:
            raise ValueError(
                f"mid_activation={mid_activation!r} is not valid: use None, 'relu' or 'elu'"
            )
        self.order = order
        spatial_channels = in_channels if order == "depthwise_first" else out_channels
        groups = resolve_segments(segments, spatial_channels)
        # Stride is always 1 in Xception: 'same' padding is symmetric for odd kernels (d on
        # each side); an even kernel needs one more after, which only 'same' gives (a symmetric
        # (k-1)//2 shrank the output by a pixel per layer).
        spatial = nn.Conv2d(
            spatial_channels,
            spatial_channels,
            kernel_size,
            padding=dilation * (kernel_size - 1) // 2 if kernel_size % 2 else "same",
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        if order == "depthwise_first":
            self.spatial = spatial
            self.mid_act = make_activation(mid_activation)
            self.pointwise = pointwise
        else:
            self.pointwise = pointwise
            self.mid_act = make_activation(mid_activation)
            self.spatial = spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (
            (self.spatial, self.pointwise)
            if self.order == "depthwise_first"
            else (self.pointwise, self.spatial)
        )
        x = first(x)
        if self.mid_act is not None:
            x = self.mid_act(x)
        return second(x)


class SamePadMaxPool2d(nn.Module):
    """3x3 max pool with 'same' output size.

    mode="keras" pads like TensorFlow (asymmetric on even inputs, with -inf so padding never wins);
    mode="symmetric" pads (k-1)//2 on every side, like timm/Cadene's port. `dilation` (stride 1,
    an odd window) spreads the window as a dilated block's convs are: a pool whose stride became
    dilation (output_stride 8's exit block) had taken the max over half-step neighbours.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2, mode: str = "keras",
                 dilation: int = 1) -> None:  # fmt: skip
        super().__init__()
        if mode not in ("keras", "symmetric"):
            raise ValueError(f"padding={mode!r} is not valid: use 'keras' or 'symmetric'")
        if dilation != 1 and (stride != 1 or kernel_size % 2 == 0):
            raise ValueError(f"dilation={dilation} needs stride 1 and an odd kernel_size "
                             f"(got stride={stride}, kernel_size={kernel_size})")  # fmt: skip
        self.kernel_size, self.stride, self.mode = kernel_size, stride, mode
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, d = self.kernel_size, self.stride, self.dilation
        if d != 1:  # 'same' at stride 1: d * (k - 1) / 2 of -inf on every side
            pad = d * (k - 1) // 2
            x = F.pad(x, (pad, pad, pad, pad), value=float("-inf"))
            return F.max_pool2d(x, k, 1, dilation=d)
        # Stride 1 with an odd window: TensorFlow's 'same' is symmetric. An even one pads one
        # more after than before, as below (it lost a row and a column here).
        if self.mode == "symmetric" or (s == 1 and k % 2):
            return F.max_pool2d(x, k, s, padding=(k - 1) // 2)
        return same_max_pool2d(x, k, s)

    def extra_repr(self) -> str:
        text = f"kernel_size={self.kernel_size}, stride={self.stride}, mode={self.mode!r}"
        return text + (f", dilation={self.dilation}" if self.dilation != 1 else "")


def _ceil_mode_pads_after(size: int, k: int, s: int, before: int, after: int) -> bool:
    """Whether max_pool2d(padding=before, ceil_mode=True) on `size` gives TensorFlow's 'same'
    output (before + after padding) exactly: the output sizes agree and the last window starts
    inside the input, so ceil mode only ever adds the one missing pad after."""
    if before == after:
        return True
    if after != before + 1 or before > k // 2:
        return False
    out = -(-size // s)  # TensorFlow 'same': ceil(size / stride)
    ceil_out = -(-(size + 2 * before - k) // s) + 1
    if (ceil_out - 1) * s >= size + before:  # PyTorch drops a window starting in the padding
        ceil_out -= 1
    return ceil_out == out and (out - 1) * s + k <= size + before + after


def init_weights(model: nn.Module) -> None:
    """He-normal convs (fan-out), unit/zero batch norms, Glorot-uniform Linears with zero bias."""
    # A layer may have no bias (bias=False) or no affine parameters (affine=False): they used
    # to crash the initialisation (zeros_ of None).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm (-> ReLU). Used by the stem and, without ReLU, the shortcuts."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        act: bool = True,
    ) -> None:
        layers: dict[str, nn.Module] = {
            "conv": nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
            "bn": nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum),
        }
        if act:
            layers["act"] = nn.ReLU(inplace=True)
        super().__init__()
        for name, module in layers.items():
            self.add_module(name, module)
