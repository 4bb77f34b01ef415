"""Evaluation: top-1/top-5 on single-label data, MAP@100 on multi-label data, for a model in
memory (`evaluate_model`, used by the training engine every epoch) or for any checkpoint or
weights file the project loads (`evaluate_file`, behind `xception eval`).

Under DDP each rank evaluates its own shard (every rank-th sample, no padding, so nothing is
counted twice) and the sums are added across ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import Meter, average_precision_at_k, topk_correct

__all__ = ["autocast", "evaluate_file", "evaluate_model", "load_for_eval"]

log = logging.getLogger(__name__)


def autocast(device: torch.device, amp: str):
    """Autocast context for `amp` in ('none', 'bf16', 'fp16'); fp16 only on CUDA."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs CUDA; on a CPU use amp='bf16' or 'none'")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _shard_loader(dataset, batch_size: int, rank: int, world: int, workers: int):
    indices = list(range(rank, len(dataset), world))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    base = getattr(dataset, "dataset", dataset)  # a Subset's collate lives on its dataset
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=base.collate, num_workers=workers
    )


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    multilabel: bool = False,
    loss: str = "softmax",
    amp: str = "none",
    channels_last: bool = False,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    map_k: int = 100,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) for single-label data; loss, MAP@k (%) and top-1
    precision (%) for multi-label data, with 'n' the images scored and 'unreadable' those a
    file dataset could not decode (left out, not replaced). Sums are reduced over DDP ranks.
    NaN scores rank as ties; every metric is NaN when no image has a finite output at all (a
    diverged model)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    meter = Meter()
    # Every rank reduces the same names in the same order, also one that scores nothing.
    for name in ("loss", f"map{map_k}", "top1") if multilabel else ("loss", "top1", "top5"):
        meter.update(name, 0.0, 0)
    loader = _shard_loader(dataset, batch_size, rank, world, workers)
    meter.update("unreadable", sum(map(len, loader.batch_sampler)), 1)
    meter.update("unranked", 0, 1)  # images with no finite output at all
    try:
        for x, y in loader:
            if x is None:  # no readable image in this batch
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            n = len(x)
            meter.update("unranked", (~logits.isfinite()).all(1).sum().item(), 0)
            # The sigmoid loss is the training loss's: summed over classes, averaged over images.
            if multilabel:
                meter.update("loss", F.binary_cross_entropy_with_logits(
                    logits, y.float(), reduction="sum").item(), n)  # fmt: skip
                meter.update(
                    f"map{map_k}", average_precision_at_k(logits, y, map_k).sum().item() * 100, n
                )
                # Precision@1 is AP@1 (ties and NaN scored as there, not by argmax's pick).
                meter.update("top1", average_precision_at_k(logits, y, 1).sum().item() * 100, n)
            else:
                if loss == "sigmoid":
                    onehot = F.one_hot(y, logits.shape[1]).float()
                    value = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum")
                else:
                    value = F.cross_entropy(logits, y, reduction="sum")
                meter.update("loss", value.item(), n)
                hits = topk_correct(logits, y, (1, 5))
                meter.update("top1", hits[1] * 100, n)
                meter.update("top5", hits[5] * 100, n)
    finally:
        model.train(was_training)
    meter.sums["unreadable"] -= meter.counts["loss"]  # asked for, less scored
    meter = meter.reduce()
    unreadable = int(meter.sums.pop("unreadable"))
    meter.counts.pop("unreadable")
    unranked = meter.sums.pop("unranked")
    meter.counts.pop("unranked")
    out = meter.means()
    if unranked and unranked == meter.counts.get("loss"):
        # Not one finite output: all tie, and a diverged model had scored about chance, not
        # the null that says it has no accuracy.
        out = dict.fromkeys(out, float("nan"))
    out["n"] = int(meter.counts.get("loss", 0))
    out["unreadable"] = unreadable
    return out


