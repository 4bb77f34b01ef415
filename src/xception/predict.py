"""Classify image files: find them, prepare them as the weights expect, run a backend, rank.

Nothing here prints: `predict` yields one `Prediction` per file, either a class ranking or the
reason the file could not be read, and the command line formats them. A file that fails never
stops the others. Preprocessing and class names come from the model's weights metadata
(`model.weights_meta`, see `weights.Weights`), so they cannot be mismatched with the weights.

A backend turns the model into a function from a prepared batch to logits; each is one factory
in `BACKENDS`, chosen by name.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import deploy
from .data import IMAGE_SUFFIXES, ImageError, image_files, load_image
from .model import Xception
from .runtime import stderr_is_terminal
from .weights import Weights, check_channels, input_meta

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "IMAGE_EXTENSIONS", "Prediction", "Ranked", "find_images", "predict"]

IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # what a folder search picks up (`data.image_files`)

Runner = Callable[[torch.Tensor], torch.Tensor]  # prepared NCHW batch -> logits


def _torch_backend(model: nn.Module) -> Runner:
    device = next(model.parameters()).device
    if isinstance(model, Xception):
        # BN folded, channels_last, the batch sliced on the CPU (deploy.optimize, on a copy);
        # eager, so that a few images do not wait for a compilation; float32 on every device,
        # so that the probabilities printed are the model's own (within 1e-4).
        model = deploy.optimize(model, backend="eager", device=device, dtype=torch.float32)
    else:  # in eval mode and float32 (as above: a half model failed on the float batch),
        model = copy.deepcopy(model).float().eval()  # leaving the caller's model as it was

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(batch.to(device)).cpu()

    run.model = model  # what runs the batches, for a look from outside
    return run


def _onnxruntime_backend(model: nn.Module) -> Runner:
    # Exports the model once per image size (see deploy.OnnxRuntimeRunner).
    from .deploy import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model)


BACKENDS: dict[str, Callable[[nn.Module], Runner]] = {
    "torch": _torch_backend,
    "onnxruntime": _onnxruntime_backend,
}


@dataclass(frozen=True)
class Ranked:
    index: int
    label: str
    probability: float


@dataclass
class Prediction:
    """One file's result: the top classes, or `error` when the file could not be classified."""

    path: str
    top: list[Ranked] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "predictions": [vars(r) for r in self.top],
            "error": self.error,
        }


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, plus the image files under each folder (`data.image_files`: recursive,
    sorted, hidden files and folders skipped, links to folders followed), each file once:
    `photos/ photos/sub/` had classified and counted the images of sub/ twice. The first
    mention of a file keeps its place (and its spelling)."""
    return [file for file, _ in _find_spelled(paths)]


def _find_spelled(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """`find_images`' files, each with the name its row shows: a file named directly as it
    was typed (`./-x.png`, which Path spells `-x.png`, read as an option by `xargs ls`)."""
    found: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for given in paths:
        path = Path(given)
        named = [(f, str(f)) for f in image_files(path)] if path.is_dir() else [
            (path, os.fspath(given))]  # fmt: skip
        for file, spelling in named:
            key = os.path.realpath(file)  # a missing file becomes its own error row, once
            if key not in seen:
                seen.add(key)
                found.append((file, spelling))
    return found


def _meta_for(model: nn.Module) -> Weights:
    meta = input_meta(model)  # a compact model fed 299 px images labelled everything as one
    if getattr(model, "weights_meta", None) is None:
        log.warning("the model carries no weights metadata: using Keras' preprocessing at %dx%d",
                    meta.input_size, meta.input_size)  # fmt: skip
    return meta


def _num_classes(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        return config.num_classes
    return model.fc.out_features  # torchvision's Inception V3


def _in_chans(model: nn.Module) -> int:
    """Input channels the model expects: 3 (RGB) or 1 (grey); anything else is refused."""
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    if in_chans not in (1, 3):
        raise ValueError(
            f"the model takes {in_chans} input channels: image files are read as RGB (3) or grey "
            "(1); feed other inputs to the model from Python"
        )
    return in_chans


def _reason(path: Path, err: Exception) -> str:
    """The error without the path its message starts with: the row names the file already."""
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def check_counts(topk: int, batch_size: int) -> None:
    """`predict`'s check of its two counts, callable before a model is loaded (the CLI's
    `--topk` and `--batch-size`, in the words the user typed through its error rewording)."""
    for name, value, what in (("topk", topk, "classes to list per image"),
                              ("batch_size", batch_size, "images per batch")):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name}={value} is not valid: give at least 1 ({what})")


def predict(
    model: nn.Module,
    paths: str | Path | Iterable[str | Path],
    *,
    topk: int = 5,
    batch_size: int = 8,
    backend: str = "torch",
    progress: bool = False,
) -> Iterator[Prediction]:
    """Classify image files in batches, yielding one `Prediction` per file, in order: `paths`
    (one path, or several) as `xception predict` takes them, folders searched for images
    (`find_images`), so the rows are the command's.

    Images are prepared with `model.weights_meta.transforms()` and labelled with its categories
    (class indices where it has none). `backend` names an entry of `BACKENDS`. `progress` shows
    a tqdm bar on stderr. The arguments and the model are checked, and the backend built, when
    this is called, before the first row is asked for."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available: use one of {', '.join(BACKENDS)}")
    check_counts(topk, batch_size)
    num_classes = _num_classes(model)
    if num_classes < 1:
        raise ValueError(
            "the model has no classifier (num_classes=0): load weights with a classifier, e.g. "
            "'imagenet' rather than 'imagenet-notop'"
        )
    in_chans = _in_chans(model)
    meta = _meta_for(model)
    check_channels(meta, in_chans, "model.weights_meta")  # one set by hand
    categories = meta.categories
    if categories is not None and len(categories) != num_classes:
        # e.g. reset_classifier() after loading: the names belong to the old head
        log.warning("the weights' %d class names do not fit the model's %d classes: "
                    "labelling by index", len(categories), num_classes)  # fmt: skip
        categories = None
    # One path is one file or folder: a string is not a sequence of one-letter paths.
    files = _find_spelled([paths] if isinstance(paths, str | Path) else paths)
    run = BACKENDS[backend](model)
    return _rows(run, files, meta, categories, in_chans, min(topk, num_classes), batch_size,
                 progress)  # fmt: skip


