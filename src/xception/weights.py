"""Weights in and out: Keras HDF5 (the official ImageNet files' legacy layout), timm/Cadene
PyTorch state dicts, torchvision's Inception V3 ImageNet file, and our own safetensors; named
weights with their metadata, downloaded into a verified cache.

Every format is turned into our state dict by a short, explicit name map, then checked shape by
shape against the model so a mismatch names the layer. Loading never executes code from a file:
safetensors, or `torch.load(weights_only=True)` with no fallback.

Named weights (`WEIGHTS`) are values in the torchvision manner: where the file lives, its hash,
its class names and the preprocessing it was trained with (`Weights.transforms()`), so a model
made from them can never be fed differently prepared images.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import json
import logging
import math
import os
import pickle
import re
import struct
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models._meta import _IMAGENET_CATEGORIES

from .checkpoint import atomic_write, default_mode
from .data import _INTERPOLATION, eval_transform, is_crop_fraction, is_number
from .model import _as_int
from .runtime import stderr_is_terminal

log = logging.getLogger(__name__)

__all__ = [
    "WEIGHTS",
    "OpenedWeights",
    "Weights",
    "WeightsError",
    "cache_dir",
    "check_channels",
    "detect_format",
    "download",
    "input_meta",
    "is_inception_v3",
    "keras_to_state_dict",
    "load_file",
    "load_into",
    "load_weights",
    "open_weights",
    "read_keras_h5",
    "read_safetensors_metadata",
    "safetensors_metadata",
    "save_safetensors",
    "timm_to_state_dict",
    "torchvision_to_state_dict",
]

PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Besides tensors, what PyTorch files may hold that is safe to rebuild: timm's train.py pickles
# its settings, an argparse.Namespace, into every checkpoint-N.pth.tar and model_best.pth.tar.
SAFE_PICKLED = (argparse.Namespace,)
BN_KERAS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
            "moving_variance": "running_var"}  # fmt: skip
BN_TORCH = ("weight", "bias", "running_mean", "running_var")
FORMATS = ("keras", "timm", "torchvision", "xception")  # the layouts detect_format tells apart


class WeightsError(ValueError):
    """A weights file that cannot be used: unreadable, unsafe, or not fitting the model."""


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Layers of a Keras weights file: {layer_name: {short_weight_name: array}}.

    Reads the legacy HDF5 layout (the official ImageNet files, Keras 2's `save_weights('x.h5')`,
    full-model `.h5` files with a `model_weights` group), where 'kernel:0' and 'layer/kernel' are
    both read as 'kernel', and Keras 3's own layout: `save_weights('x.weights.h5')`, and the
    weights inside a `.keras` archive (`model.save('x.keras')`)."""
    import h5py

    path = Path(path)
    source = _keras_archive_weights(path) if path.suffix.lower() == ".keras" else path
    try:
        f = h5py.File(source, "r")
    except OSError as err:
        raise WeightsError(
            f"{path}: not a readable HDF5 file ({err}); a Keras weights file (.h5) is expected"
        ) from None
    with f:
        try:
            return _read_keras_layers(f, path)
        except WeightsError:
            raise
        except (KeyError, RuntimeError, OSError, ValueError, TypeError, UnicodeError) as err:
            raise WeightsError(f"{path}: damaged, or not a Keras weights file ({err})") from None


def _keras_archive_weights(path: Path):
    """The weights file inside a Keras 3 `.keras` archive (a zip), as a file object for h5py."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return io.BytesIO(archive.read("model.weights.h5"))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as err:
        raise WeightsError(
            f"{path}: not a readable Keras archive ({err}): a .keras file saved by Keras 3's "
            "model.save() is expected; copy it again if it was cut short"
        ) from None


def _read_keras_layers(f, path: Path) -> dict[str, dict[str, np.ndarray]]:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
        if "layers" in root and "vars" in root:
            return _read_keras3_layers(root["layers"], path)
        raise WeightsError(
            f"{path}: HDF5 file with neither 'layer_names' (Keras 2) nor 'layers' (Keras 3): "
            "not a Keras weights file. Save the weights from Keras with "
            "model.save_weights('x.weights.h5')"
        )
    names = root.attrs["layer_names"]
    if isinstance(names, (str, bytes)):  # a list of names is expected, not one string
        raise ValueError("'layer_names' is not a list of layer names")
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name in map(_text, names):
        group = root[name]
        wnames = list(map(_text, group.attrs.get("weight_names", [])))
        if len({w.rsplit("/", 1)[0] for w in wnames if "/" in w}) > 1:
            # the weights of several layers under one: a model used as a layer, whose 'kernel'
            # and 'gamma' overwrote each other into a "layer with no counterpart"
            raise _nested_model(path, name)
        weights = {}
        for wname in wnames:
            short = wname.split("/")[-1].split(":")[0]
            weights[short] = np.asarray(group[wname])
        if weights:
            layers[name] = weights
    return layers


# Keras 3 stores a layer's variables by position, in the order the layer creates them.
_KERAS3_VARS = {
    "batch_normalization": tuple(BN_KERAS), "conv2d": ("kernel", "bias"),
    "separable_conv2d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "dense": ("kernel", "bias"),
}  # fmt: skip


def _read_keras3_layers(group, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Keras 3's layout: one group per layer, named after its class and numbered in the model's
    layer order (conv2d, conv2d_1, ...; h5py lists conv2d_10 before conv2d_2, so the numbers
    are sorted here: Keras' unnamed shortcut layers map by that order), with the layer's own
    name on its 'vars' group and the variables as datasets 0, 1, ..."""

    def position(key: str) -> tuple[str, int]:
        m = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
        return m[1], int(m[2] or 0)

    layers: dict[str, dict[str, np.ndarray]] = {}
    for key in sorted(group, key=position):
        if "layers" in group[key]:
            raise _nested_model(path, key)
        variables = group[key].get("vars")
        if variables is None or not len(variables):
            continue  # activations, pooling, additions
        if "name" not in variables.attrs:
            raise WeightsError(
                f"{path}: a Keras 3 file without layer names (written by an early Keras 3): "
                "load it in a current Keras and save it again with "
                "model.save_weights('x.weights.h5')"
            )
        kind = position(key)[0]
        names = _KERAS3_VARS.get(kind, ())
        arrays = [np.asarray(variables[i]) for i in sorted(variables, key=int)]
        layers[_text(variables.attrs["name"])] = {
            (names[i] if i < len(names) else f"{kind}_variable_{i}"): a
            for i, a in enumerate(arrays)
        }
    return layers


def _nested_model(path: Path, name: str) -> WeightsError:
    return WeightsError(
        f"{path}: the Keras model in this file holds another model ({name}), as when "
        "Xception is one layer of a Sequential: in Keras, save the Xception model's "
        "own weights (xception_model.save_weights('x.weights.h5'))"
    )


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint-like object, without wrapper prefixes."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: no state dict of tensors found in the file")
    return _without_wrappers(dict(obj))


