"""Named presets, `create_model` and `list_models`.

Each preset is a small set of `XceptionConfig` overrides, so `create_model(name, **overrides)`
can change any field. `inception-v3` is torchvision's Inception V3 behind the same factory, the
paper's baseline for side-by-side comparisons; `inception-v3-compact` (`xception.inception`) is
its compact counterpart for small images, with `InceptionConfig` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .model import (
    Xception,
    XceptionConfig,
    XceptionFeatures,
    check_dtype,
    check_images,
    timm_data_config,
)

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "create_model", "list_models", "model_config"]

# Compact variants keep the paper's topology (entry flow, middle flow, exit flow) with a stem
# that does not downsample and fewer channels, for 28-64 pixel images trained on a CPU. Widths
# were sized for accuracy per CPU-second at 28x28: the stem and block2 run at full resolution and
# cost the most, so they are narrowest; blocks at 4x4 and 2x2 are cheap, so they stay wide.
_COMPACT = dict(
    stem_stride=1,
    stem_padding="same",
    stem_channels=(16, 32),
    entry_channels=(48, 96, 192),
    middle_blocks=3,
    exit_channels=256,
    head_channels=(384, 512),
    bn_momentum=0.1,
)

PRESETS: dict[str, tuple[str, dict]] = {
    "xception": ("the paper's Xception (Figure 5), 299x299 input", {}),
    "xception-nonresidual": ("Xception without residual connections (Figure 9)",
                             dict(residual=False)),
    "xception-mid-relu": ("ReLU between depthwise and pointwise (Figure 10)",
                          dict(mid_activation="relu")),
    "xception-mid-elu": ("ELU between depthwise and pointwise (Figure 10)",
                         dict(mid_activation="elu")),
    "xception-pointwise-first": ("pointwise 1x1 before the spatial conv ('extreme Inception')",
                                 dict(order="pointwise_first")),
    "xception-fc": ("Xception with two 4096-unit FC layers before the classifier (JFT runs)",
                    dict(fc_layers=(4096, 4096))),
    "xception-compact": ("compact Xception for 28-64 px images (CPU training)", _COMPACT),
    "xception-compact-nonresidual": ("compact Xception without residual connections",
                                     dict(_COMPACT, residual=False)),
    "inception-v3": ("torchvision's Inception V3 (the paper's baseline), 299x299 input", {}),
    # Width 0.2 matches xception-compact's parameter count (0.92M against 0.91M, 10 classes).
    "inception-v3-compact": ("compact Inception V3 for 28-64 px images, sized like xception-compact",
                             dict(width=0.2)),
}  # fmt: skip


def list_models(filter: str | Sequence[str] | None = None, *, pattern=None) -> list[str]:  # noqa: A002 (timm's name)
    """Names accepted by `create_model`, optionally filtered by a substring (any case), or by
    shell wildcards matching the whole name as timm's `list_models('*xception*')` does; a list
    of them gives the names any of them matches, as timm's does. `pattern` is the older name."""
    if pattern is not None:
        if filter is not None:
            raise TypeError("give filter (timm's name) or pattern, not both")
        filter = pattern
    if filter is None:
        return sorted(PRESETS)
    if isinstance(filter, list | tuple | set):  # each a str: timm's list of patterns
        return sorted({n for one in filter for n in list_models(one)})
    if not isinstance(filter, str):
        raise TypeError(f"list_models({filter!r}): give a name part or pattern (a str), or a "
                        "list of them")  # fmt: skip
    pattern = filter.lower()
    if any(c in pattern for c in "*?["):
        return sorted(fnmatch.filter(PRESETS, pattern))
    return sorted(n for n in PRESETS if pattern in n)


# weights.py's formats, named here (zoo imports weights lazily)
INCEPTION_MIN_SIZE = 75  # torchvision's Inception V3: its stem and pools need 75x75 pixels
_WEIGHT_SUFFIXES = (".h5", ".hdf5", ".keras", ".safetensors", ".pth", ".pt", ".bin", ".ckpt",
                    ".pth.tar")  # fmt: skip