def _rows(run: Runner, paths: list[tuple[Path, str]], meta: Weights, categories, in_chans: int,
          k: int, batch_size: int, progress: bool) -> Iterator[Prediction]:  # fmt: skip
    from tqdm import tqdm

    # The model's channels: an image of any mode as RGB, or its luminance for a 1-channel
    # model (e.g. trained on Fashion-MNIST); metadata set by hand may not say them.
    transform = meta.replace(in_chans=in_chans).transforms()
    # No bar redrawn with carriage returns into a log file (stderr not a terminal).
    with tqdm(total=len(paths), unit="img", desc="predict",
              disable=not (progress and stderr_is_terminal())) as bar:  # fmt: skip
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            results: list[Prediction] = []
            tensors, slots = [], []
            for path, spelling in chunk:
                result = Prediction(spelling)
                try:
                    image = load_image(path)
                    tensors.append(transform(image))
                    slots.append(result)
                except ImageError as err:
                    result.error = _reason(path, err)
                results.append(result)
            if tensors:
                # Softmax, or a sigmoid per class for multi-label weights (the jft recipe's).
                probs = meta.probabilities(run(torch.stack(tensors)).float())
                values, indices = probs.topk(k, dim=-1)
                for result, ps, ids in zip(slots, values.tolist(), indices.tolist(), strict=True):
                    result.top = [
                        Ranked(i, categories[i] if categories else str(i), p)
                        for i, p in zip(ids, ps, strict=True)
                    ]
            bar.update(len(chunk))
            yield from results