def _without_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensor names without what wrapping the model put before them: DDP's `module.`,
    torch.compile's `_orig_mod.` (a compiled model's state_dict()), or both; and torch's
    `AveragedModel` (SWA, EMA: `module.*` and its `n_averaged` count, which is dropped)."""
    if "n_averaged" in sd and len(sd) > 1:
        rest = {k: v for k, v in sd.items() if k != "n_averaged"}
        if all(k.startswith("module.") for k in rest):
            sd = rest
    prefix = re.match(r"(?:module\.|_orig_mod\.)*", next(iter(sd), ""))[0]
    if prefix and all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_file(path: str | Path) -> dict[str, torch.Tensor] | dict[str, dict[str, np.ndarray]]:
    """Read a weights file without executing anything from it.

    Returns a torch state dict for .safetensors/.pth/.pt/.bin/.ckpt (and timm's .pth.tar training
    checkpoints, whose raw weights it takes), or the Keras layer dict
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
            return _without_wrappers(load_safetensors(str(path)))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    if suffix in PTH_SUFFIXES or path.name.lower().endswith(".pth.tar"):
        if _is_torchscript(path):  # torch's own error called it damaged, and said to trust it
            raise WeightsError(
                f"{path}: a TorchScript archive (torch.jit.save, `xception export`), not "
                "weights: it holds code, which is not run here. Give the weights it was made "
                "from, or where it is trusted, torch.save(torch.jit.load(path).state_dict(), "
                "'x.pth') and load that"
            )
        try:
            with torch.serialization.safe_globals(list(SAFE_PICKLED)):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise WeightsError(
                f"{path}: refused to load: the file holds pickled objects other than tensors"
                f"{_unsupported_global(str(err))}. Nothing from it was run. Convert it in a "
                "trusted environment to safetensors, or re-save a plain state dict of tensors"
            ) from None
        except PermissionError as err:  # the file is fine: "damaged" would be wrong advice
            raise WeightsError(f"{path}: cannot be read ({err.strerror}): give this user read "
                               "access to it, or copy it somewhere readable") from None  # fmt: skip
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError,
                struct.error) as err:  # fmt: skip
            # A garbage or cut-short pre-zip pickle fails inside the unpickler as KeyError,
            # IndexError or struct.error (cut in a length field): an interrupted download of an
            # old .pth does.
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            if isinstance(err, KeyError | IndexError | struct.error) or not first:
                first = f"{type(err).__name__} {first}".strip()
            raise WeightsError(f"{path}: not a readable PyTorch file ({first}): the file is "
                               "damaged or cut short; download or copy it again") from None  # fmt: skip
        return _unwrap(obj, path)
    if suffix == ".onnx":  # "unknown weights format" named no way to use the file
        raise WeightsError(
            f"{path}: an ONNX export, not weights: classify with the weights it was exported "
            "from and --backend onnxruntime, or run the file with xception.deploy.OnnxModel"
        )
    raise WeightsError(
        f"{path}: unknown weights format {suffix!r}: use .h5 (Keras), .safetensors, or "
        ".pth/.pt (PyTorch state dict; .pth.tar for timm's training checkpoints)"
    )


def _is_torchscript(path: Path) -> bool:
    """Whether a PyTorch file is a TorchScript archive (a zip with constants.pkl, as torch
    tells them apart), which `torch.load(weights_only=True)` refuses."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _unsupported_global(torch_message: str) -> str:
    """What torch's weights_only unpickler refused (a class, or a pickle instruction), from its
    message, which goes on to suggest weights_only=False: the very thing we refuse to do."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", torch_message)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f" ({m[1]})"
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return f" ({m[1].strip()})" if m else ""


def detect_format(weights: Mapping) -> str:
    """'keras', 'timm' (timm's legacy_xception and Cadene's port), 'torchvision' (torchvision's
    Inception V3 with its auxiliary head, as its ImageNet file holds it) or 'xception' (ours,
    the inception-v3 preset's included)."""
    if weights and all(isinstance(v, Mapping) for v in weights.values()):
        return "keras"
    if "block1.rep.0.conv1.weight" in weights or "conv3.conv1.weight" in weights:
        return "timm"
    # The auxiliary head tells torchvision's own file from one saved from our preset (which
    # has none): only the former was trained to expect torchvision's `transform_input`.
    if is_inception_v3(weights) and any(k.startswith("AuxLogits.") for k in weights):
        return "torchvision"
    return "xception"


def is_inception_v3(weights: Mapping) -> bool:
    """Whether a state dict has torchvision Inception V3's tensor names (torchvision's file, or
    one saved from the inception-v3 preset)."""
    return "Mixed_7c.branch_pool.conv.weight" in weights


# torchvision's `transform_input` for its ImageNet Inception V3: x * std / 0.5 + (mean - 0.5) / 0.5
# per channel, mapping ImageNet-normalised input to the [-1, 1] range the weights were trained on.
_TV_SCALE = tuple(s / 0.5 for s in (0.229, 0.224, 0.225))
_TV_SHIFT = tuple((m - 0.5) / 0.5 for m in (0.485, 0.456, 0.406))


def torchvision_to_state_dict(sd: Mapping[str, torch.Tensor], source: str,
                              fold: bool = True) -> dict:  # fmt: skip
    """torchvision's Inception V3 file -> the inception-v3 preset's state dict. The auxiliary
    classifier (`AuxLogits.*`, a training aid only) is left out, as the preset has none, and
    (`fold`) torchvision's `transform_input`, which its ImageNet weights were trained behind, is
    folded into the first conv (scaled per input channel; it has no padding, so the shift is a
    constant per output channel, taken off its batch norm's running mean): the preset, as
    built, gives torchvision's outputs, and a model fine-tuned or saved from it needs no flag
    to reload."""
    aux = [k for k in sd if k.startswith("AuxLogits.")]
    if aux:
        log.debug("%s: %d AuxLogits tensors left out (inception-v3 has no auxiliary head)",
                  source, len(aux))  # fmt: skip
    out = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    conv, mean = "Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_mean"
    if fold and conv in out and mean in out and out[conv].ndim == 4 and out[conv].shape[1] == 3:
        w = out[conv].double()
        scale = torch.tensor(_TV_SCALE, dtype=torch.float64).view(1, 3, 1, 1)
        shift = torch.tensor(_TV_SHIFT, dtype=torch.float64).view(1, 3, 1, 1)
        out[conv] = (w * scale).to(out[conv].dtype)
        out[mean] = (out[mean].double() - (w * shift).sum((1, 2, 3))).to(out[mean].dtype)
    return out


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
        elif set(w) == {"kernel", "bias"} and w["kernel"].ndim == 2:
            raise WeightsError(
                f"Keras Dense layer {name!r}: only Xception's own classifier, a Dense layer "
                "named 'predictions' on the pooled features, has a counterpart here. Rename it "
                "to 'predictions' in Keras (one Dense head) before saving, or load the file "
                "without it (Keras: include_top=False) and train a new head"
            )
        else:
            raise WeightsError(
                f"Keras layer {name!r} with weights {sorted(w)} has no counterpart in Xception"
            )
    blocks = _shortcut_blocks(model)
    if len(unnamed_convs) != len(blocks) or len(unnamed_bns) != len(blocks):
        raise WeightsError(
            f"the file has {len(unnamed_convs)} unnamed shortcut convs and {len(unnamed_bns)} "
            f"unnamed batch norms; the model has {len(blocks)} shortcuts "
            f"({', '.join(blocks) or 'none'}): use the preset the file was saved from (--model; "
            "Keras' Xception is xception, with residual connections)"
        )
    for block, kernel, bn in zip(blocks, unnamed_convs, unnamed_bns, strict=True):
        sd[f"{block}.shortcut.conv.weight"] = kernel
        for k, v in BN_KERAS.items():
            sd[f"{block}.shortcut.bn.{v}"] = t(bn[k].copy())
    return sd