def _check_name(name: str) -> None:
    if name not in PRESETS:
        if name.lower().endswith(_WEIGHT_SUFFIXES) or "/" in name:
            raise ValueError(f"unknown model {name!r}: that is a weights file, not a model name; "
                             "give it as weights (--weights in the CLI; a safetensors file from "
                             "`xception convert` restores its own model)")  # fmt: skip
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = (f"did you mean {', '.join(close)}?" if close else
                "the names are in xception.list_models() (`xception models` in the CLI)")  # fmt: skip
        raise ValueError(f"unknown model {name!r}: {hint}")


def _check_fields(name: str, config_class: type, overrides: dict) -> set[str]:
    """The config's field names; an override that is not one of them is an error naming it."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {name}: valid options are "
            f"{', '.join(sorted(fields))}{_pretrained_hint(name, unknown)}"
        )
    return fields


def _pretrained_hint(name: str, unknown) -> str:
    """timm's `pretrained=True` is our `weights=`, which is not a config field: say so."""
    if "pretrained" not in unknown:
        return ""
    if name == "xception":  # the only preset with official (Keras ImageNet) weights
        return "; for pretrained weights pass weights='imagenet' (or a weights file) instead"
    return f"; for pretrained weights pass weights= a weights file for {name} instead"


def model_config(name: str, **overrides) -> XceptionConfig:
    """The `XceptionConfig` of preset `name` with `overrides` applied."""
    _check_name(name)
    if name == "inception-v3":
        raise ValueError("inception-v3 is torchvision's model and has no XceptionConfig")
    if name == "inception-v3-compact":
        raise ValueError("inception-v3-compact is not an Xception: see xception.inception")
    _check_fields(name, XceptionConfig, overrides)
    return XceptionConfig(**{**PRESETS[name][1], **overrides})


def _inception_v3(num_classes: int, **overrides) -> nn.Module:
    from torchvision.models import inception_v3

    unknown = sorted(set(overrides) - {"drop_rate", "in_chans"})
    if unknown or overrides.get("in_chans", 3) != 3:
        raise ValueError(
            "inception-v3 accepts only num_classes and drop_rate (got "
            f"{', '.join(unknown) or 'in_chans'}), and transform_input with weights"
            + _pretrained_hint("inception-v3", unknown)
        )
    from .inception import InceptionConfig

    # Checked by the model configs' shared checks: torchvision took -1 or True for num_classes
    # deep inside nn.Linear, and drop_rate=1.0 (every feature dropped) silently.
    cfg = InceptionConfig(num_classes=num_classes, drop_rate=overrides.get("drop_rate", 0.5))
    # No transform_input: torchvision's ImageNet file gets it folded into its first conv
    # (`weights.torchvision_to_state_dict`), so that what the model computes is in its weights.
    model = inception_v3(weights=None, aux_logits=False, init_weights=True,
                         num_classes=max(cfg.num_classes, 1), dropout=cfg.drop_rate,
                         transform_input=False)  # fmt: skip
    if num_classes == 0:  # pooled features out, as Xception's num_classes=0 gives
        model.fc = _NoClassifier()
    model.register_forward_pre_hook(_check_inception_input)
    return model