def load_for_eval(
    path: str | Path,
    *,
    model: str | None = None,
    use_ema: bool = True,
    model_args: dict | None = None,
):
    """A model and its metadata from a run folder, a checkpoint folder, a weights file or a
    weights name (`xception.weights.WEIGHTS`, e.g. 'imagenet').

    Returns (model, info) where info has 'classes' (or None), 'image_size', 'mean', 'std',
    'crop_fraction', 'interpolation', 'multilabel', 'loss', 'source', 'config' (the training
    config of a run or checkpoint, else None), 'train_images' (the images in the training part
    of a run's split, before any --train-subset, where it recorded that, else None) and
    'data_path' (the real path of the run's data, where recorded). Run and checkpoint folders
    rebuild the exact model they were trained with; a plain weights file needs `model` (a
    preset name; default 'xception') unless it stores its config, and must hold a classifier,
    which is loaded as it is. Weights that carry their preprocessing (Keras', timm's, ours) are
    evaluated with it.
    `use_ema=False` on a run folder whose final weights are the EMA ones evaluates the raw
    weights of its newest checkpoint; on a weights name or a lone weights file (one set of
    weights) it is a ValueError. `model_args` are config fields a plain weights file was
    trained with where its preset's differ (e.g. {"middle_blocks": 4}), as `create_model` takes
    them; run and checkpoint folders store their config, and refuse them."""
    from . import checkpoint as C
    from . import weights as W
    from .model import default_image_size
    from .zoo import create_model

    named = isinstance(path, str) and path in W.WEIGHTS  # as `create_model(weights=...)` reads it
    path = Path(path)
    if not named and not path.exists():
        raise FileNotFoundError(f"checkpoint or weights not found: {path} (give a run folder, a "
                                "checkpoint folder, a weights file, or a weights name: "
                                f"{', '.join(W.WEIGHTS)})")  # fmt: skip
    if path.is_file() and path.name in ("model.safetensors", "ema.safetensors"):
        # A run's final weights or a checkpoint's: their folder says how the model was built.
        if path.name == "model.safetensors" and (path.parent / "model.json").is_file():
            path = path.parent
        elif (path.parent / "state.pt").is_file():
            if path.name == "ema.safetensors" and not use_ema:  # not scored without a word
                raise ValueError(f"--raw: {path} holds the checkpoint's EMA weights: give the "
                                 f"checkpoint folder {path.parent} (or its model.safetensors) "
                                 "for the raw ones")  # fmt: skip
            path, use_ema = path.parent, path.name == "ema.safetensors"
    card, note = path / "model.json", ""
    run_weights = (not named and path.is_dir() and card.is_file()
                   and (path / "model.safetensors").is_file())  # fmt: skip
    if run_weights:
        try:
            meta = json.loads(card.read_text())
            # Valid JSON of another shape had failed with a KeyError traceback further on.
            keys = ("model", "model_config", "classes", "image_size", "mean", "std",
                    "multilabel", "loss")  # fmt: skip
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not a run's card")
            if any(k not in meta for k in keys):
                missing = ", ".join(k for k in keys if k not in meta)
                raise ValueError(f"no {missing}")
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{card} is damaged ({err}): it says how the run's model was built; "
                             f"evaluate one of the run's checkpoints instead (a step-N folder "
                             f"in {path / 'checkpoints'})") from None  # fmt: skip
        config = meta.get("config")
        if not use_ema and "EMA" in str(meta.get("weights", "")):
            # The run's final weights are the EMA ones: the raw ones live in its checkpoints.
            latest = C.find_latest(path / "checkpoints")
            if latest is None:
                raise C.CheckpointError(f"{path} holds only the run's EMA weights (no checkpoint "
                                        "with the raw ones is left): evaluate the EMA weights "
                                        "(without --raw)")  # fmt: skip
            path, run_weights = latest, False
            note = "; the run folder's model.safetensors holds the EMA weights"
    if run_weights:
        weights = W.load_file(path / "model.safetensors")
        source = str(path / "model.safetensors")
        trained_on = _split_images(meta.get("data") or {}, config)
        data_path = (meta.get("data") or {}).get("path")
    elif not named and (path.is_dir() or path.name in ("state.pt",)):
        ckpt = C.load_checkpoint(path)
        meta, config = ckpt["state"]["meta"], ckpt["state"].get("config")
        trained_on = _split_images(ckpt["state"], config)
        data_path = ckpt["state"].get("data_path")
        weights = ckpt["ema"] if use_ema and ckpt["ema"] is not None else ckpt["model"]
        source = f"{ckpt['path']} ({'EMA' if weights is ckpt['ema'] else 'raw'} weights{note})"
    else:
        spec = str(path) if named else path
        if not use_ema:  # one set of weights: it had been scored as it was, without a word
            raise ValueError(
                f"--raw: {spec} is one set of published weights, with no raw and EMA versions: "
                "drop --raw" if named else
                f"--raw: {path} is a weights file with one set of weights, which is scored as "
                "it is: give the run folder, or one of its checkpoints (checkpoints/step-N), for "
                "the raw weights beside the EMA ones; or drop --raw"
            )  # fmt: skip
        # The weights' own classifier, which must load (a new, random head would be scored);
        # a name without one is refused before its download.
        notop = named and not W.WEIGHTS[spec].num_classes
        if not notop:
            W.refuse_config_overrides(spec, model_args)  # a file of ours keeps its config
        net = None if notop else create_model(model or "xception", weights=spec,
                                              **(model_args or {}))  # fmt: skip
        if not getattr(getattr(net, "fc", None), "out_features", 0):
            raise W.WeightsError(f"{spec}: weights without a classifier (like imagenet-notop): "
                                 "there is nothing to score; evaluate weights with their "
                                 "classifier (imagenet), or train a head on them first "
                                 f"(xception train --weights {spec})")  # fmt: skip
        cfg = getattr(net, "config", None)
        chans = getattr(cfg, "in_chans", 3)
        # The paper's size for every full-size preset (its ablations too); 28 px for compact
        # ones, also when a file restores a compact config under the default name.
        size = 28 if "compact" in (model or "") else default_image_size(net)
        info = dict(classes=None, image_size=size, mean=(0.5,) * chans,
                    std=(0.5,) * chans, crop_fraction=1.0, interpolation="bilinear",
                    multilabel=False, loss="softmax", source=str(spec), config=None,
                    train_images=None, data_path=None)  # fmt: skip
        stored = getattr(net, "weights_meta", None)
        if stored is not None:  # the preprocessing the weights expect (timm's: a centre crop)
            info.update(mean=stored.mean, std=stored.std, crop_fraction=stored.crop_fraction,
                        interpolation=stored.interpolation)  # fmt: skip
            if stored.format == "xception":  # our file: its classes, input size and loss too
                info.update(classes=stored.categories, image_size=stored.input_size,
                            loss=stored.loss)  # fmt: skip
            elif stored.categories and len(stored.categories) == _num_outputs(net):
                # ImageNet's names (Keras', timm's, torchvision's files): folders are matched by
                # name or WordNet ID, so that a subset of the classes (Imagenette) scores too,
                # where sorted order had matched only all 1000.
                info.update(classes=stored.categories)
        return net, info
    if model_args:  # the folder's model is the one it trained: --set had been ignored
        raise ValueError(f"--set {', '.join(model_args)}: {path} stores the config its model was "
                         "trained with, which is used; --set is for a plain weights file that "
                         "holds none")  # fmt: skip
    if model is not None and model != meta["model"]:
        raise ValueError(f"--model {model}: {path} holds a {meta['model']} run, which is "
                         f"rebuilt as it was trained; drop --model (it is for a plain weights "
                         "file)")  # fmt: skip
    if meta["model"] == "inception-v3":  # torchvision's model: no config of ours
        net = create_model("inception-v3", num_classes=len(meta["classes"]))
    else:  # the preset with the run's whole config (inception-v3-compact's is no Xception's)
        net = create_model(meta["model"], **meta["model_config"])
    W.load_into(net, weights, source=source, require_head=True)
    info = {k: meta[k] for k in ("classes", "image_size", "mean", "std", "multilabel", "loss")}
    info.update(source=source, crop_fraction=1.0, interpolation="bilinear", config=config,
                train_images=trained_on, data_path=data_path)  # fmt: skip
    return net, info