# What keras.applications.Xception builds is the paper's model and nothing else: these fields
# must be at their defaults. num_classes (`classes`, or 0 for include_top=False), in_chans (the
# input shape) and the training-only drop_rate and bn_momentum are free.
_KERAS_FIXED = ("residual", "mid_activation", "order", "segments", "middle_blocks", "width",
                "stem_channels", "entry_channels", "exit_channels", "head_channels",
                "stem_stride", "stem_padding", "padding", "bn_eps", "fc_layers",
                "output_stride")  # fmt: skip


def state_dict_to_keras(model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
    """Our Xception's weights as Keras layers, the inverse of `keras_to_state_dict`: named as
    keras.applications.Xception names them and in its layer order, which is what Keras' loader
    of .h5 files matches by (each block's layers, then its shortcut's unnamed conv and batch
    norm, `conv2d`, `batch_normalization`, `conv2d_1`, ...; `predictions` last)."""
    from .model import Xception, XceptionConfig

    # torch.compile's and (Distributed)DataParallel's wrappers: their model converts, as
    # save_safetensors takes them (a compiled Xception was "no counterpart in Keras").
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(
            model, nn.DataParallel | nn.parallel.DistributedDataParallel
        ):
            inner = model.module
        if not isinstance(inner, nn.Module):
            break
        model = inner
    if not isinstance(model, Xception):
        raise WeightsError(f"{type(model).__name__} has no counterpart in Keras' applications "
                           "here: only Xception converts to a Keras file")  # fmt: skip
    cfg, paper = model.config, XceptionConfig()
    differ = [
        f"{k}={getattr(cfg, k)!r}" for k in _KERAS_FIXED if getattr(cfg, k) != getattr(paper, k)
    ]
    if cfg.num_classes and cfg.pooling != "avg":
        differ.append(f"pooling={cfg.pooling!r} before the classifier (Keras' is 'avg')")
    if differ:
        raise WeightsError(
            f"Keras' Xception has no counterpart for {', '.join(differ)}: only the paper's "
            "model (preset xception, with Keras' padding) converts to a Keras file; convert "
            "this one to .safetensors (OUT.safetensors) instead"
        )
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}  # fmt: skip
    layers: dict[str, dict[str, np.ndarray]] = {}
    shortcuts = 0

    def conv(w: np.ndarray) -> np.ndarray:  # (out, in, kh, kw) -> Keras' (kh, kw, in, out)
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0))

    def bn(prefix: str) -> dict[str, np.ndarray]:
        return {k: sd[f"{prefix}.{v}"] for k, v in BN_KERAS.items()}

    for block in model.block_names:
        for name in (n for n, _ in getattr(model, block).named_children() if n != "shortcut"):
            prefix = f"{block}.{name}"
            if f"{prefix}.conv.weight" in sd:  # the stem's conv + BN pairs
                layers[f"{block}_{name}"] = {"kernel": conv(sd[f"{prefix}.conv.weight"])}
                layers[f"{block}_{name}_bn"] = bn(f"{prefix}.bn")
            elif f"{prefix}.spatial.weight" in sd:
                layers[f"{block}_{name}"] = {
                    "depthwise_kernel": np.ascontiguousarray(
                        sd[f"{prefix}.spatial.weight"].transpose(2, 3, 0, 1)),
                    "pointwise_kernel": conv(sd[f"{prefix}.pointwise.weight"]),
                }  # fmt: skip
            elif f"{prefix}.running_mean" in sd:
                layers[f"{block}_{name}"] = bn(prefix)
        if getattr(getattr(model, block), "shortcut", None) is not None:
            suffix = f"_{shortcuts}" if shortcuts else ""
            layers[f"conv2d{suffix}"] = {"kernel": conv(sd[f"{block}.shortcut.conv.weight"])}
            layers[f"batch_normalization{suffix}"] = bn(f"{block}.shortcut.bn")
            shortcuts += 1
    if model.fc is not None:
        layers["predictions"] = {"kernel": np.ascontiguousarray(sd["fc.weight"].T),
                                 "bias": sd["fc.bias"]}  # fmt: skip
    return layers