def _inception_v3_from(opened, num_classes: int, wants_file_head: bool,
                       transform_input: bool | None = None, **overrides) -> nn.Module:  # fmt: skip
    """The inception-v3 preset with `opened` weights (or none). `transform_input`: whether a
    torchvision file was trained behind torchvision's transform_input (its ImageNet file was),
    which is then folded into the first conv; None guesses it from the file's auxiliary head,
    which torchvision's ImageNet file has and a file saved from this preset has not. A file
    saved with aux_logits=False, or one trained from scratch, needs it said."""
    from . import weights as W

    if transform_input is not None and (not isinstance(transform_input, bool) or opened is None):
        raise ValueError(f"transform_input={transform_input!r}: say with True or False, and "
                         "weights=FILE, whether a torchvision Inception V3 file was trained "
                         "behind torchvision's transform_input (its ImageNet file was)")  # fmt: skip
    model = _inception_v3(num_classes, **overrides)
    model.weights_meta = None
    if opened is not None:
        torchvision = opened.format == "torchvision"
        fold = torchvision if transform_input is None else transform_input
        if torchvision or fold:
            data = W.torchvision_to_state_dict(opened.data, opened.source, fold=fold)
            meta = opened.meta if torchvision else W.file_meta("torchvision", opened.num_classes,
                                                               Path(opened.source))  # fmt: skip
            opened = dataclasses.replace(opened, data=data, meta=meta)
        head_loaded = _load_state(model, opened, "inception-v3", new_head=not wants_file_head)
        # torchvision's model takes RGB only (in_chans other than 3 is refused).
        model.weights_meta = W.meta_for_head(opened, head_loaded, num_classes, 3)
    # timm's pipeline reads it (BlockNet's property, for the other presets): without it timm
    # prepared images at 224 px, bicubic, for weights that take 299.
    meta = W.input_meta(model)
    model.pretrained_cfg = timm_data_config(model, meta.input_size, meta.crop_fraction,
                                            meta.interpolation, meta.mean, meta.std,
                                            num_classes)  # fmt: skip
    model.default_cfg = model.pretrained_cfg  # timm's older name for it
    return model


def _check_inception_input(model: nn.Module, args: tuple) -> None:
    """The checks every other preset makes of its input, for torchvision's Inception V3: uint8
    pixels, a grey batch, a numpy array or 74 px failed inside its convs with torch's words."""
    if args:
        # Its in_chans is 3, always: "set in_chans" was advice the preset then refused.
        check_images(args[0], 3, INCEPTION_MIN_SIZE,
                     channels_fix="inception-v3 takes RGB only: repeat a grey channel, "
                     "x.expand(-1, 3, -1, -1), or use inception-v3-compact, which takes in_chans")  # fmt: skip
        check_dtype(args[0], model)


class _NoClassifier(nn.Identity):
    """torchvision Inception V3's `fc` for num_classes=0 (its Linear(2048, 0) returned empty
    rows); `out_features` 0 tells code reading the class count from `fc` that there are none."""

    out_features = 0


def _inception_v3_compact(num_classes: int, opened, new_head: bool = False,
                          **overrides) -> nn.Module:  # fmt: skip
    from . import weights as W
    from .inception import InceptionConfig, InceptionV3Compact

    fields = _check_fields("inception-v3-compact", InceptionConfig, overrides)
    saved = {k: v for k, v in (opened.config if opened is not None else {}).items() if k in fields}
    config = {**PRESETS["inception-v3-compact"][1], **saved, **overrides}
    model = InceptionV3Compact(InceptionConfig(num_classes=num_classes, **config))
    model.weights_meta = None
    if opened is not None:
        head_loaded = _load_state(model, opened, "inception-v3-compact", new_head)
        model.weights_meta = W.meta_for_head(opened, head_loaded, num_classes,
                                             model.config.in_chans)  # fmt: skip
    return model


def _check_saved_config(name: str, opened) -> None:
    """The config an Xception file was saved with must be an XceptionConfig: one of the compact
    Inception's names the preset the file needs; fields this version does not know say so,
    rather than reading as options the user gave."""
    from .inception import InceptionConfig
    from .weights import WeightsError

    fields = {f.name for f in dataclasses.fields(XceptionConfig)}
    unknown = sorted(set(opened.config) - fields)
    if not unknown:
        return
    if set(opened.config) <= {f.name for f in dataclasses.fields(InceptionConfig)}:
        raise WeightsError(
            f"{opened.source}: inception-v3-compact weights, not {name}'s: use --model "
            "inception-v3-compact (create_model('inception-v3-compact', weights=...))"
        )
    raise WeightsError(
        f"{opened.source}: the model config saved in the file has field(s) "
        f"{', '.join(unknown)} that this version of xception does not know: it was written by "
        "a newer version (upgrade) or for another model"
    )


