"""Weights in and out: Keras HDF5 (the official ImageNet files' legacy layout), timm/Cadene
PyTorch state dicts, and our own safetensors.

Every format is turned into our state dict by a short, explicit name map, then checked shape by
shape against the model so a mismatch names the layer. Loading never executes code from a file:
safetensors, or `torch.load(weights_only=True)` with no fallback.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "WeightsError",
    "detect_format",
    "keras_to_state_dict",
    "load_file",
    "load_into",
    "read_keras_h5",
    "timm_to_state_dict",
]

PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
BN_KERAS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
            "moving_variance": "running_var"}  # fmt: skip
BN_TORCH = ("weight", "bias", "running_mean", "running_var")


class WeightsError(ValueError):
    """A weights file that cannot be used: unreadable, unsafe, or not fitting the model."""


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Layers of a Keras HDF5 weights file in the legacy layout, in file order:
    {layer_name: {short_weight_name: array}} with 'kernel:0' and 'layer/kernel' both read as
    'kernel'. Full-model files (a `model_weights` group) are read too."""
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise WeightsError(
            f"{path}: not a readable HDF5 file ({err}); a Keras weights file (.h5) is expected"
        ) from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise WeightsError(
                f"{path}: HDF5 file without 'layer_names': not a Keras weights file in the "
                "legacy layout (save it with model.save_weights('x.weights.h5') from Keras 2, or "
                "keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group)"
            )
        layers: dict[str, dict[str, np.ndarray]] = {}
        for name in map(_text, root.attrs["layer_names"]):
            group = root[name]
            weights = {}
            for wname in map(_text, group.attrs.get("weight_names", [])):
                short = wname.split("/")[-1].split(":")[0]
                weights[short] = np.asarray(group[wname])
            if weights:
                layers[name] = weights
        return layers


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint-like object, without a DDP `module.` prefix."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: no state dict of tensors found in the file")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_file(path: str | Path) -> dict[str, torch.Tensor] | dict[str, dict[str, np.ndarray]]:
    """Read a weights file without executing anything from it.

    Returns a torch state dict for .safetensors/.pth/.pt/.bin/.ckpt, or the Keras layer dict
    for .h5/.hdf5 (see `read_keras_h5`)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5", ".keras"):
        return read_keras_h5(path)
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    if suffix in PTH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
            raise WeightsError(
                f"{path}: refused to load: the file holds pickled objects other than tensors "
                f"({first}). Nothing from it was run. Convert it in a trusted environment to "
                "safetensors, or re-save a plain state dict of tensors"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: not a readable PyTorch file ({err})") from None
        return _unwrap(obj, path)
    raise WeightsError(
        f"{path}: unknown weights format {suffix!r}: use .h5 (Keras), .safetensors, or "
        ".pth/.pt (PyTorch state dict)"
    )


def detect_format(weights: Mapping) -> str:
    """'keras', 'timm' (timm's legacy_xception and Cadene's port) or 'xception' (ours)."""
    if weights and all(isinstance(v, Mapping) for v in weights.values()):
        return "keras"
    if "block1.rep.0.conv1.weight" in weights or "conv3.conv1.weight" in weights:
        return "timm"
    return "xception"


# ---------------------------------------------------------------------------------------------
# Name maps
# ---------------------------------------------------------------------------------------------
def _shortcut_blocks(model: nn.Module) -> list[str]:
    return [
        n for n in model.block_names if getattr(getattr(model, n), "shortcut", None) is not None
    ]


def keras_to_state_dict(
    layers: Mapping[str, Mapping[str, np.ndarray]], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Keras layers -> our state dict. Named layers map by name (`block2_sepconv1_bn` ->
    `block2.sepconv1_bn`); the shortcut conv/BN layers Keras leaves unnamed map by order."""
    sd: dict[str, torch.Tensor] = {}
    unnamed_convs, unnamed_bns = [], []
    t = torch.from_numpy
    for name, w in layers.items():
        if set(w) == set(BN_KERAS):
            m = re.fullmatch(r"(block\d+)_(conv\d+)_bn", name)
            if m:
                prefix = f"{m[1]}.{m[2]}.bn"
            elif re.fullmatch(r"block\d+_sepconv\d+_bn", name):
                prefix = name.replace("_", ".", 1)
            else:
                unnamed_bns.append(w)
                continue
            for k, v in BN_KERAS.items():
                sd[f"{prefix}.{v}"] = t(w[k].copy())
        elif set(w) == {"depthwise_kernel", "pointwise_kernel"}:
            prefix = name.replace("_", ".", 1)
            sd[f"{prefix}.spatial.weight"] = t(w["depthwise_kernel"].transpose(2, 3, 0, 1).copy())
            sd[f"{prefix}.pointwise.weight"] = t(w["pointwise_kernel"].transpose(3, 2, 0, 1).copy())
        elif set(w) == {"kernel"} and w["kernel"].ndim == 4:
            m = re.fullmatch(r"(block\d+)_(conv\d+)", name)
            kernel = t(w["kernel"].transpose(3, 2, 0, 1).copy())
            if m:
                sd[f"{m[1]}.{m[2]}.conv.weight"] = kernel
            else:
                unnamed_convs.append(kernel)
        elif set(w) == {"kernel", "bias"} and name == "predictions":
            sd["fc.weight"] = t(w["kernel"].T.copy())
            sd["fc.bias"] = t(w["bias"].copy())
        else:
            raise WeightsError(
                f"Keras layer {name!r} with weights {sorted(w)} has no counterpart in Xception"
            )
    blocks = _shortcut_blocks(model)
    if len(unnamed_convs) != len(blocks) or len(unnamed_bns) != len(blocks):
        raise WeightsError(
            f"the file has {len(unnamed_convs)} unnamed shortcut convs and {len(unnamed_bns)} "
            f"unnamed batch norms; the model has {len(blocks)} shortcuts ({', '.join(blocks)})"
        )
    for block, kernel, bn in zip(blocks, unnamed_convs, unnamed_bns, strict=True):
        sd[f"{block}.shortcut.conv.weight"] = kernel
        for k, v in BN_KERAS.items():
            sd[f"{block}.shortcut.bn.{v}"] = t(bn[k].copy())
    return sd