def save_keras_h5(model: nn.Module, path: str | Path) -> Path:
    """Write `model`'s weights as a Keras .h5 weights file, the layout of Keras' own ImageNet
    files: `keras.applications.Xception(weights=path, classes=N)` loads it (include_top=False
    for a model without a classifier), and so does `create_model` here. Written atomically."""
    import io

    import h5py

    layers = state_dict_to_keras(model)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layers]
        f.attrs["backend"] = b"torch"
        for name, weights in layers.items():
            group = f.create_group(name)
            names = [f"{name}/{k}:0" for k in weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for wname, value in zip(names, weights.values(), strict=True):
                group.create_dataset(wname, data=value)
    path = Path(path)
    atomic_write(path, buffer.getvalue())
    return path


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
    if fmt == "torchvision" or is_inception_v3(weights):
        # For the inception-v3 preset (a run of it, its own file): taken as they are, and
        # torchvision's own file as `torchvision_to_state_dict` makes it fit.
        if not is_inception_v3(model.state_dict()):
            raise WeightsError(
                "Inception V3 weights (torchvision's layout), not Xception's: use --model "
                "inception-v3 (create_model('inception-v3', weights=...))"
            )
        if fmt == "torchvision":
            weights = torchvision_to_state_dict(weights, "weights")
    if fmt == "keras":
        return keras_to_state_dict(weights, model)
    if fmt == "timm":
        return timm_to_state_dict(weights, model)
    if any(re.match(r"blocks\.\d+\.stack\.", k) for k in weights):
        raise WeightsError(
            "timm's aligned Xception (xception41, xception65, xception71, ...: DeepLab's "
            "modified Xception, with strided separable convs in place of max pooling) is another "
            "architecture, which no option of this model reproduces; the paper's model is timm's "
            "legacy_xception, whose weights load here"
        )
    return {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}


def key_mismatch(model_keys: Iterable[str], file_keys: Iterable[str]) -> str | None:
    """How a file's tensor names differ from a model's, in words (None when they match): how
    many of the model's are missing from the file and how many of the file's the model does
    not know, with the first of each."""
    model_keys, file_keys = set(model_keys), set(file_keys)
    missing, unexpected = sorted(model_keys - file_keys), sorted(file_keys - model_keys)
    parts = []
    if missing:
        parts.append(f"{len(missing)} model weights missing from the file (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} file weights unknown to the model "
                     f"(first: {unexpected[0]})")  # fmt: skip
    return "; ".join(parts) or None


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """WeightsError naming the first tensor that holds NaN or infinite values."""
    for key, value in sd.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise WeightsError(
                f"{source}: {key} holds {bad:,} NaN or infinite values: the file is damaged, or "
                "the run that wrote it diverged. Use another copy or an earlier checkpoint"
            )


def load_into(
    model: nn.Module, weights: Mapping, *, source: str = "weights", require_head: bool = False
) -> dict[str, list[str]]:
    """Copy `weights` (any supported format, already read) into `model`, checking every shape.

    A classifier whose class count differs from the model's (or is absent) is skipped with a
    warning, leaving the model's fresh head, unless `require_head` is set (checked after the
    backbone, so a backbone that does not fit is what the error names). Returns the lists of
    skipped keys ('head') and of model keys the file did not provide ('missing_head')."""
    try:
        sd = to_state_dict(weights, model)
    except WeightsError as err:  # the name maps' errors, with the file they are about
        raise WeightsError(f"{source}: {err}") from None
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    head_prefixes = ("fc.",)
    own_head = [k for k in own if k.startswith(head_prefixes)]
    file_head = [k for k in sd if k.startswith(head_prefixes)]
    skipped: dict[str, torch.Tensor] = {}
    if not own_head:  # the model has no classifier: the file's is left out
        skipped = {k: sd.pop(k) for k in file_head}
    elif not all(k in sd and sd[k].shape == own[k].shape for k in own_head):
        # The head loads whole or not at all (a file's bias beside a fresh weight was neither
        # head); a classifier tensor the model has no place for (a pruned layer's weight_orig)
        # stays, for the check below to name as unknown, rather than be dropped unseen.
        skipped = {k: sd.pop(k) for k in file_head if k in own}
    missing_head = [k for k in own_head if k not in sd]
    body = {k for k in own if k not in missing_head}
    if mismatch := key_mismatch(body, sd):
        raise WeightsError(
            f"{source} does not fit this model: {mismatch}. Check the model name and "
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
    if require_head and (skipped or missing_head):
        key = next(iter(skipped), None) or missing_head[0]
        have = tuple(skipped[key].shape) if key in skipped else "nothing"
        want = tuple(own[key].shape) if key in own else "no classifier"
        raise WeightsError(
            f"{source}: classifier {key} has shape {have} in the file, the model has {want}: "
            "set num_classes to match the file, or load without the top"
        )
    check_finite(sd, source)
    if skipped and not missing_head and model.config.num_classes == 0:
        log.info("%s: classifier left out (the model has none: num_classes=0)", source)
    elif missing_head or skipped:
        log.warning(
            "%s: classifier not loaded (%s); the model keeps a freshly initialised head for "
            "%d classes", source, "absent from the file" if missing_head and not skipped
            else "its class count differs", model.config.num_classes,
        )  # fmt: skip
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)
    return {"head": list(skipped), "missing_head": missing_head}


# ---------------------------------------------------------------------------------------------
# Named weights and their metadata
# ---------------------------------------------------------------------------------------------
KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/xception/"
URL_ENV = "XCEPTION_WEIGHTS_URL"  # a mirror (or file:// folder) holding the same file names
HOME_ENV = "XCEPTION_HOME"
TIMEOUT_ENV = "XCEPTION_DOWNLOAD_TIMEOUT"  # seconds a download may wait on the server, each time
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Weights:
    """One set of weights: where the file comes from, what it predicts, how inputs are prepared.

    `format` is the file's layout ('keras', 'timm', 'torchvision' or 'xception'). `filename`,
    `md5` and `base_url` are set for weights that `download` can fetch. Preprocessing
    (`transforms()`): resize the shorter side to input_size / crop_fraction with
    `interpolation` and centre-crop input_size (crop_fraction 1.0: resize to a square, as Keras
    does), then RGB in [0, 1] normalised by mean and std. `loss` says how the classifier's
    scores become probabilities: 'softmax' (one class per image) or 'sigmoid' (multi-label,
    each class on its own, as the jft recipe trains)."""

    name: str
    format: str
    num_classes: int
    categories: tuple[str, ...] | None = None
    input_size: int = 299
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    filename: str | None = None
    md5: str | None = None
    base_url: str | None = None
    description: str = ""
    loss: str = "softmax"
    in_chans: int | None = None

    def __post_init__(self) -> None:
        """Checks every field, so that metadata of one's own (a safetensors file's, a
        checkpoint's) is refused by name where it is read, not at the first image: a std of 0 or
        NaN gave NaN probabilities, a mean of two values for RGB failed inside torchvision, a
        negative input size in PIL."""
        for key in ("name", "format", "interpolation", "description", "loss"):
            if not isinstance(getattr(self, key), str):
                raise self._bad(key, "expected a string")
        if self.format not in FORMATS:
            raise self._bad("format", f"use one of {', '.join(FORMATS)}")
        for key in ("num_classes", "input_size"):  # numpy's integers become ints
            value = _as_int(getattr(self, key))
            if isinstance(value, bool) or not isinstance(value, int):
                raise self._bad(key, "expected an integer")
            object.__setattr__(self, key, value)
        if self.num_classes < 0:
            raise self._bad("num_classes", "use 0 (no classifier) or more")
        if self.input_size < 1:
            raise self._bad("input_size", "use the side in pixels of the images the model takes")
        if self.categories is not None:
            if isinstance(self.categories, str) or not all(
                isinstance(c, str) for c in self.categories
            ):
                raise self._bad("categories", "expected a list of class names")
            # A count that differs from num_classes is not refused: predict and eval label by
            # index then, as for a head replaced after loading.
            object.__setattr__(self, "categories", tuple(self.categories))
        crop = self.crop_fraction
        if not is_crop_fraction(crop):
            raise self._bad("crop_fraction", "use the part of the resized image the centre crop "
                            "keeps, above 0 (1.0: a square resize)")  # fmt: skip
        object.__setattr__(self, "crop_fraction", float(crop))
        if self.interpolation not in _INTERPOLATION:
            raise self._bad("interpolation", f"use one of {', '.join(sorted(_INTERPOLATION))}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise self._bad(key, "expected one number per input channel")
            value = tuple(value)
            if not value or not all(is_number(v) and math.isfinite(v) for v in value):
                raise self._bad(key, "expected one finite number per input channel")
            object.__setattr__(self, key, tuple(float(v) for v in value))
        if len(self.mean) != len(self.std):
            raise self._bad("std", f"{len(self.std)} values for {len(self.mean)} means: give "
                            "one mean and one std per input channel")  # fmt: skip
        if min(self.std) <= 0:
            raise self._bad("std", "every std must be above 0 (inputs are divided by it)")
        if self.loss not in ("softmax", "sigmoid"):
            raise self._bad("loss", "use 'softmax' or 'sigmoid'")
        if self.in_chans is not None:
            value = _as_int(self.in_chans)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise self._bad("in_chans", "use the model's input channels (1 for grey, 3 "
                                "for RGB), or leave it out")  # fmt: skip
            object.__setattr__(self, "in_chans", value)
            if len(self.mean) not in (1, value):
                raise self._bad("mean", f"{len(self.mean)} values for {value} input channels: "
                                "give one per channel, or one for all")  # fmt: skip

    def _bad(self, key: str, fix: str) -> WeightsError:
        return WeightsError(f"weights metadata: {key}={getattr(self, key)!r} is not valid: {fix}")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The class probabilities of a batch of logits (N, classes), as the weights were
        trained: softmax over classes, or one sigmoid per class for multi-label weights."""
        return logits.sigmoid() if self.loss == "sigmoid" else logits.softmax(-1)

    @property
    def url(self) -> str | None:
        """Where `download` fetches the file: `$XCEPTION_WEIGHTS_URL` if set, else the
        published address."""
        base = os.environ.get(URL_ENV) or self.base_url
        if self.filename is None or base is None:
            return None
        if not base.lower().startswith(("http://", "https://", "file://")):  # schemes ignore case
            raise WeightsError(
                f"{URL_ENV}={base!r} is not a URL: give an http://, https:// or file:// folder "
                f"holding {self.filename} (e.g. file:///srv/weights/)"
            )
        return base.rstrip("/") + "/" + self.filename

    def transforms(self) -> Callable:
        """The preprocessing these weights expect: PIL image -> normalised CHW tensor. With
        `in_chans` 1 or 3 (set on a model's `weights_meta`), an image of any mode (RGBA, grey,
        palette, 16-bit) becomes its luminance or RGB first, so a grey model gets one channel."""
        return eval_transform(self.input_size, self.crop_fraction, self.interpolation,
                              self.mean, self.std, self.in_chans)  # fmt: skip

    def replace(self, **changes) -> Weights:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> Weights:
        """Inverse of `to_dict` (after a JSON round trip); unknown keys are ignored so files
        written by a later version still load."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in values.items() if k in names}
        for key in ("categories", "mean", "std"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)


_IMAGENET = tuple(_IMAGENET_CATEGORIES)  # the class order of the published ImageNet files

WEIGHTS: dict[str, Weights] = {
    "imagenet": Weights(
        name="imagenet", format="keras", num_classes=1000, categories=_IMAGENET,
        filename="xception_weights_tf_dim_ordering_tf_kernels.h5",
        md5="0a58e3b7378bc2990ea3b43d5981f1f6", base_url=KERAS_BASE_URL,
        description="the official Keras ImageNet weights of keras.applications.Xception",
        in_chans=3,
    ),
    "imagenet-notop": Weights(
        name="imagenet-notop", format="keras", num_classes=0,
        filename="xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        md5="b0042744bf5b25fce3cb969f33bebb97", base_url=KERAS_BASE_URL,
        description="the official Keras ImageNet weights without the classifier",
        in_chans=3,
    ),
    # timm's legacy_xception (Cadene's port of the Keras weights) is evaluated the timm way.
    # Its file is not fetched here: pass it as weights=PATH and this metadata comes with it.
    "timm-imagenet": Weights(
        name="timm-imagenet", format="timm", num_classes=1000, categories=_IMAGENET,
        crop_fraction=0.8975, interpolation="bicubic",
        description="timm's legacy_xception / Cadene's ImageNet port: pass the .pth as a path",
        in_chans=3,
    ),
    # torchvision's Inception V3 ImageNet file (Inception_V3_Weights.IMAGENET1K_V1), for the
    # inception-v3 preset: its preprocessing is torchvision's ImageClassification(crop_size=299,
    # resize_size=342), bilinear, ImageNet's mean and std. Not fetched here either.
    "torchvision-imagenet": Weights(
        name="torchvision-imagenet", format="torchvision", num_classes=1000,
        categories=_IMAGENET, crop_fraction=299 / 342, interpolation="bilinear",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        description="torchvision's Inception V3 ImageNet weights (inception_v3_google-0cc3c7bd"
        ".pth, for --model inception-v3): pass the .pth as a path",
        in_chans=3,
    ),
}  # fmt: skip

# Config fields a file layout fixes: the timm/Cadene port pads symmetrically, BN eps 1e-5.
_FORMAT_CONFIG = {"timm": {"padding": "symmetric", "bn_eps": 1e-5}}


# ---------------------------------------------------------------------------------------------
# Download and cache
# ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """`$XCEPTION_HOME`, else `$XDG_CACHE_HOME/xception`, else `~/.cache/xception`."""
    home = os.environ.get(HOME_ENV)
    if home:  # absolute: messages then name the folder whatever the working directory
        return Path(home).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec: a relative path there is invalid and is ignored (used, the cache had moved
    # with the working directory, and the weights been downloaded again in every folder).
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "xception"


def _file_hashes(path: Path) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".json")


def _write_sidecar(target: Path, w: Weights, md5: str, sha256: str, stat: os.stat_result,
                   url: str | None) -> None:  # fmt: skip
    """Record the hashes with the file's size and modification time: a file changed since
    (same size or not) no longer matches its record and is hashed again before use."""
    record = {"name": w.name, "url": url, "md5": md5, "sha256": sha256, "size": stat.st_size,
              "mtime_ns": stat.st_mtime_ns}  # fmt: skip
    atomic_write(_sidecar(target), json.dumps(record, indent=1).encode())


def _recorded(target: Path, w: Weights) -> bool:
    """Whether `target` is the file its sidecar verified: the published MD5 recorded, and the
    same size and modification time (damage written in place changes the time)."""
    try:
        stat = target.stat()
        record = json.loads(_sidecar(target).read_text())
        return (
            isinstance(record, dict)
            and record.get("md5") == w.md5
            and record.get("size") == stat.st_size
            and record.get("mtime_ns") == stat.st_mtime_ns
        )
    except (OSError, ValueError):
        return False


def _place_by_hand(w: Weights, target: Path) -> str:
    official = w.base_url.rstrip("/") + "/" + w.filename if w.base_url else w.url
    return (
        f"download {official} on a machine with internet access (MD5 {w.md5}) and put it at "
        f"{target} (or set {HOME_ENV} to a folder holding weights/{w.filename}, or "
        f"{URL_ENV} to a mirror)"
    )


def _check_cached(target: Path, w: Weights) -> None:
    """A cached file is trusted when its sidecar records the expected MD5, its size and its
    modification time; any other file (placed by hand, changed since, or recorded by an older
    version) is hashed, and recorded where the cache is writable."""
    if _recorded(target, w):
        return
    stat = target.stat()
    md5, sha256 = _file_hashes(target)
    if md5 != w.md5:
        raise WeightsError(
            f"{target}: MD5 {md5} does not match the published {w.md5} of {w.name!r}: the file "
            "is damaged or not the official one. Delete it and run again to download it afresh"
        )
    try:
        _write_sidecar(target, w, md5, sha256, stat, None)
    except OSError as err:  # a read-only or shared cache: verified all the same, for this call
        log.debug("%s: verified, but its record could not be written (%s)", target, err)
    log.info("%s: verified (sha256 %s)", target, sha256)


def _write_cache(f, chunk: bytes, w: Weights, target: Path) -> None:
    """Write `chunk` of a download into the cache (`b""`: flush and sync it), a full disk named
    as the cache's: "[Errno 27] File too large" or "while writing the output" (predict writes
    none) named neither the cache nor how to move it."""
    try:
        if chunk:
            f.write(chunk)
        else:
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _cache_full(w, target, err) from None


def _cache_full(w: Weights, target: Path, err: OSError) -> WeightsError:
    return WeightsError(f"cannot write the {w.name!r} weights into the cache {target.parent} "
                        f"({err.strerror or err}): free space there, or set {HOME_ENV} to a "
                        "folder with room")  # fmt: skip


def _http_failure(err: urllib.error.HTTPError, w: Weights, target: Path) -> WeightsError:
    """What an HTTP status means for the user: only 404/410 say the file is not there."""
    url, code, mirror = w.url, err.code, os.environ.get(URL_ENV)
    reason = " ".join(str(getattr(err, "reason", "") or err).split())  # urllib's may be 3 lines
    if code in (404, 410):
        where = (f"the mirror {URL_ENV}={mirror!r} lacks {w.filename}: put it there" if mirror
                 else "the file has moved")  # fmt: skip
    elif code in (401, 403, 407):
        where = "access was refused: check the server's permissions, or its credentials or proxy"
    elif 300 <= code < 400:
        where = (f"it redirects in a loop or to nowhere: check {URL_ENV}" if mirror else
                 "it redirects in a loop or to nowhere")  # fmt: skip
    elif code >= 500:
        where = "the server failed: run again later"
    else:
        where = "the server refused the request"
    return WeightsError(f"cannot download the {w.name!r} weights: {url} answered HTTP {code} "
                        f"({reason}); {where}, or {_place_by_hand(w, target)}")  # fmt: skip


def download_timeout() -> float:
    """Seconds a download waits for the server to connect or send its next bytes:
    `XCEPTION_DOWNLOAD_TIMEOUT`, or 60. A slow link or mirror can raise it."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise WeightsError(f"{TIMEOUT_ENV}={value!r} is not valid: give the seconds a download "
                           f"may wait for the server, a number above 0 (default "
                           f"{DEFAULT_TIMEOUT:g})")  # fmt: skip
    return seconds


def _fetch(w: Weights, target: Path, progress: bool) -> None:
    """Stream w.url into a temp file next to `target`, hashing as it goes; only a complete file
    with the published MD5 is renamed into place. Anything else leaves no trace."""
    from tqdm import tqdm

    url, timeout = w.url, download_timeout()  # a bad setting is refused before any file is made
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as err:  # a full disk (or no inodes) before the first byte
        raise _cache_full(w, target, err) from None
    tmp = Path(name)
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    received, total, answered = 0, None, False
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                try:
                    opened = urllib.request.urlopen(url, timeout=timeout)
                except ValueError as err:  # not a URL urllib can open
                    raise WeightsError(f"cannot download from {url!r} ({err}): check {URL_ENV}, "
                                       "an http://, https:// or file:// folder") from None  # fmt: skip
                answered = True  # what goes wrong from here is a transfer cut short
                with opened as response:
                    # A length that is not a number is taken as none announced: the MD5
                    # check below still catches a short or wrong file.
                    length = (response.headers.get("Content-Length") or "").strip()
                    total = int(length) if length.isdecimal() else None
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=w.filename,
                              disable=not (progress and stderr_is_terminal())) as bar:  # fmt: skip
                        while chunk := response.read(1 << 20):
                            _write_cache(f, chunk, w, target)
                            md5.update(chunk)
                            sha256.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                    TimeoutError) as err:  # fmt: skip
                reason = " ".join(str(getattr(err, "reason", None) or err).split())
                if isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None),
                                                               TimeoutError):  # fmt: skip
                    reason += f"; the server was silent for {timeout:g} s ({TIMEOUT_ENV})"
                mirror = os.environ.get(URL_ENV)
                if isinstance(err, urllib.error.HTTPError):  # the server is there: no "offline"
                    raise _http_failure(err, w, target) from None
                if isinstance(getattr(err, "reason", None), FileNotFoundError):  # a file:// mirror
                    raise WeightsError(
                        f"cannot read the {w.name!r} weights at {url}: the mirror {URL_ENV}="
                        f"{mirror!r} lacks {w.filename}: put it there, or "
                        f"{_place_by_hand(w, target)}"
                    ) from None
                if received or answered:  # the first bytes may sit in http.client's buffer
                    raise WeightsError(
                        f"download of {url} broke off after {received:,} bytes ({reason}); "
                        f"nothing was kept: run again, or {_place_by_hand(w, target)}"
                    ) from None
                raise WeightsError(
                    f"cannot download the {w.name!r} weights from {url} ({reason}). If this "
                    f"machine is offline, {_place_by_hand(w, target)}"
                ) from None
            if total is not None and received != total:
                raise WeightsError(
                    f"download of {url} broke off after {received:,} of {total:,} bytes; "
                    f"nothing was kept: run again, or {_place_by_hand(w, target)}"
                )
            _write_cache(f, b"", w, target)  # flushed and synced
        if md5.hexdigest() != w.md5 and total is None:
            raise WeightsError(
                f"{url} sent {received:,} bytes with MD5 {md5.hexdigest()}, not the published "
                f"{w.md5} of {w.name!r}, without announcing a length: the transfer may have "
                f"broken off, or the server sent another file. Nothing was kept: run again, or "
                f"{_place_by_hand(w, target)}"
            )
        if md5.hexdigest() != w.md5:
            raise WeightsError(
                f"{url} sent a file with MD5 {md5.hexdigest()}, not the published {w.md5} of "
                f"{w.name!r}; it was discarded. If a mirror ({URL_ENV}) or proxy serves another "
                f"file, fix that, or {_place_by_hand(w, target)}"
            )
        os.chmod(tmp, default_mode())
        try:
            _write_sidecar(target, w, md5.hexdigest(), sha256.hexdigest(), tmp.stat(), url)
        except OSError as err:  # the verified file is kept: the next call hashes it again
            log.warning("%s: verified, but its record could not be written (%s); it is hashed "
                        "again on the next use", target, err.strerror or err)  # fmt: skip
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("downloaded %s to %s (sha256 %s)", url, target, sha256.hexdigest())


def _named(name: str) -> Weights:
    if name not in WEIGHTS:
        names = [n for n, w in WEIGHTS.items() if w.filename is not None]  # downloadable ones
        raise WeightsError(
            f"unknown weights {name!r}: use one of {', '.join(names)} or a file path "
            "(.h5, .safetensors, .pth; timm's legacy_xception .pth gets timm-imagenet's "
            "metadata, torchvision's Inception V3 .pth torchvision-imagenet's)"
        )
    return WEIGHTS[name]


def download(weights: Weights | str, *, progress: bool = True) -> Path:
    """The cached file of `weights` (an entry of `WEIGHTS` or its name), downloaded first if
    absent. The published MD5 is checked and the SHA-256 recorded in a `.json` sidecar; a file
    lock keeps concurrent processes from fetching or reading a half-written file."""
    from filelock import FileLock

    w = _named(weights) if isinstance(weights, str) else weights
    if w.filename is None or w.md5 is None or (w.base_url is None and not os.environ.get(URL_ENV)):
        raise WeightsError(f"weights {w.name!r} cannot be downloaded: {w.description}")
    target = cache_dir() / "weights" / w.filename
    if _recorded(target, w):  # verified before: no lock, no write (read-only caches work)
        log.debug("%s: cached at %s", w.name, target)
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsError(
            f"cannot create the weights cache {target.parent} ({err}): set {HOME_ENV} to a "
            "writable folder"
        ) from None
    # 0o666: in a cache shared by several users each must be able to take the lock.
    lock = FileLock(f"{target}.lock", mode=0o666)
    try:
        lock.acquire()
    except OSError as err:  # a read-only or someone else's cache
        if target.is_file():
            _check_cached(target, w)  # hashed, not recorded
            return target
        raise WeightsError(
            f"cannot write to the weights cache {target.parent} ({err}): set {HOME_ENV} to a "
            f"writable folder, or {_place_by_hand(w, target)}"
        ) from None
    try:
        for stale in target.parent.glob(f".{target.name}.*.part"):
            stale.unlink(missing_ok=True)  # left by a download that was killed; we hold the lock
        if target.exists():
            _check_cached(target, w)
            log.debug("%s: cached at %s", w.name, target)
        else:
            _fetch(w, target, progress)
    finally:
        lock.release()
    return target


# ---------------------------------------------------------------------------------------------
# Opening weights by name or path; our safetensors with config and metadata
# ---------------------------------------------------------------------------------------------
@dataclass
class OpenedWeights:
    """Weights read from a name or a file, with what they imply for the model."""

    data: Mapping  # as `load_file` returns it
    source: str  # the name or path, for messages
    format: str  # 'keras' | 'timm' | 'torchvision' | 'xception'
    num_classes: int  # the file's classifier outputs (0: no classifier)
    config: dict  # config fields the file requires: a port's padding/eps, in_chans, our config
    meta: Weights | None  # None where nothing is known (a bare state dict of ours)


def _classifier_size(data: Mapping, fmt: str) -> int:
    if fmt == "keras":
        bias = data.get("predictions", {}).get("bias")
    else:
        bias = data.get("fc.bias", data.get("last_linear.bias"))
    return int(bias.shape[0]) if bias is not None else 0


def file_meta(fmt: str, num_classes: int, path: Path, channels: int = 3) -> Weights | None:
    """Metadata for a file without its own: the preprocessing of its layout (one mean and std
    per input channel), and ImageNet's class names when it has 1000 classes (the published
    files of each layout are ImageNet)."""
    base = {"keras": WEIGHTS["imagenet"], "timm": WEIGHTS["timm-imagenet"],
            "torchvision": WEIGHTS["torchvision-imagenet"]}.get(fmt)  # fmt: skip
    if base is None:
        return None
    # A grey model gets one mean and std; Keras' and timm's are the same for every channel.
    same = channels == len(base.mean)
    return base.replace(
        name=path.name, num_classes=num_classes,
        categories=base.categories if num_classes == len(_IMAGENET) else None,
        mean=base.mean if same else base.mean[:1] * channels,
        std=base.std if same else base.std[:1] * channels, in_chans=channels,
        filename=None, md5=None, base_url=None, description=f"{fmt} weights from {path}",
    )  # fmt: skip


def _input_channels(data: Mapping, fmt: str) -> int | None:
    """The input channels of an Xception file's first conv (None where it has none)."""
    if fmt == "keras":
        weight = data.get("block1_conv1", {}).get("kernel")
        axis = 2  # Keras kernels are (h, w, in, out)
    else:
        weight = data.get("conv1.weight" if fmt == "timm" else "block1.conv1.conv.weight")
        axis = 1
    return int(weight.shape[axis]) if weight is not None and weight.ndim == 4 else None


def read_safetensors_metadata(path: str | Path) -> tuple[dict | None, Weights | None]:
    """The model config and weights metadata `save_safetensors` stored in a file (None where
    the file has none, e.g. a safetensors file written elsewhere)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            stored = f.metadata() or {}
        config = json.loads(stored["xception.config"]) if "xception.config" in stored else None
        meta = json.loads(stored["xception.weights"]) if "xception.weights" in stored else None
        for key, value in (("xception.config", config), ("xception.weights", meta)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{key} is a JSON {type(value).__name__}, not an object")
        return config, Weights.from_dict(meta) if meta else None
    except WeightsError as err:  # read, but a value is wrong: name the file and the value
        raise WeightsError(f"{path}: {err}") from None
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: unreadable xception metadata ({err})") from None


def refuse_config_overrides(spec: str | Path, overrides, *, progress: bool = True) -> None:
    """Refuse config `overrides` (the CLI's --set) for weights that store the config their
    model was trained with (a run or checkpoint folder, a safetensors file of ours): applied,
    they built a model the weights never trained (another activation, padding, eps) and
    predicted, scored or converted it without a word. --set is for a plain .pth."""
    if not overrides:
        return
    opened = open_weights(spec, progress=progress)
    if opened.format == "xception" and opened.meta is not None:
        raise WeightsError(f"--set {', '.join(overrides)}: {spec} stores the config its model "
                           "was trained with, which is used; --set is for a plain .pth that "
                           "holds none")  # fmt: skip


def open_weights(spec: str | Path, *, progress: bool = True) -> OpenedWeights:
    """Read weights given by name (an entry of `WEIGHTS`, downloaded into the cache) or path."""
    if not isinstance(spec, str | os.PathLike) or not str(spec).strip():
        # weights=True (timm's pretrained=True) was a TypeError; '' (an unset shell variable)
        # was Path('.'), and loaded the model.safetensors of whatever folder it ran in.
        names = [n for n, w in WEIGHTS.items() if w.filename is not None]
        raise WeightsError(f"weights={spec!r} is not valid: give a weights name "
                           f"({', '.join(names)}) or a file path")  # fmt: skip
    if isinstance(spec, str) and spec in WEIGHTS:
        meta = WEIGHTS[spec]
        data = load_file(download(meta, progress=progress))
        fmt = detect_format(data)
        return OpenedWeights(data, spec, fmt, _classifier_size(data, fmt),
                             dict(_FORMAT_CONFIG.get(fmt, {})), meta)  # fmt: skip
    path = Path(spec)
    if not path.exists() and not path.suffix and os.sep not in str(spec):
        _named(str(spec))  # a mistyped name: list the names rather than "file not found"
    checkpoint = _checkpoint_weights(path)
    if checkpoint is not None:
        return _open_checkpoint(spec, checkpoint)
    if path.is_dir():  # a training run's folder holds its final weights
        if not (path / "model.safetensors").is_file():
            raise WeightsError(f"{path} is a folder without model.safetensors: give a weights "
                               "file (.safetensors, .pth, .h5) or a finished run's folder")  # fmt: skip
        path = spec = path / "model.safetensors"
    data = load_file(path)
    fmt = detect_format(data)
    num_classes = _classifier_size(data, fmt)
    config, meta = dict(_FORMAT_CONFIG.get(fmt, {})), None
    if path.suffix.lower() == ".safetensors":
        saved, meta = read_safetensors_metadata(path)
        if saved is not None:
            config = {k: v for k, v in saved.items() if k != "num_classes"}
    channels = _input_channels(data, fmt) or 3
    if channels != 3:  # e.g. a model of grey images: the file makes the model it fits
        config.setdefault("in_chans", channels)
    if meta is None:
        meta = file_meta(fmt, num_classes, path, channels)
    return OpenedWeights(data, str(spec), fmt, num_classes, config, meta)


def run_weights_card(meta: Mapping, name: str, description: str) -> Weights:
    """The `Weights` of a model trained here, from its run's metadata (a checkpoint's
    `state['meta']`): its classes, input size, normalisation and loss."""
    return Weights(
        name=name, format="xception", num_classes=len(meta["classes"]),
        categories=tuple(meta["classes"]), input_size=meta["image_size"],
        mean=tuple(meta["mean"]), std=tuple(meta["std"]), description=description,
        loss=meta["loss"], in_chans=(meta.get("model_config") or {}).get("in_chans"),
    )  # fmt: skip


def _checkpoint_weights(path: Path) -> Path | None:
    """The weights file of the training checkpoint `path` names, else None: for the folder (or
    its state.pt), the EMA weights where it keeps them, as `xception eval` scores it; a
    model.safetensors or ema.safetensors in it, as given."""
    if path.name == "state.pt" and path.is_file():
        path = path.parent
    if path.is_dir():
        if not (path / "state.pt").is_file():
            return None
        ema = path / "ema.safetensors"
        return ema if ema.is_file() else path / "model.safetensors"
    if (path.name in ("model.safetensors", "ema.safetensors")
            and (path.parent / "state.pt").is_file()
            and not (path.parent / "model.json").is_file()):  # fmt: skip
        return path
    return None


def _open_checkpoint(spec, file: Path) -> OpenedWeights:
    """A checkpoint's weights file with its model config, classes and preprocessing, which its
    state.pt holds (its weights files hold no config: loaded as they were, they went into the
    default preset and were refused as not fitting, with no way to name the model)."""
    from .checkpoint import load_checkpoint

    meta = load_checkpoint(file.parent, state_only=True)["state"]["meta"]
    data = load_file(file)
    fmt = detect_format(data)
    config = {k: v for k, v in (meta.get("model_config") or {}).items() if k != "num_classes"}
    try:
        card = run_weights_card(meta, f"training checkpoint {file.parent}",
                                f"{meta['model']} checkpoint ({meta['loss']} loss)")  # fmt: skip
    except WeightsError as err:
        raise WeightsError(f"{file.parent}: {err}") from None
    return OpenedWeights(data, str(spec), fmt, _classifier_size(data, fmt), config, card)


def load_weights(model: nn.Module, opened: OpenedWeights, *, require_head: bool = False) -> None:
    """`load_into` plus metadata: sets `model.weights_meta` to the weights' `Weights`, without
    class names when the classifier was not loaded (they would name a fresh head's outputs)."""
    report = load_into(model, opened.data, source=opened.source, require_head=require_head)
    head_loaded = model.fc is not None and not report["head"] and not report["missing_head"]
    model.weights_meta = meta_for_head(opened, head_loaded, model.config.num_classes,
                                       model.config.in_chans)  # fmt: skip


def check_channels(meta: Weights, in_chans: int, source: str) -> None:
    """Refuses metadata whose mean and std fit neither every channel (one value) nor each of
    the model's `in_chans` input channels: the first image failed inside torchvision."""
    if len(meta.mean) not in (1, in_chans):
        raise WeightsError(f"{source}: the weights metadata has {len(meta.mean)} means and stds "
                           f"but the model takes {in_chans} input channel"
                           f"{'s' if in_chans != 1 else ''}: give one value per channel, or one "
                           "for all")  # fmt: skip


def meta_for_head(opened: OpenedWeights, head_loaded: bool, num_classes: int,
                  in_chans: int) -> Weights | None:  # fmt: skip
    """The metadata of `opened` weights for a model they were loaded into: checked against
    its `in_chans` input channels and holding them (so that `transforms()` gives a grey model
    one channel), without class names where the classifier was not loaded (they would name a
    fresh head's outputs)."""
    meta = opened.meta
    if meta is None:
        return None
    check_channels(meta, in_chans, opened.source)
    if not head_loaded:
        meta = meta.replace(num_classes=num_classes, categories=None)
    return meta.replace(in_chans=in_chans) if meta.in_chans != in_chans else meta


def input_meta(model: nn.Module) -> Weights:
    """The model's weights metadata (`model.weights_meta`), or for a model without it what
    predict, eval and export feed it: Keras' preprocessing (a square resize, mean and std of
    0.5 per input channel, so one of each for a grey model) at `default_image_size`."""
    meta = getattr(model, "weights_meta", None)
    if meta is not None:
        return meta
    from .model import default_image_size

    config = getattr(model, "config", None)
    channels = getattr(config, "in_chans", 3)
    classes = config.num_classes if config is not None else model.fc.out_features  # torchvision
    return Weights(name="unknown", format="xception", num_classes=classes,
                   input_size=default_image_size(model), mean=(0.5,) * channels,
                   std=(0.5,) * channels, in_chans=channels)  # fmt: skip


def save_safetensors(model: nn.Module, path: str | Path, meta: Weights | None = None) -> Path:
    """Write `model`'s weights as safetensors with its config and `meta` in the file's metadata,
    so that `create_model(name, weights=path)` restores the same model (padding, eps, classes).
    Written atomically."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}  # fmt: skip
    config = getattr(model, "config", None)
    if meta is not None and config is not None and meta.in_chans is None:
        meta = meta.replace(in_chans=config.in_chans)  # what the model takes: in the file
    metadata = safetensors_metadata(config.to_dict() if config is not None else None, meta)
    path = Path(path)
    atomic_write(path, save(sd, metadata=metadata))
    return path


def safetensors_metadata(config: dict | None, meta: Weights | None) -> dict[str, str]:
    """The safetensors metadata that `read_safetensors_metadata` reads back: the model config
    and the weights' `Weights` (either may be None)."""
    metadata = {"format": "pt"}
    if config is not None:
        metadata["xception.config"] = json.dumps(config)
    if meta is not None:
        metadata["xception.weights"] = json.dumps(meta.to_dict())
    return metadata