def _check_architecture(name: str, opened) -> None:
    """Inception V3 weights (torchvision's file, or one saved from the preset) for another
    preset are refused by what they are and the preset they need, before a model is built: the
    tensor-name mismatch alone says neither. (Xception files for the Inception presets are
    refused by `_load_state`, whose message names the preset.)"""
    from .weights import WeightsError, is_inception_v3

    inception_v3 = opened.format == "torchvision" or is_inception_v3(opened.data)
    if inception_v3 and name != "inception-v3":
        raise WeightsError(
            f"{opened.source}: Inception V3 weights (torchvision's layout), not {name}'s: use "
            "--model inception-v3 (create_model('inception-v3', weights=...))"
        )


def _load_state(model: nn.Module, opened, name: str, new_head: bool = False) -> bool:
    """Load `opened` into `model` exactly, or raise WeightsError in one line: which tensor
    names do not match (`weights.key_mismatch`), the first tensor of the wrong shape, or one
    holding NaN or infinite values. With `new_head` (the caller asked for another class count)
    a classifier of another shape is left out with a warning, as for Xception. Returns whether
    the file's classifier was loaded."""
    from .weights import WeightsError, check_finite, key_mismatch

    # BN's step counters are bookkeeping that `save_safetensors` leaves out: never required.
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    data = {k: v for k, v in opened.data.items() if not k.endswith("num_batches_tracked")}
    heads = [
        {k: tuple(v.shape) for k, v in sd.items() if k.startswith("fc.")} for sd in (own, data)
    ]
    if new_head and heads[0] != heads[1]:
        # The classifier's tensors are left out; a name the model's classifier does not have
        # (a pruned layer's weight_orig) stays, for key_mismatch to name, as in load_into.
        data = {k: v for k, v in data.items()
                if not k.startswith("fc.") or (heads[0] and k not in heads[0])}  # fmt: skip
        own = {k: v for k, v in own.items() if not k.startswith("fc.")}
        classes = getattr(model.fc, "out_features", 0)  # None or no classifier: 0
        if classes:
            log.warning("%s: classifier not loaded (its class count differs); the model keeps "
                        "a freshly initialised head for %d classes", opened.source, classes)  # fmt: skip
        else:
            log.info("%s: classifier left out (the model has none: num_classes=0)", opened.source)
    if mismatch := key_mismatch(own, data):
        raise WeightsError(f"{opened.source}: not {name} weights ({mismatch}): use weights "
                           f"saved from {name}, or the --model they were made for")  # fmt: skip
    for key, tensor in own.items():
        if tuple(data[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{opened.source}: not {name} weights for this config ({key} has shape "
                f"{tuple(data[key].shape)}, the model's {tuple(tensor.shape)}): check "
                "--num-classes and the config the weights were made with"
            )
    check_finite(data, opened.source)
    model.load_state_dict(data, strict=False)  # every other key checked just above
    return any(k.startswith("fc.") for k in own)


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    progress: bool = True,
    features_only: bool = False,
    out_indices=None,
    global_pool: str | None = None,
    **overrides,
) -> nn.Module:
    """Build a model by preset name, optionally with weights.

    `weights` is a name from `xception.weights.WEIGHTS` ("imagenet", "imagenet-notop": the
    official Keras files, downloaded into a verified cache) or a file: Keras .h5, .safetensors,
    or a PyTorch state dict (.pth/.pt; ours, timm's or Cadene's names; for inception-v3,
    torchvision's ImageNet file, its `transform_input` folded into the first conv). A
    timm/Cadene file selects that port's symmetric padding and BN epsilon, a file's first conv
    sets `in_chans`, and our safetensors files restore the config they were saved with, unless
    the fields are given in `overrides`.

    Classifier rule: leaving `num_classes` out asks for the weights' own classifier: the model
    gets its class count (none for weights without one; 1000 without weights) and it must load,
    else WeightsError. A `num_classes` that differs from the weights' asks for a new head: the
    backbone loads, the head stays freshly initialised, and a warning says so. The weights'
    metadata (class names, preprocessing) is `model.weights_meta`. `progress` shows a
    download's progress bar on stderr.

    timm's arguments, for the Xception presets: `features_only=True` gives a backbone
    (`XceptionFeatures`) whose call returns the feature maps at `out_indices` (0 = stride 2 ...
    4 = stride 32; all five by default), with `feature_info.channels()` and `.reduction()`; `global_pool` is the
    `pooling` field by timm's name ('avg', 'max', or '' for none, with `num_classes=0`).
    """
    from . import weights as W

    _check_name(name)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices picks the maps of a backbone: pass features_only=True too")
    if features_only or global_pool is not None:
        if name in ("inception-v3", "inception-v3-compact"):
            given = "features_only" if features_only else "global_pool"
            raise ValueError(f"{given} is offered for the Xception presets, not {name}")
        if global_pool is not None:
            if "pooling" in overrides:
                raise ValueError("give global_pool (timm's name) or pooling, not both")
            if global_pool not in ("avg", "max", ""):
                raise ValueError(f"global_pool={global_pool!r} is not valid: use 'avg', 'max' "
                                 "or '' (no pooling, with num_classes=0)")  # fmt: skip
            if global_pool == "" and num_classes != 0 and not features_only:
                raise ValueError("global_pool='' (no pooling) returns feature maps, with no "
                                 "classifier: pass num_classes=0 too")  # fmt: skip
            if not features_only:  # a backbone has no head to pool for
                overrides["pooling"] = global_pool or None
    if features_only:
        # The backbone of the model the weights make, head and all, so the classifier rule
        # and the weights' checks are the same as without it; the head is then dropped.
        model = create_model(name, num_classes=num_classes, weights=weights, progress=progress,
                             **overrides)  # fmt: skip
        return XceptionFeatures(model, (0, 1, 2, 3, 4) if out_indices is None else out_indices)
    inception = name in ("inception-v3", "inception-v3-compact")
    # Before a download; torchvision's Inception file is not fetched: its entry says so.
    if (inception and isinstance(weights, str) and weights in W.WEIGHTS
            and W.WEIGHTS[weights].format != "torchvision"):  # fmt: skip
        raise W.WeightsError(
            f"weights {weights!r} are Xception's ({W.WEIGHTS[weights].description}) and do not "
            f"fit {name}: use the xception model (--model xception), or weights saved from {name}"
        )
    opened = W.open_weights(weights, progress=progress) if weights is not None else None
    if inception and opened is not None and opened.format == "keras":
        raise W.WeightsError(
            f"{weights}: Keras files are read as Xception's layers only, and {name} is not "
            f"Xception: give weights saved from {name} (.safetensors, .pth), or use --model "
            "xception for this file"
        )
    if opened is not None:
        _check_architecture(name, opened)
    wants_file_head = num_classes is None
    if num_classes is None:
        num_classes = opened.num_classes if opened is not None else 1000
    if name == "inception-v3":
        return _inception_v3_from(opened, num_classes, wants_file_head, **overrides)
    if name == "inception-v3-compact":
        return _inception_v3_compact(num_classes, opened, not wants_file_head, **overrides)
    if opened is not None:
        _check_saved_config(name, opened)
        for key, value in opened.config.items():
            if key not in overrides:
                overrides[key] = value
                log.debug("weights %s: using %s=%r", opened.source, key, value)
    model = Xception(model_config(name, num_classes=num_classes, **overrides))
    model.weights_meta = None
    if opened is not None:
        W.load_weights(model, opened, require_head=wants_file_head and num_classes > 0)
    return model
