"""Named presets, `create_model` and `list_models`.

Each preset is a small set of `XceptionConfig` overrides, so `create_model(name, **overrides)`
can change any field. `inception-v3` is torchvision's Inception V3 behind the same factory, the
paper's baseline for side-by-side comparisons.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path

from torch import nn

from .model import Xception, XceptionConfig

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "create_model", "list_models", "model_config"]

# Compact variants keep the paper's topology (entry flow, middle flow, exit flow) with a stem
# that does not downsample and fewer channels, for 28-64 pixel images trained on a CPU.
_COMPACT = dict(
    stem_stride=1,
    stem_padding="same",
    stem_channels=(32, 64),
    entry_channels=(64, 128, 256),
    middle_blocks=4,
    exit_channels=384,
    head_channels=(512, 768),
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
}  # fmt: skip


def list_models(pattern: str | None = None) -> list[str]:
    """Names accepted by `create_model`, optionally filtered by a substring."""
    return sorted(n for n in PRESETS if pattern is None or pattern in n)


def _check_name(name: str) -> None:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else "see xception.list_models()"
        raise ValueError(f"unknown model {name!r}: {hint}")


def model_config(name: str, **overrides) -> XceptionConfig:
    """The `XceptionConfig` of preset `name` with `overrides` applied."""
    _check_name(name)
    if name == "inception-v3":
        raise ValueError("inception-v3 is torchvision's model and has no XceptionConfig")
    fields = {f.name for f in dataclasses.fields(XceptionConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {name}: valid options are "
            f"{', '.join(sorted(fields))}"
        )
    return XceptionConfig(**{**PRESETS[name][1], **overrides})


def _inception_v3(num_classes: int, **overrides) -> nn.Module:
    from torchvision.models import inception_v3

    allowed = {"drop_rate": "dropout"}
    unknown = sorted(set(overrides) - set(allowed) - {"in_chans"})
    if unknown or overrides.get("in_chans", 3) != 3:
        raise ValueError(
            f"inception-v3 accepts only num_classes and drop_rate (got {', '.join(unknown) or 'in_chans'})"
        )
    kw = {allowed[k]: v for k, v in overrides.items() if k in allowed}
    return inception_v3(
        weights=None, aux_logits=False, init_weights=True, num_classes=num_classes, **kw
    )


def create_model(
    name: str, *, num_classes: int = 1000, weights: str | Path | None = None, **overrides
) -> nn.Module:
    """Build a model by preset name, optionally loading weights from a file.

    `weights` may be a Keras .h5 file, a .safetensors file or a PyTorch state dict (.pth/.pt; ours,
    timm's or Cadene's names). A timm/Cadene file selects that port's symmetric padding and BN
    epsilon unless `padding`/`bn_eps` are given.
    """
    from . import weights as W

    _check_name(name)
    data = W.load_file(weights) if weights is not None else None
    if name == "inception-v3":
        model = _inception_v3(num_classes, **overrides)
        if data is not None:
            if W.detect_format(data) == "keras":
                raise W.WeightsError(f"{weights}: Keras Inception V3 files are not supported")
            model.load_state_dict(data)
        return model
    if data is not None and W.detect_format(data) == "timm":
        for key, value in (("padding", "symmetric"), ("bn_eps", 1e-5)):
            if key not in overrides:
                overrides[key] = value
                log.info("timm/Cadene weights: using %s=%r as that port does", key, value)
    model = Xception(model_config(name, num_classes=num_classes, **overrides))
    if data is not None:
        W.load_into(model, data, source=str(weights))
    return model
