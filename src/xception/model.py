"""Xception (Chollet, CVPR 2017, Figure 5): entry flow, middle flow repeated, exit flow.

One frozen dataclass, `XceptionConfig`, describes every variant: each of the paper's ablations is
one field. Modules are named after the paper's blocks (block1 ... block14 for the paper's model,
and inside them sepconv1, sepconv1_bn, ...), so Keras' layer `block2_sepconv1_bn` is our
`block2.sepconv1_bn`; the shortcuts Keras leaves unnamed are `blockN.shortcut` here.

The model knows nothing of files, training or the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .layers import (
    MID_ACTIVATIONS,
    ORDERS,
    ConvBNAct,
    SamePadMaxPool2d,
    SeparableConv2d,
    init_weights,
    tf_same_pad,
)

torch.fx.wrap("tf_same_pad")  # a leaf of fx graphs, as in layers (its padding is size-dependent)

__all__ = [
    "BlockNet",
    "FeatureInfo",
    "ModelConfig",
    "Xception",
    "XceptionConfig",
    "XceptionBlock",
    "XceptionFeatures",
    "check_fits_in_memory",
    "check_float_images",
    "check_tensor",
    "count_macs",
    "summary",
]


def check_tensor(x) -> None:
    """Refuse a batch that is not a tensor (a numpy array, as Keras takes, a list, None) by its
    type and with the conversion, before an AttributeError deep inside says neither."""
    if isinstance(x, torch.Tensor):
        return
    kind = type(x).__qualname__
    if type(x).__module__ != "builtins":
        kind = f"{type(x).__module__}.{kind}"
    if type(x).__module__ == "numpy":
        fix = ("convert it with torch.from_numpy(x).float(), or torch.from_numpy(x).permute(0, "
               "3, 1, 2).float() for a channels-last (N, H, W, C) array as Keras takes it")  # fmt: skip
    else:
        fix = "prepare each image with the weights' transforms() and torch.stack them"
    raise TypeError(f"expected a torch.Tensor batch of images (N, C, H, W), got a {kind}: {fix}")


def timm_data_config(model: nn.Module, size: int, crop: float, interpolation: str,
                     mean: tuple[float, ...], std: tuple[float, ...], num_classes: int) -> dict:  # fmt: skip
    """A model's `pretrained_cfg` in timm's keys: the input its weights expect (a crop
    fraction of 1.0 is Keras' square resize), its first conv and its classifier (`fc`)."""
    first_conv, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    return dict(
        input_size=(conv.in_channels, size, size),
        interpolation=interpolation, mean=mean, std=std, crop_pct=crop,
        crop_mode="squash" if crop >= 1.0 else "center", num_classes=num_classes,
        first_conv=first_conv, classifier="fc" if num_classes else None,
    )  # fmt: skip


def check_float_images(x: torch.Tensor) -> None:
    """Refuse integer pixels, which a float model would take as 0..255 values and get wrong."""
    check_tensor(x)
    if not x.is_floating_point():
        raise ValueError(
            f"expected floating-point images, got {x.dtype}: convert and normalise them as "
            "the weights expect (Keras' ImageNet weights: x.float() / 127.5 - 1)"
        )


def check_images(x, in_chans: int, min_size: int, compact_hint: bool = False,
                 channels_fix: str = "set in_chans to the number of input channels") -> None:  # fmt: skip
    """Refuse a batch a model with `in_chans` input channels and a smallest input of `min_size`
    pixels cannot take, by what is wrong with it and how to fix it (torch's own errors come
    from deep inside a conv and name neither). `compact_hint` adds the compact presets to the
    fixes of too small an input; `channels_fix` is the fix of another channel count."""
    if isinstance(x, torch.fx.Proxy):  # torch.fx tracing: no values or sizes to check
        return
    check_tensor(x)
    c = in_chans
    if x.ndim != 4 or x.shape[1] != c:
        if x.ndim == 3 and x.shape[0] == c:
            fix = "add the batch dimension, x.unsqueeze(0)"
        elif x.ndim == 3 and c == 1:  # a batch of grey images without their channel axis
            fix = "add the channel dimension, x.unsqueeze(1)"
        elif x.ndim == 4 and x.shape[-1] == c:
            fix = "that looks channels-last (N, H, W, C): x.permute(0, 3, 1, 2)"
        else:
            fix = channels_fix
        raise ValueError(f"expected a batch of shape (N, {c}, H, W), got {tuple(x.shape)}: {fix}")
    check_float_images(x)
    if min(x.shape[-2:]) < min_size:
        raise ValueError(
            f"input {tuple(x.shape[-2:])} is smaller than this model's minimum "
            f"{min_size}x{min_size}: resize the images"
            + (", or use a compact preset (stem_stride=1, stem_padding='same') for small images"
               if compact_hint else "")
        )  # fmt: skip


def check_dtype(x: torch.Tensor, model: nn.Module) -> None:
    """Refuse a batch of another float type than the model's weights (float64 from
    `torch.from_numpy`, float32 for a `.half()` model), which failed inside the first conv with
    torch's "expected scalar type". Autocast casts for itself, so it is let through, but for
    float64 weights, which it leaves as they are while it casts a float32 batch down."""
    if isinstance(x, torch.fx.Proxy):
        return
    weight = next(model.parameters(), None)
    if _autocast(x.device.type):
        if weight is not None and weight.dtype == torch.float64 and x.dtype != torch.float64:
            low = torch.get_autocast_dtype(x.device.type)
            raise ValueError(f"the model's weights are float64, which autocast leaves as they "
                             f"are, while it casts the {x.dtype} batch to {low}: use a float32 "
                             "model under autocast, model.float(), or a float64 batch")  # fmt: skip
        return
    if weight is not None and x.dtype != weight.dtype:
        raise ValueError(f"the batch is {x.dtype} but the model's weights are {weight.dtype}: "
                         f"convert the batch, x.to({weight.dtype}), or the model, "
                         f"model.to({x.dtype})")  # fmt: skip


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device without autocast (meta: shapes only)
        return False


def _as_int(value):
    """`value` as an int where it is a whole number of another type (numpy's, a torch
    integer scalar), else `value` unchanged for the checks to refuse by name."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        return value
    try:
        return operator.index(value)
    except (TypeError, ValueError, RuntimeError):
        return value


@dataclass(frozen=True)
class ModelConfig:
    """What the model configs share: lists from YAML/JSON become tuples (so configs compare and
    hash the same way), the checks every model needs, `replace`, `to_dict` and `channels`.
    Subclasses name their tuple fields in `_TUPLES` and extend `validate`."""

    _TUPLES: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in self._TUPLES:
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()
        # Numbers as floats, once checked (messages name a value as it was given), so that
        # width=1 (YAML's integer) is the config width=1.0 is: one model, and one run in the
        # experiments' store, whose keys hash the config.
        for f in dataclasses.fields(self):
            if f.type == "float":
                object.__setattr__(self, f.name, float(getattr(self, f.name)))

    def _bad(self, name: str, hint: str) -> ValueError:
        return ValueError(f"{name}={getattr(self, name)!r} is not valid: {hint}")

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # types first: the checks below compare values
            value = getattr(self, f.name)
            # A string "false" or a None would pass for a switch by truthiness, and True for 1.
            if f.type == "bool" and not isinstance(value, bool):
                raise self._bad(f.name, "use True or False")
            if f.type == "int" and isinstance(value, bool):
                raise self._bad(f.name, "expected an integer, not True/False")
            if "int" in f.type.split(" | ") and not isinstance(value, int | str):
                # numpy's and torch's integers (num_classes = labels.max() + 1) become ints,
                # so that configs compare, hash and go to JSON as ints do.
                value = _as_int(value)
                object.__setattr__(self, f.name, value)
            if f.name in self._TUPLES and isinstance(value, tuple):
                value = tuple(_as_int(v) for v in value)  # widths from a numpy array
                object.__setattr__(self, f.name, value)
            if f.name in self._TUPLES and (
                not isinstance(value, tuple) or any(isinstance(v, bool) for v in value)
            ):
                raise self._bad(f.name, "expected a list or tuple of integers")
            if f.type != "float":
                continue
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
                try:
                    object.__setattr__(self, f.name, float(value))
                    continue
                except ValueError:
                    pass
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's too
                raise self._bad(f.name, "expected a number")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise self._bad("num_classes", "use a non-negative integer (0 = no classifier)")
        if not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise self._bad("in_chans", "use a positive integer")
        if not 0 < self.width < math.inf:
            raise self._bad("width", "use a positive multiplier (1.0 = the paper's widths)")
        if not self.bn_eps > 0:
            raise self._bad("bn_eps", "use a small positive number (1e-3, as Keras)")
        if not 0 <= self.bn_momentum <= 1:
            raise self._bad("bn_momentum", "use a fraction in [0, 1] (PyTorch's convention: "
                            "Keras' momentum 0.99 is 0.01 here)")  # fmt: skip
        if not 0.0 <= self.drop_rate < 1.0:
            raise self._bad("drop_rate", "use a probability in [0, 1)")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, config, overrides: dict):
        """`config` (an instance, a dict of its fields as `to_dict` and checkpoints give it, or
        None for the defaults) with `overrides` applied."""
        if isinstance(config, Mapping):
            config = cls(**config)
        elif config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(f"config must be {cls.__name__}(...) or a dict of its fields, "
                            f"got {type(config).__name__}")  # fmt: skip
        return config.replace(**overrides) if overrides else config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def channels(self, c: int) -> int:
        """A paper width scaled by `width`, rounded to a multiple of 8 (at least 8)."""
        if self.width == 1.0:
            return c
        return max(8, int(c * self.width + 4) // 8 * 8)


@dataclass(frozen=True)
class XceptionConfig(ModelConfig):
    """Everything that defines an Xception variant. Defaults are the paper's ImageNet model.

    Paper ablations: `residual`, `mid_activation`, `order`, `segments`. Channel tuples are the
    paper's widths before the `width` multiplier; `stem_stride=1, stem_padding="same"` keeps small
    images (28-64 px) from being thrown away by the stem.
    """

    num_classes: int = 1000
    in_chans: int = 3
    residual: bool = True
    mid_activation: str | None = None  # None | "relu" | "elu", between spatial and pointwise
    order: str = "depthwise_first"  # | "pointwise_first"
    segments: int | str = "depthwise"  # 1 = regular conv, k segments, or one per channel
    middle_blocks: int = 8
    width: float = 1.0
    stem_channels: tuple[int, int] = (32, 64)
    entry_channels: tuple[int, int, int] = (128, 256, 728)
    exit_channels: int = 1024
    head_channels: tuple[int, int] = (1536, 2048)
    stem_stride: int = 2
    stem_padding: str = "valid"  # | "same"
    padding: str = "keras"  # "keras" (TensorFlow 'same') | "symmetric" (timm/Cadene port)
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01  # PyTorch convention: Keras' 0.99
    drop_rate: float = 0.0
    fc_layers: tuple[int, ...] = ()  # hidden Dense widths before the classifier
    pooling: str | None = "avg"  # "avg" | "max" | None (no pooling, num_classes must be 0)
    output_stride: int = 32  # 32, 16 or 8 (by dilation)

    _TUPLES = ("stem_channels", "entry_channels", "head_channels", "fc_layers")

    def validate(self) -> None:
        super().validate()
        bad = self._bad
        if self.mid_activation not in MID_ACTIVATIONS:
            raise bad("mid_activation", "use None, 'relu' or 'elu'")
        if self.order not in ORDERS:
            raise bad("order", f"use one of {ORDERS}")
        if not isinstance(self.middle_blocks, int) or self.middle_blocks < 0:
            raise bad("middle_blocks", "use a non-negative integer (the paper uses 8)")
        # `in` takes 2.0 for 2: a float stride then failed in the first conv's forward.
        if not isinstance(self.stem_stride, int) or self.stem_stride not in (1, 2):
            raise bad("stem_stride", "use 2 (the paper) or 1 (small images)")
        if self.stem_padding not in ("valid", "same"):
            raise bad("stem_padding", "use 'valid' (the paper) or 'same'")
        if self.padding not in ("keras", "symmetric"):
            raise bad("padding", "use 'keras' (TensorFlow 'same') or 'symmetric' (timm port)")
        if self.pooling not in ("avg", "max", None):
            raise bad("pooling", "use 'avg', 'max' or None")
        if self.pooling is None and (self.num_classes or self.fc_layers):
            raise bad("pooling", "None returns feature maps: set num_classes=0 and fc_layers=()")
        if not isinstance(self.output_stride, int) or self.output_stride not in (8, 16, 32):
            raise bad("output_stride", "use 32, 16 or 8")
        # Checked here, not only where a block is built: a list (YAML's [1, 2]) failed as an
        # unhashable config in the memory check, and model_config() returned it unchecked.
        seg = self.segments
        if not (seg == "depthwise" if isinstance(seg, str)
                else isinstance(seg, int) and not isinstance(seg, bool) and seg >= 1):  # fmt: skip
            raise bad("segments", "use a positive integer (1 = regular conv) or 'depthwise' "
                      "(one segment per channel)")  # fmt: skip
        if any(not isinstance(c, int) or c < 1 for c in self.fc_layers):
            raise bad("fc_layers", "use a tuple of positive widths, e.g. (4096, 4096)")
        for name, n in (("stem_channels", 2), ("entry_channels", 3), ("head_channels", 2)):
            widths = getattr(self, name)
            if len(widths) != n or any(not isinstance(c, int) or c < 1 for c in widths):
                raise bad(name, f"use {n} positive widths")
        if not isinstance(self.exit_channels, int) or self.exit_channels < 1:
            raise bad("exit_channels", "use a positive width (the paper uses 1024)")
        if isinstance(seg, int) and seg > 1:
            # All at once: naming one block's width sent the user to a count (16 for block2's
            # 64) that the next block (728) refused.
            widths = self.spatial_widths()
            common = math.gcd(*widths)
            if common % seg:
                fits = [str(k) for k in range(1, common + 1) if common % k == 0]
                raise bad("segments", "it must divide the channels of every separable conv's "
                          f"spatial conv ({', '.join(map(str, sorted(widths)))}): use one of "
                          f"{', '.join(fits)} or 'depthwise'")  # fmt: skip

    def spatial_widths(self) -> set[int]:
        """The channel counts the separable convs' spatial (3x3) convs run on: their inputs with
        order 'depthwise_first', their outputs with 'pointwise_first'."""
        ch = self.channels
        stem, (e1, e2, e3) = ch(self.stem_channels[1]), (ch(w) for w in self.entry_channels)
        exit_, (h1, h2) = ch(self.exit_channels), (ch(w) for w in self.head_channels)
        if self.order == "pointwise_first":
            return {e1, e2, e3, exit_, h1, h2}
        return {stem, e1, e2, e3, exit_, h1}


class XceptionBlock(nn.Module):
    """One module of the paper: [ReLU] -> (sepconv -> BN), ReLU-separated -> [ReLU] -> [max pool],
    plus a shortcut (1x1 conv + BN when the shape changes, identity otherwise) when residual.

    The leading ReLU is not in place: the shortcut reads the block input it would overwrite.
    """

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, ...],
        cfg: XceptionConfig,
        *,
        stride: int = 1,
        pool: bool = False,
        dilation: int = 1,
        start_with_relu: bool = True,
        end_with_relu: bool = False,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.num_convs = len(widths)
        channels = in_channels
        for i, width in enumerate(widths, start=1):
            if i > 1 or start_with_relu:
                self.add_module(f"sepconv{i}_act", nn.ReLU(inplace=i > 1))
            self.add_module(
                f"sepconv{i}",
                SeparableConv2d(
                    channels,
                    width,
                    dilation=dilation,
                    segments=cfg.segments,
                    order=cfg.order,
                    mid_activation=cfg.mid_activation,
                ),
            )
            self.add_module(
                f"sepconv{i}_bn", nn.BatchNorm2d(width, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
            )
            channels = width
        if end_with_relu:
            self.add_module(f"sepconv{self.num_convs}_act_out", nn.ReLU(inplace=True))
        # A pool whose stride gave way to dilation (output_stride 8: the exit block) looks at
        # the neighbours its dilated convs do, so the maps are the stride-32 ones, only denser.
        self.pool = SamePadMaxPool2d(3, stride, cfg.padding, dilation) if pool else None
        self.residual = residual
        self.shortcut: nn.Module | None = None
        if residual and (in_channels != channels or stride != 1):
            self.shortcut = ConvBNAct(
                in_channels,
                channels,
                1,
                stride,
                bn_eps=cfg.bn_eps,
                bn_momentum=cfg.bn_momentum,
                act=False,
            )
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x
        for i in range(1, self.num_convs + 1):
            act = getattr(self, f"sepconv{i}_act", None)
            if act is not None:
                x = act(x)
            x = getattr(self, f"sepconv{i}")(x)
            x = getattr(self, f"sepconv{i}_bn")(x)
        out_act = getattr(self, f"sepconv{self.num_convs}_act_out", None)
        if out_act is not None:
            x = out_act(x)
        if self.pool is not None:
            x = self.pool(x)
        if self.residual:
            x = x + (inp if self.shortcut is None else self.shortcut(inp))
        return x


class Stem(nn.Module):
    """block1: two 3x3 convs (32 and 64 filters), each followed by BN and ReLU."""

    def __init__(self, cfg: XceptionConfig) -> None:
        super().__init__()
        pad = 1 if cfg.stem_padding == "same" else 0
        # TensorFlow's 'same' at stride 2 pads (0, 1) on even sizes: the strided conv then pads
        # in forward (a symmetric (1, 1) gave other outputs than Keras' on even inputs).
        self.tf_same = cfg.padding == "keras" and pad == 1 and cfg.stem_stride == 2
        c1, c2 = (cfg.channels(c) for c in cfg.stem_channels)
        kw = dict(bn_eps=cfg.bn_eps, bn_momentum=cfg.bn_momentum)
        self.conv1 = ConvBNAct(cfg.in_chans, c1, 3, cfg.stem_stride, 0 if self.tf_same else pad,
                               **kw)  # fmt: skip
        self.conv2 = ConvBNAct(c1, c2, 3, 1, pad, **kw)
        self.out_channels = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            x = tf_same_pad(x, 3, 2)
        return self.conv2(self.conv1(x))


def min_input_size(cfg: XceptionConfig) -> int:
    """Smallest height/width the stem accepts (later 'same' pools always give at least 1 pixel)."""
    pad = 1 if cfg.stem_padding == "same" else 0
    for size in range(1, 64):
        first = (size + 2 * pad - 3) // cfg.stem_stride + 1
        if first >= 1 and first + 2 * pad - 3 + 1 >= 1:
            return size
    raise AssertionError("unreachable")


def _physical_memory() -> int | None:
    """This machine's memory in bytes, where the OS says (Linux, macOS)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@functools.lru_cache(maxsize=64)
def _parameter_count(cls: type[nn.Module], config) -> int:
    """Parameters of `cls(config)`, built on the meta device (no memory); configs are frozen,
    so a process building the same model again (experiments, tests) counts it once."""
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


def check_fits_in_memory(cls: type[nn.Module], config, repeats: str | None = None) -> None:
    """Refuse, before any memory is taken, a model whose float32 weights alone exceed this
    machine's memory: a mistyped `width=50` (2,500 times the paper's parameters) would otherwise
    allocate and page for many minutes before failing. Counted on the meta device, where
    building costs no memory; a model built there (by a caller, or by this count) is not
    checked again. `repeats` names a config field counting identical blocks: the count is made
    with one and two of them and extended linearly, so that a huge number costs no time."""
    memory = _physical_memory()
    if memory is None or torch.empty(()).device.type == "meta":
        return
    try:
        if repeats is None:
            params = _parameter_count(cls, config)
        else:
            one, two = (_parameter_count(cls, dataclasses.replace(config, **{repeats: n}))
                        for n in (1, 2))  # fmt: skip
            params = one + (getattr(config, repeats) - 1) * (two - one)
    except RuntimeError as err:  # width=1e9: one weight's size overflows even on meta
        if "overflow" not in str(err):
            raise
        raise ValueError("this model would have more parameters than a tensor can hold (a "
                         "weight's size overflows): lower width, the channel counts or the "
                         "number of blocks") from None  # fmt: skip
    if params * 4 > memory:
        raise ValueError(
            f"this model would have {params:,} parameters ({params * 4 / 2**30:,.0f} GiB in "
            f"float32), more than this machine's {memory / 2**30:.0f} GiB of memory: lower "
            "width, the channel counts or the number of blocks"
        )


def _recompute_contexts(block: nn.Module) -> tuple:
    """torch.utils.checkpoint's contexts for `block`: its forward as is; its recomputation in
    the backward pass with the batch norms' running statistics left alone (a second update
    would count every batch twice in them, and in `num_batches_tracked`). The recomputation
    updates copies of them instead, which it drops: the same ops run, on the same values."""
    import contextlib

    names = ("running_mean", "running_var", "num_batches_tracked")

    @contextlib.contextmanager
    def on_copies():
        kept = []
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for n in names:
                    if m._buffers.get(n) is not None:
                        kept.append((m, n, m._buffers[n]))
                        m._buffers[n] = m._buffers[n].clone()
        try:
            yield
        finally:
            for m, n, buffer in kept:
                m._buffers[n] = buffer

    return contextlib.nullcontext(), on_copies()


def _call_with(block: nn.Module, names: list[str], x: torch.Tensor, *params) -> torch.Tensor:
    """`block(x)` with its parameters `names` taken from `params`."""
    return torch.func.functional_call(block, dict(zip(names, params, strict=True)), (x,))


class BlockNet(nn.Module):
    """What Xception and the compact Inception V3 share: blocks run in `block_names` order, a
    head of global pooling, optional hidden FC layers, dropout and a classifier, and the timm-style
    API over them. Subclasses set `config` (with `in_chans`, `num_classes`), `min_input_size`,
    `block_names`, `global_pool`, `fc_hidden`, `dropout` and `fc`."""

    config: object
    min_input_size: int
    block_names: list[str]
    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in training, as timm's models do: each block keeps only its
        input, and its activations are computed again in the backward pass (about one more
        forward pass per step). Gradients and batch-norm statistics are those of a plain
        step: the second pass does not update the running statistics again."""
        self.grad_checkpointing = bool(enable)

    def _block(self, name: str, x: torch.Tensor) -> torch.Tensor:
        block = getattr(self, name)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            if torch.compiler.is_compiling():  # the compiled graph's recomputation is pure
                return checkpoint(block, x, use_reentrant=False)
            # The parameters go in as the checkpoint's inputs: recomputed from the module's
            # attributes, the backward pass of torch.func.functional_call(model, params, x)
            # used the module's own weights, put back by then, not `params` (wrong gradients).
            params = dict(block.named_parameters())
            return checkpoint(functools.partial(_call_with, block, list(params)), x,
                              *params.values(), use_reentrant=False,
                              context_fn=functools.partial(_recompute_contexts, block))  # fmt: skip
        return block(x)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def head_hidden_size(self) -> int:
        """timm's name for the width of `forward_head(x, pre_logits=True)`: `num_features`,
        or the last hidden FC layer's width where the head has them (xception-fc)."""
        return getattr(self, "head_features", self.num_features)

    @property
    def default_cfg(self) -> dict:
        """timm's older name for `pretrained_cfg`, which code written for timm < 0.9 reads."""
        return self.pretrained_cfg

    @property
    def pretrained_cfg(self) -> dict:
        """The input the model's weights expect, in timm's keys, so that timm's own pipeline
        prepares images right: `timm.data.resolve_model_data_config(model)`, then
        `timm.data.create_transform(**config)`. Without it timm assumed 224 px and ImageNet's
        mean and std, where Keras' weights take 299 px scaled to [-1, 1]. From `weights_meta`
        where the model has it, else this project's defaults (its recipes' mean and std of 0.5,
        `default_image_size`, a square resize)."""
        meta = getattr(self, "weights_meta", None)
        chans = self.config.in_chans
        if meta is not None:
            size, crop, interpolation = meta.input_size, meta.crop_fraction, meta.interpolation
            mean, std = tuple(meta.mean), tuple(meta.std)
        else:
            size, crop, interpolation = default_image_size(self), 1.0, "bilinear"
            mean = std = (0.5,) * chans
        head = getattr(self, "fc", None) is not None  # none in a backbone (XceptionFeatures)
        return timm_data_config(self, size, crop, interpolation, mean, std,
                                self.config.num_classes if head else 0)  # fmt: skip

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        compact = getattr(self, "small_images", False) or (
            getattr(cfg, "stem_stride", 1) == 1 and getattr(cfg, "stem_padding", "same") == "same"
        )  # a compact model was told to use a compact preset
        check_images(x, cfg.in_chans, self.min_input_size, compact_hint=not compact)

    def check_dtype(self, x: torch.Tensor) -> None:
        check_dtype(x, self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        self.check_dtype(x)
        size = x.shape[-2:]
        for name in self.block_names:
            x = self._named_block(name, x, size)
        return x

    def _named_block(self, name: str, x: torch.Tensor, size) -> torch.Tensor:
        """`_block`, and torch's batch-norm error for a one-image training batch, which names
        neither the batch nor a fix, in words that do (`size`: the images' height, width)."""
        try:
            return self._block(name, x)
        except ValueError as err:
            if "more than 1 value per channel" not in str(err):
                raise
            raise ValueError(
                f"a training batch of 1 image of {size[0]}x{size[1]} px: {name}'s maps are "
                "1x1 there, and batch norm in training needs more than 1 value per channel: "
                "train on batches of at least 2 images (drop_last=True drops a last batch of "
                "1), on larger images, or call model.eval() for inference"
            ) from None

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool is None:
            return x
        x = self.global_pool(x)
        if self.fc_hidden is not None:
            x = self.fc_hidden(x)
        if self.dropout is not None:
            x = self.dropout(x)
        if pre_logits or self.fc is None:
            return x
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classifier `fc`; for a model without one (num_classes 0), a fresh `nn.Identity`,
        as timm returns, so `model.get_classifier()(features)` works either way. It is not
        registered: the model's state_dict keeps no `fc` keys."""
        return self.fc if self.fc is not None else nn.Identity()

    def _new_classifier(self, in_features: int, num_classes: int) -> None:
        """`fc` becomes a fresh Linear (Xavier-uniform weights, zero bias) on the model's
        device and in its dtype, or None for `num_classes` 0. The weights' metadata loses its
        class names, as when create_model gives loaded weights a new head: they named the old
        head's outputs (predict labelled a fresh 1000-class head with ImageNet's)."""
        meta = getattr(self, "weights_meta", None)
        if meta is not None:
            self.weights_meta = meta.replace(num_classes=num_classes, categories=None)
        # A registered child set to None stays in `_modules`, and a strict load_state_dict then
        # took a file's fc.weight and fc.bias silently; a plain attribute refuses them, as a
        # model built without a classifier (and timm's) does.
        self._modules.pop("fc", None)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else None
        if self.fc is not None:
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
            p = next(self.parameters())
            self.fc.to(p.device, p.dtype)


class Xception(BlockNet):
    """The Xception family. `Xception(XceptionConfig())` is the paper's model (22,855,952 params).

    API in the style of timm: `forward_features`, `forward_head(x, pre_logits=False)`,
    `reset_classifier(num_classes)`, `feature_maps(x)` and `feature_info`.
    """

    def __init__(self, config: XceptionConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = XceptionConfig.of(config, overrides)
        check_fits_in_memory(Xception, cfg, repeats="middle_blocks")
        self.config = cfg
        self.min_input_size = min_input_size(cfg)
        ch = cfg.channels

        self.block_names: list[str] = ["block1"]
        self.block1 = Stem(cfg)
        stride, dilation = cfg.stem_stride, 1
        self.feature_info: list[dict] = [
            dict(module="block1", channels=self.block1.out_channels, stride=stride)
        ]

        def downsampling(name: str, in_c: int, widths: tuple[int, ...], **kw) -> XceptionBlock:
            nonlocal stride, dilation
            block_dilation = dilation
            if stride * 2 > cfg.output_stride:  # dilate instead of striding
                block_stride, dilation = 1, dilation * 2
            else:
                block_stride, stride = 2, stride * 2
            return self._add_block(
                name, in_c, widths, stride=block_stride, pool=True,
                dilation=block_dilation, **kw,
            )  # fmt: skip

        c = self.block1.out_channels
        e1, e2, e3 = (ch(w) for w in cfg.entry_channels)
        for i, width in enumerate((e1, e2, e3)):
            # block2 follows the stem's ReLU, so it starts without one.
            block = downsampling(f"block{i + 2}", c, (width, width), start_with_relu=i > 0)
            c = block.out_channels
            if i < 2:
                self.feature_info.append(dict(module=f"block{i + 2}", channels=c, stride=stride))
        for i in range(cfg.middle_blocks):
            block = self._add_block(f"block{i + 5}", c, (c, c, c), dilation=dilation)
        self.feature_info.append(dict(module=self.block_names[-1], channels=c, stride=stride))
        n = cfg.middle_blocks + 5
        block = downsampling(f"block{n}", c, (c, ch(cfg.exit_channels)))
        h1, h2 = (ch(w) for w in cfg.head_channels)
        # The last module has no shortcut (the paper: residuals around all modules but the
        # first and last); its two separable convs are each followed by BN and ReLU.
        block = self._add_block(
            f"block{n + 1}", block.out_channels, (h1, h2), dilation=dilation,
            start_with_relu=False, end_with_relu=True, residual=False,
        )  # fmt: skip
        self.num_features = block.out_channels
        self.feature_info.append(
            dict(module=f"block{n + 1}", channels=self.num_features, stride=stride)
        )
        # With timm's keys and accessors, as timm's legacy_xception has them: its
        # FeatureListNet(model) had stopped on a bare assertion.
        self.feature_info = FeatureInfo(self.feature_info)

        self.global_pool = self._make_pool(cfg.pooling)
        hidden: list[nn.Module] = []
        width = self.num_features
        for units in cfg.fc_layers:
            hidden += [nn.Linear(width, units), nn.ReLU(inplace=True)]
            width = units
        self.fc_hidden = nn.Sequential(*hidden) if hidden else None
        self.head_features = width
        self.dropout = nn.Dropout(cfg.drop_rate) if cfg.drop_rate > 0 else None
        self.fc = nn.Linear(width, cfg.num_classes) if cfg.num_classes > 0 else None
        init_weights(self)

    # construction helpers -------------------------------------------------------------------
    def _add_block(self, name: str, in_c: int, widths: tuple[int, ...], **kw) -> XceptionBlock:
        cfg = self.config
        try:
            block = XceptionBlock(
                in_c, widths, cfg, residual=kw.pop("residual", cfg.residual), **kw
            )
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        self.add_module(name, block)
        self.block_names.append(name)
        return block

    @staticmethod
    def _make_pool(pooling: str | None) -> nn.Module | None:
        if pooling == "avg":
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        if pooling == "max":
            return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1))
        return None

    # API -----------------------------------------------------------------------------------
    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Maps at strides 2, 4, 8, 16, 32 (capped by output_stride); see `feature_info`."""
        self.check_input(x)
        self.check_dtype(x)
        wanted = {info["module"] for info in self.feature_info}
        maps, size = [], x.shape[-2:]
        for name in self.block_names:
            x = self._named_block(name, x, size)
            if name in wanted:
                maps.append(x)
        return maps

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, *, pooling: str | None = "keep"
    ) -> None:
        """A fresh classifier for `num_classes` classes (0 = none); hidden FC layers are kept.
        `global_pool` is timm's argument: 'avg', 'max', '' for no pooling, None to keep the
        model's (positional too: `reset_classifier(0, None)` had dropped the pooling).
        `pooling` is the config's spelling ('avg', 'max', None for none; 'keep')."""
        num_classes = _as_int(num_classes)
        if global_pool is not None:
            if pooling != "keep":
                raise ValueError("give global_pool (timm's name) or pooling, not both")
            if global_pool not in ("avg", "max", ""):  # not the config's words: None keeps
                raise ValueError(f"global_pool={global_pool!r} is not valid: use 'avg', 'max', "
                                 "'' (no pooling) or None (keep the model's)")  # fmt: skip
            pooling = global_pool or None  # '' is timm's "no pooling"
        if pooling == "":
            pooling = None
        if pooling == "keep":
            pooling = self.config.pooling
            # The config's own message would say num_classes=0, not how to get a classifier.
            if pooling is None and isinstance(num_classes, int) and num_classes > 0:
                raise ValueError(
                    f"reset_classifier({num_classes}): this model has no global pooling "
                    "(pooling=None): pass pooling='avg' (or 'max') for a classifier"
                )
        self.config = self.config.replace(num_classes=num_classes, pooling=pooling)
        self.global_pool = self._make_pool(pooling)
        self._new_classifier(self.head_features, num_classes)


def default_image_size(model: nn.Module) -> int:
    """The image size a model without weights metadata is fed: 28 px for a compact model (its
    stem does not downsample: Fashion-MNIST-sized input; the compact Inception V3 is built for
    28-64 px), the paper's 299 for every other."""
    compact = getattr(getattr(model, "config", None), "stem_stride", 2) == 1
    return 28 if compact or getattr(model, "small_images", False) else 299


def input_size_pair(input_size: tuple[int, int] | int) -> tuple[int, int]:
    """(height, width) from one size or a pair, as `count_macs`, `summary` and deploy's export
    take it; anything else is refused by name (299 failed in tuple unpacking, timm's
    (3, 299, 299) was taken for a wrong channel count, a float or True failed in the tracer)."""
    sizes = (input_size, input_size) if not isinstance(input_size, tuple | list) else input_size
    try:
        if len(sizes) != 2 or any(isinstance(s, bool) for s in sizes):
            raise TypeError
        h, w = (operator.index(s) for s in sizes)  # whole numbers, numpy's included
    except TypeError:
        h = w = 0
    if min(h, w) < 1:
        raise ValueError(f"input_size={input_size!r}: give the image height and width in pixels, "
                         "as one whole number or a pair, e.g. 299 or (299, 299)")  # fmt: skip
    return h, w


class FeatureInfo(list):
    """A features-only model's `feature_info`: one dict per map it returns (`module`,
    `channels`, `stride`, and timm's names for the last two, `num_chs` and `reduction`), with
    timm's accessors over them: every map's value, or with `idx` (an index or a list of them,
    negative from the end) the chosen ones', as `feature_info.channels(-1)` sizes a neck."""

    def __init__(self, infos=()) -> None:
        super().__init__({**f, "num_chs": f["channels"], "reduction": f["stride"]} for f in infos)

    def _rows(self, idx):
        return list(self) if idx is None else [self[i] for i in idx]

    def _get(self, key: str, idx):
        if idx is None or isinstance(idx, tuple | list):
            return [f[key] for f in self._rows(idx)]
        return self[idx][key]

    def channels(self, idx=None) -> list[int] | int:
        return self._get("channels", idx)

    def reduction(self, idx=None) -> list[int] | int:
        return self._get("stride", idx)

    def module_name(self, idx=None) -> list[str] | str:
        return self._get("module", idx)

    def get_dicts(self, keys=None, idx=None) -> list[dict] | dict:
        """timm's: the maps' dicts (each cut to `keys` when given); one dict for an int idx."""

        def cut(f: dict) -> dict:
            return dict(f) if keys is None else {k: f[k] for k in keys}

        if idx is None or isinstance(idx, tuple | list):
            return [cut(f) for f in self._rows(idx)]
        return cut(self[idx])


class XceptionFeatures(nn.Module):
    """An Xception cut down to a backbone, as timm's `features_only=True` gives one: a call
    returns the list of feature maps at `out_indices` of the model's `feature_info` (0 = stride
    2 ... 4 = stride 32; negative counts from the end; a number n, as in timm: the last n
    maps), the blocks past the last of them and the head dropped. The blocks are the model's
    own modules (shared, not copied), under their names, so the weights' names are unchanged."""

    def __init__(self, model: Xception, out_indices=(0, 1, 2, 3, 4)) -> None:
        super().__init__()
        if not isinstance(model, Xception):
            raise TypeError(f"XceptionFeatures takes an Xception model, got {type(model).__name__}")
        infos, n = model.feature_info, len(model.feature_info)
        count = _as_int(out_indices) if getattr(out_indices, "ndim", 0) == 0 else out_indices
        if isinstance(count, int) and not isinstance(count, bool):
            # timm's meaning of a number (numpy's or torch's too): the last `count` maps.
            if not 1 <= count <= n:
                raise ValueError(f"out_indices={out_indices!r} is not valid: a number n takes "
                                 f"the last n of the model's {n} feature maps, 1 to {n}; give "
                                 "a tuple for chosen maps, e.g. (1, 2, 3, 4) or (3,)")  # fmt: skip
            out_indices = tuple(range(n - count, n))
        try:
            indices = [_as_int(i) for i in out_indices]
        except TypeError:
            indices = [None]
        if (not indices or any(isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n
                               for i in indices)):  # fmt: skip
            raise ValueError(f"out_indices={out_indices!r} is not valid: give indices of the "
                             f"model's {n} feature maps, 0 to {n - 1} (strides "
                             f"{', '.join(str(f['stride']) for f in infos)}), e.g. (1, 2, 3, 4)")  # fmt: skip
        indices = [i % n for i in indices]
        if indices != sorted(set(indices)):
            raise ValueError(f"out_indices={out_indices!r} is not valid: give each map once, "
                             "shallow to deep, e.g. (1, 2, 3, 4)")  # fmt: skip
        self.config, self.min_input_size = model.config, model.min_input_size
        self.out_indices = tuple(indices)
        self.feature_info = FeatureInfo(dict(infos[i]) for i in indices)
        last = model.block_names.index(self.feature_info[-1]["module"])
        self.block_names = model.block_names[: last + 1]
        for name in self.block_names:
            self.add_module(name, getattr(model, name))
        self.weights_meta = getattr(model, "weights_meta", None)

    # The full model's own: its input checks, its input (with no classifier), and its
    # feature_maps, which return the maps this model's feature_info names.
    check_input = BlockNet.check_input
    check_dtype = BlockNet.check_dtype
    pretrained_cfg = BlockNet.pretrained_cfg
    default_cfg = BlockNet.default_cfg
    grad_checkpointing = False
    set_grad_checkpointing = BlockNet.set_grad_checkpointing
    _block = BlockNet._block
    _named_block = BlockNet._named_block
    forward = Xception.feature_maps


def count_macs(
    model: nn.Module, input_size: tuple[int, int] | int, in_chans: int | None = None
) -> int:
    """Multiply-accumulates of one forward pass on one image, counted over convs and Linears.
    `input_size` is (height, width) or one size for both. `in_chans` defaults to the model's
    own (`config.in_chans`; 3 for a model without config)."""
    input_size = input_size_pair(input_size)
    if in_chans is None:
        in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    replica = meta_copy(model)
    for m in replica.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        replica(torch.zeros(1, in_chans, *input_size, device="meta", dtype=dtype))
    return total


# Where nn.Module keeps forward and backward hooks (with their per-hook flags).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")  # fmt: skip


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device, in eval mode: its shapes without its memory or
    arithmetic (so `summary` and `count_macs` take any input size at once, and never run or
    hook the model itself). Its weights are not copied: each is stood for by a meta tensor of
    its shape, dtype and requires_grad. The caller's forward and backward hooks are left
    behind, never copied: a hook that records features, say, has no business with a shape
    computation, and what it holds (recorded maps, a lock) may be big or not copyable."""
    memo: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    for m in model.modules():  # deepcopy takes these empty dicts for the hook dicts
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if isinstance(hooks, dict):
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(model, memo).eval()


def summary(model: Xception, input_size: tuple[int, int] | int) -> list[dict]:
    """One row per block: name, output shape (C, H, W), trainable parameters. `input_size` is
    (height, width) or one size for both."""
    input_size = input_size_pair(input_size)
    rows = []
    replica = meta_copy(model)  # trainable flags and all, whatever the size
    x = torch.zeros(1, model.config.in_chans, *input_size, device="meta",
                    dtype=next(model.parameters()).dtype)  # fmt: skip
    with torch.no_grad():
        replica.check_input(x)
        for name in replica.block_names:
            block = getattr(replica, name)
            x = block(x)
            params = sum(q.numel() for q in block.parameters() if q.requires_grad)
            rows.append(dict(name=name, shape=tuple(x.shape[1:]), params=params))
        head = [m for m in (replica.fc_hidden, replica.fc) if m is not None]
        x = replica.forward_head(x)
        params = sum(q.numel() for m in head for q in m.parameters() if q.requires_grad)
        rows.append(dict(name="head", shape=tuple(x.shape[1:]), params=params))
    return rows