def _timm_name_map(model: nn.Module) -> dict[str, str]:
    """Our prefix -> timm prefix, derived from timm's Block layout (ReLUs take slots in `rep`)."""
    names = {
        "block1.conv1.conv": "conv1", "block1.conv1.bn": "bn1",
        "block1.conv2.conv": "conv2", "block1.conv2.bn": "bn2", "fc": "fc",
    }  # fmt: skip
    blocks = model.block_names
    for timm_index, ours in enumerate(blocks[1:-1], start=1):
        block = getattr(model, ours)
        slot = 0
        for i in range(1, block.num_convs + 1):
            if hasattr(block, f"sepconv{i}_act"):
                slot += 1
            names[f"{ours}.sepconv{i}.spatial"] = f"block{timm_index}.rep.{slot}.conv1"
            names[f"{ours}.sepconv{i}.pointwise"] = f"block{timm_index}.rep.{slot}.pointwise"
            names[f"{ours}.sepconv{i}_bn"] = f"block{timm_index}.rep.{slot + 1}"
            slot += 2
        names[f"{ours}.shortcut.conv"] = f"block{timm_index}.skip"
        names[f"{ours}.shortcut.bn"] = f"block{timm_index}.skipbn"
    last = blocks[-1]
    for i, (conv, bn) in enumerate((("conv3", "bn3"), ("conv4", "bn4")), start=1):
        names[f"{last}.sepconv{i}.spatial"] = f"{conv}.conv1"
        names[f"{last}.sepconv{i}.pointwise"] = f"{conv}.pointwise"
        names[f"{last}.sepconv{i}_bn"] = bn
    return names


def timm_to_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm `legacy_xception` / Cadene `xception` state dict -> ours."""
    sd = {("fc." + k[len("last_linear.") :] if k.startswith("last_linear.") else k): v
          for k, v in sd.items()}  # fmt: skip
    reverse = {theirs: ours for ours, theirs in _timm_name_map(model).items()}
    out, unknown = {}, []
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        prefix, _, leaf = key.rpartition(".")
        if prefix not in reverse:
            unknown.append(key)
            continue
        if value.ndim == 2 and prefix.endswith("pointwise"):  # Cadene's original export
            value = value[:, :, None, None]
        out[f"{reverse[prefix]}.{leaf}"] = value
    if unknown:
        raise WeightsError(
            f"{len(unknown)} timm weights have no place in this model (first: {unknown[0]}); "
            "timm's legacy_xception only fits the paper's architecture"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Loading into a model
# ---------------------------------------------------------------------------------------------
def to_state_dict(weights: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
    fmt = detect_format(weights)
    if fmt == "keras":
        return keras_to_state_dict(weights, model)
    if fmt == "timm":
        return timm_to_state_dict(weights, model)
    return {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}


def load_into(
    model: nn.Module, weights: Mapping, *, source: str = "weights", require_head: bool = False
) -> dict[str, list[str]]:
    """Copy `weights` (any supported format, already read) into `model`, checking every shape.

    A classifier whose class count differs from the model's (or is absent) is skipped with a
    warning, leaving the model's fresh head, unless `require_head` is set. Returns the lists of
    skipped keys ('head') and of model keys the file did not provide ('missing_head')."""
    sd = to_state_dict(weights, model)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    head_prefixes = ("fc.",)
    skipped: list[str] = []
    for key in list(sd):
        if key.startswith(head_prefixes) and (key not in own or own[key].shape != sd[key].shape):
            if require_head:
                want = tuple(own[key].shape) if key in own else "no classifier"
                raise WeightsError(
                    f"{source}: classifier {key} has shape {tuple(sd[key].shape)}, the model "
                    f"has {want}: set num_classes to match the file, or load without the top"
                )
            skipped.append(key)
            del sd[key]
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    missing_head = [k for k in missing if k.startswith(head_prefixes)]
    missing = [k for k in missing if not k.startswith(head_prefixes)]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} model weights missing from the file (first: {missing[0]})"
            )
        if unexpected:
            parts.append(f"{len(unexpected)} file weights unknown to the model "
                         f"(first: {unexpected[0]})")  # fmt: skip
        raise WeightsError(
            f"{source} does not fit this model: {'; '.join(parts)}. Check the model name and "
            "its options (middle_blocks, segments, order, fc_layers, width)"
        )
    for key, value in sd.items():
        if tuple(value.shape) != tuple(own[key].shape):
            layer = key.rsplit(".", 1)[0]
            raise WeightsError(
                f"{source}: layer {layer} ({key}) has shape {tuple(value.shape)} in the file but "
                f"{tuple(own[key].shape)} in the model: the file was made for another "
                "configuration (check segments, order, width, in_chans)"
            )
    if missing_head or skipped:
        log.warning(
            "%s: classifier not loaded (%s); the model keeps a freshly initialised head for "
            "%d classes", source, "absent from the file" if missing_head and not skipped
            else "its class count differs", model.config.num_classes,
        )  # fmt: skip
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)
    return {"head": skipped, "missing_head": missing_head}