def _check_mostly_readable(data, scored: int, unreadable: int, listing) -> None:
    """Refuse data of which most images are unreadable: those that failed to decode among the
    images evaluated, with those left out when the files were listed for failing the header
    check (`listing`: passed, failed; each check had seen only its own part, so 7 of 10 bad
    files passed as 4 of 10, then 3 of 6). Under a --limit sample or a held-out part, the
    decode failures are taken at the sample's rate over the files listed."""
    seen = scored + unreadable
    passed, skipped = listing if listing is not None else (seen, 0)
    if seen == passed:  # every image listed was evaluated: exact counts
        bad, total = unreadable + skipped, seen + skipped
        if bad * 2 > total:
            raise ValueError(f"{data}: {bad} of {total} images are unreadable; check the files "
                             "(the log names them)")  # fmt: skip
    elif (skipped + passed * unreadable / seen) * 2 > passed + skipped:
        raise ValueError(f"{data}: most images are unreadable ({unreadable} of the {seen} "
                         f"evaluated, and {skipped} of the {passed + skipped} files listed); "
                         "check the files (the log names them)")  # fmt: skip


def _split_images(record: dict, config: dict | None) -> int | None:
    """The images in the training part of a run's split (before --train-subset took some), as
    its checkpoint or model card records them; None where that is unknown."""
    if record.get("split_images") is not None:
        return record["split_images"]
    if (config or {}).get("train_subset") is None:  # no subset: the two are the same
        return record.get("train_images")  # not recorded before this field
    return None  # an older run trained on a subset: only the subset's size was recorded


def resolve_device(name: str | torch.device) -> torch.device:
    """ "auto" (CUDA when present, else the CPU), "cpu", "cuda" or "cuda:N", checked: an
    unknown name or a GPU this machine lacks is a ValueError that says what to use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: a traceback deep in the work
        raise ValueError(f"device {name!r} is not supported here: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available: use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} GPU(s)")  # fmt: skip
    return device


def _same_data(data: str | Path, run_path: str | None, run_data: str | None) -> bool:
    """Whether `data` is the dataset a run trained on: the real path the run recorded, or its
    --data value (for runs that did not record the path; a relative one is read from here)."""
    from .data import DataError, resolve_data

    try:
        here = os.path.realpath(resolve_data(data))
    except DataError:
        return False
    if here == run_path:
        return True
    try:
        return run_data is not None and here == os.path.realpath(resolve_data(run_data))
    except DataError:  # the run's data is gone (or was given relative to another folder)
        return False


def _num_outputs(net: torch.nn.Module) -> int | None:
    """The classifier's output count, when the model has a Linear classifier."""
    fc = getattr(net, "fc", None)
    return fc.out_features if isinstance(fc, torch.nn.Linear) else None


def evaluate_file(
    path: str | Path,
    data: str | Path,
    *,
    model: str | None = None,
    batch_size: int = 128,
    device: str = "auto",
    image_size: int | None = None,
    limit: int | None = None,
    use_ema: bool = True,
    workers: int = 0,
    model_args: dict | None = None,
) -> dict:
    """Evaluate a checkpoint/run folder, weights file or weights name on `data` (see
    `data.make_eval_dataset`). Returns a JSON-ready dict of metrics and provenance.

    A run evaluated on the data it trained on, where that data has no validation part, is
    scored on the part training held out ('split' in the result says so), not on images it
    trained on. `limit` scores a seeded sample of that many images, the same every time, spread
    over the data (class folders list their images class by class). `model_args` are config
    fields of a plain weights file's model (see `load_for_eval`)."""
    from .data import make_eval_dataset, resolve_data

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: give at least 1 image per batch")
    if workers < 0:
        raise ValueError(f"workers={workers}: give 0 (decode in this process) or more")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size={image_size}: give the input size in pixels")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: give at least 1 image (or no limit)")
    dev = resolve_device(device)
    resolve_data(data)  # a missing folder is said before the weights are fetched (88 MB) or read
    net, info = load_for_eval(path, model=model, use_ema=use_ema, model_args=model_args)
    size = image_size or info["image_size"]
    in_chans = getattr(getattr(net, "config", None), "in_chans", 3)
    config = info["config"] or {}
    held_out = None
    if _same_data(data, info["data_path"], config.get("data")):
        held_out = (config.get("val_fraction", 0.1), config.get("seed", 0))
    dataset = make_eval_dataset(
        data, image_size=size, classes=tuple(info["classes"]) if info["classes"] else None,
        in_chans=in_chans, mean=tuple(info["mean"]), std=tuple(info["std"]),
        crop_fraction=info["crop_fraction"], interpolation=info["interpolation"],
        held_out=held_out, train_images=info["train_images"],
    )  # fmt: skip
    split = getattr(dataset, "held_out", None)
    listing = getattr(dataset, "listing", None)
    channels = getattr(dataset, "channels", in_chans)  # in-memory IDX images are grey
    if channels != in_chans:
        raise ValueError(f"{data}: {channels}-channel images, but the model takes {in_chans}: "
                         "evaluate on data like its training data")  # fmt: skip
    if info["classes"] is not None and len(dataset.classes) != len(info["classes"]):
        raise ValueError(
            f"{data}: {len(dataset.classes)} classes, but the model was trained on "
            f"{len(info['classes'])}: evaluate on data with the training classes"
        )
    outputs = _num_outputs(net)
    if info["classes"] is None and outputs is not None and len(dataset.classes) != outputs:
        raise ValueError(
            f"{data}: {len(dataset.classes)} classes, but the model has {outputs} outputs: "
            "evaluate on data with the model's classes (its weights name none, so folders are "
            "matched to outputs in sorted order)"
        )
    if limit is not None and limit < len(dataset):
        # A seeded sample, not the first images: those of a class folder layout are one class.
        pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
        dataset = torch.utils.data.Subset(dataset, sorted(pick.tolist()))
    net.to(dev)
    multilabel = bool(getattr(getattr(dataset, "dataset", dataset), "multilabel", False))
    start = time.perf_counter()
    result = evaluate_model(net, dataset, device=dev, batch_size=batch_size,
                            multilabel=multilabel, loss=info["loss"], workers=workers)  # fmt: skip
    elapsed = time.perf_counter() - start
    scored, unreadable = result.pop("n"), result.pop("unreadable")
    if not scored:
        raise ValueError(f"{data}: no images to evaluate" + (
            f" ({unreadable} unreadable)" if unreadable else ""))  # fmt: skip
    _check_mostly_readable(data, scored, unreadable, listing)
    broken = sorted(k for k, v in result.items() if not math.isfinite(v))
    if broken:  # JSON has no NaN: null, and a warning saying why
        log.warning("the model's outputs are not finite (%s): a diverged or overflowing model; "
                    "these metrics are reported as null", ", ".join(broken))  # fmt: skip
    return {
        "checkpoint": info["source"],
        "data": str(data),
        **(
            {"split": f"held out in training (val_fraction={split[0]}, seed={split[1]})"}
            if split
            else {}
        ),
        "images": scored,
        **({"unreadable": unreadable} if unreadable else {}),
        "image_size": size,
        "multilabel": multilabel,
        **{k: round(v, 4) if math.isfinite(v) else None for k, v in result.items()},
        "seconds": round(elapsed, 2),
    }
