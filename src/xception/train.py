"""Training: recipes and the engine behind `xception train`.

API (stable; other modules, e.g. experiments, call it in-process for many short runs):

    from xception.train import fit, make_config
    result = fit("fashion-mnist", epochs=2, train_subset=5000, val_subset=1000, seed=1,
                 out="runs/x", progress=False)
    result["history"]   # one dict per epoch: epoch, step, lr, train_loss, train_top1, val_loss,
                        # val_top1, val_top5 (val_map100 for multi-label), images_per_s,
                        # epoch_s, wall_s (val_top1_raw too when EMA is on: the non-averaged model)
    result["final"]     # the last epoch's dict;  result["best"]: the best epoch's dict
    result["out"], result["weights"], result["params"], result["wall_s"], result["model"]

`fit(config=None, **overrides)` takes a recipe name, a YAML path, a dict or a `TrainConfig`,
then keyword overrides; `make_config` does the same and returns the validated `TrainConfig`.
An unknown key raises ValueError naming it. Rank 0 writes the run folder (`out`): config.yaml,
metrics.csv, curves.png, model.json, model.safetensors (EMA weights when EMA is on, with the model
config and preprocessing in its metadata), checkpoints/.

Exactness: batches, augmentation and checkpoints are functions of (seed, epoch, position), so a
run resumed from any checkpoint (also mid-epoch) repeats the uninterrupted run on a CPU, and a
single process with `accum_steps=N` takes the same steps as N DDP ranks: global batch j holds the
same samples, and micro-batch k of it is exactly what rank k would see (every N-th sample).

Recipes (src/xception/recipes/*.yaml): `imagenet` and `jft` are the paper's; `fashion-mnist` is
a compact Xception sized for a 2-core CPU. Batch-size scaling: `lr` is used as given, unless
`lr_base_batch` is set, in which case lr * batch_size / lr_base_batch is used (the linear
scaling rule of Goyal et al., 2017); the paper does not state its global batch size.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import difflib
import io
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint as C
from . import runtime
from .data import sample_keys
from .deploy import compile_training
from .evaluate import autocast, evaluate_model, resolve_device
from .metrics import Meter, average_precision_at_k, reduce_sums, topk_correct

__all__ = [
    "Interrupted",
    "TrainConfig",
    "TrainingError",
    "fit",
    "list_recipes",
    "load_recipe",
    "make_config",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults are neutral; recipes set real values."""

    recipe: str = "custom"
    # model
    model: str = "xception-compact"
    model_args: dict = field(default_factory=dict)  # XceptionConfig overrides
    drop_rate: float = 0.0
    weights: str | None = None  # fine-tune from these weights (a fresh head if classes differ)
    # data
    data: str = "fashion-mnist"
    image_size: int = 28
    augment: str = "small"  # imagenet | small | none
    crop_padding: int = 2  # augment 'small': random crop with this zero padding (pixels)
    val_fraction: float = 0.1  # held out when the data has no validation part
    train_subset: int | None = None  # first n of a seeded permutation of the training set
    val_subset: int | None = None
    workers: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 128  # global: summed over DDP ranks and accumulation steps
    accum_steps: int = 1
    optimizer: str = "sgd"  # sgd | rmsprop | adamw
    lr: float = 0.1
    lr_base_batch: int | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False  # apply weight decay to BN and bias parameters too
    opt_eps: float = 1e-8  # RMSprop / AdamW epsilon
    rmsprop_alpha: float = 0.9
    schedule: str = "step"  # step | cosine | constant
    lr_decay: float = 0.94  # step: multiply by this ...
    lr_decay_epochs: float = 2.0  # ... every this many epochs,
    lr_decay_samples: int | None = None  # ... or every this many samples (takes precedence)
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine: final lr as a fraction of lr
    loss: str = "softmax"  # softmax | sigmoid (multi-label)
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm
    ema_decay: float | None = None  # Polyak/EMA averaging of the weights
    # engine
    amp: str = "none"  # none | bf16 | fp16 (CUDA)
    channels_last: bool = True
    compile: bool = False
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None
    keep_freed_memory: bool = True  # CPU: glibc reuses freed memory (`runtime`), no page faults
    seed: int = 0
    deterministic: bool = False
    # output
    out: str | None = None
    checkpoint_every: int = 0  # also checkpoint every this many steps (0: per epoch only)
    keep_last: int = 2
    resume: str | None = None  # a checkpoint path, or 'auto' (newest under out/checkpoints)
    eval_batch_size: int = 256
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, hint: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is not valid: {hint}")

        self._check_types()  # from here on every field holds its annotated type
        for name in ("epochs", "batch_size", "accum_steps", "eval_batch_size", "keep_last"):
            if getattr(self, name) < 1:
                raise bad(name, "use a positive integer")
        for name in ("train_subset", "val_subset", "lr_base_batch", "lr_decay_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, "use a positive integer, or leave it unset")
        if not self.lr > 0:
            raise bad("lr", "use a positive learning rate")
        choices = dict(optimizer=("sgd", "rmsprop", "adamw"), schedule=("step", "cosine", "constant"),
                       loss=("softmax", "sigmoid"), amp=("none", "bf16", "fp16"),
                       augment=("imagenet", "small", "none"))  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"use one of {', '.join(allowed)}")
        if self.checkpoint_every < 0:
            raise bad("checkpoint_every", "use a number of steps, or 0 to checkpoint once per "
                      "epoch only")  # fmt: skip
        for name in ("weight_decay", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise bad(name, "use 0 or more")
        if self.warmup_epochs > self.epochs:  # the rate never reached lr, the schedule never ran
            raise bad("warmup_epochs", f"a warm-up longer than the run's epochs={self.epochs}: "
                      "use fewer warm-up epochs (a fraction is fine), or more epochs")  # fmt: skip
        if self.workers < 0:  # torch's message named num_workers, a key that does not exist
            raise bad("workers", "use 0 (load images in the training process) or more")
        for name in ("label_smoothing", "drop_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "use a value in [0, 1), e.g. 0.1")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise bad("ema_decay", "use a decay in (0, 1), e.g. 0.999, or leave it unset")
        if self.out is not None and not self.out.strip():  # it trained into the current folder
            raise bad("out", "give a folder for the run, or leave it unset")
        if self.resume is not None and not str(self.resume).strip():  # it forked the cwd's run
            raise bad("resume", "an empty path (an unset variable?): give a checkpoint path "
                      "or 'auto', or leave it unset")  # fmt: skip
        if self.image_size < 1:
            raise bad("image_size", "use the input size in pixels")
        if not -(2**63) <= self.seed < 2**63:  # torch's generators take 64 bits; seed + epoch
            raise bad("seed", "use a 64-bit signed integer, e.g. 0")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", "use a positive number of threads, or leave it unset (all cores)")
        if self.crop_padding < 0:
            raise bad("crop_padding", "use 0 or more pixels")
        if self.crop_padding >= self.image_size:  # a crop could then be padding alone
            raise bad("crop_padding", f"use fewer pixels than image_size={self.image_size}, "
                      "e.g. an eighth of it")  # fmt: skip
        if not 0 < self.val_fraction < 1:  # checked here too: data with its own validation
            # part never read it, and the same recipe failed on other data
            raise bad("val_fraction", "use a fraction in (0, 1) to hold out, e.g. 0.1")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "use a value in [0, 1), e.g. 0.9")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("momentum=0 with nesterov=true: Nesterov's method needs momentum; "
                             "set nesterov=false for plain SGD")  # fmt: skip
        if not 0 < self.lr_decay <= 1 or not self.lr_decay_epochs > 0:
            raise ValueError(f"lr_decay={self.lr_decay!r} every lr_decay_epochs="
                             f"{self.lr_decay_epochs!r} is not valid: use a factor in (0, 1] "
                             "and a positive number of epochs, e.g. 0.94 every 2")  # fmt: skip
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "use a fraction of lr in [0, 1]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise bad("grad_clip", "use a positive gradient norm, or leave it unset")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by accum_steps="
                             f"{self.accum_steps}")  # fmt: skip
        if not 0 <= self.rmsprop_alpha < 1:
            raise bad("rmsprop_alpha", "use a decay in [0, 1), e.g. 0.9")
        if not self.opt_eps > 0:
            raise bad("opt_eps", "use a small positive number, e.g. 1e-8")
        if self.amp == "fp16" and self.device == "cpu":
            raise bad("amp", "fp16 needs CUDA; on a CPU use bf16 or none")
        inner = self.model_args.get("drop_rate") if isinstance(self.model_args, dict) else None
        if self.drop_rate and inner is not None and inner != self.drop_rate:
            raise ValueError(f"drop_rate={self.drop_rate} and model_args.drop_rate={inner} both "
                             "set the classifier's dropout: give one of them")  # fmt: skip
        fixed = sorted(set(self.model_args) & {"in_chans", "num_classes"})
        if fixed:
            raise ValueError(f"model_args.{fixed[0]} is set from the data (its channels and "
                             "classes): leave it out")  # fmt: skip

    def _check_types(self) -> None:
        """Each field holds its annotated type. A float field also takes an int and a numeric
        string: YAML 1.1 reads `1e-3` (no dot) as text, and `--set lr=1e-3` should just work."""
        kinds = {"str": ((str,), "text"), "int": ((int,), "an integer"),
                 "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
                 "dict": ((dict,), "a mapping")}  # fmt: skip
        for f in dataclasses.fields(self):
            kind, _, rest = str(f.type).partition("|")
            kind, optional = kind.strip(), rest.strip() == "None"
            types, what = kinds[kind]
            value = getattr(self, f.name)
            if value is None and optional:
                continue
            if kind == "float" and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    value = float(value)
                    object.__setattr__(self, f.name, value)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                expected = what
            elif kind == "float" and not math.isfinite(value):
                expected = "a finite number"
            else:
                continue
            unset = ", or leave it unset" if optional else ""
            example = ("" if f.default in (None, dataclasses.MISSING)
                       else f" (e.g. {f.name}={str(f.default).lower()})")  # fmt: skip
            raise ValueError(
                f"{f.name}={value!r} is not valid: expected {expected}{unset}{example}"
            )

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields a resumed run may change; all others come from the checkpoint (the run's identity).
# `data` too, for data that moved (a job's local scratch copy): it must hold the run's classes
# and training images (checked), or a resume could never find it again. Changed, `threads`,
# `device` and `compile` change the training step's rounding and `eval_batch_size` the
# validation sums': such a resume continues the run, but not bitwise as the uninterrupted one.
RESUMABLE = ("epochs", "out", "resume", "progress", "workers", "device", "threads", "compile",
             "checkpoint_every", "keep_last", "tensorboard", "eval_batch_size",
             "keep_freed_memory", "grad_checkpointing", "data")  # fmt: skip
# Of those, the ones a resume keeps from the checkpoint unless they are given: without its
# recipe a resume used to extend a finished run to the default recipe's epochs, and to take the
# defaults' threads (all cores: no longer bitwise the uninterrupted run), workers (0: ImageNet
# decoded in the main process) and progress. The run folder, the checkpoint and the device
# (resolved before the checkpoint is read: the GPU of this rank on this machine) come from the
# current config.
RUN_SETTINGS = tuple(k for k in RESUMABLE if k not in ("out", "resume", "device"))


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is intact.
    `detail` says what happened and `advice` what to change in the config, apart, so that a
    caller whose users cannot change the config (`xception experiment`) can give its own."""

    def __init__(self, detail: str, advice: str = "") -> None:
        self.detail, self.advice = detail, advice
        super().__init__(f"{detail}. {advice}" if advice else detail)


_DIVERGED = "Lower lr, set grad_clip, or check the data"


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"stopped by {name}; {where}")


# ---------------------------------------------------------------------------------------------
# Recipes and configuration
# ---------------------------------------------------------------------------------------------
def list_recipes() -> list[str]:
    folder = resources.files("xception") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_recipe(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A recipe's keys: a bundled name (see `list_recipes`) or a YAML file. A file may name a
    base recipe with `recipe: NAME` (a bundled name, or another YAML file, relative to this
    one) and override some of its keys."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        if path.resolve() in _seen:
            raise ValueError(f"{path}: its base recipes name each other in a loop")
        data = _read_yaml(path.read_text(), str(path))
        base = data.get("recipe")
        if base is None:
            return data
        if Path(str(base)).suffix in (".yaml", ".yml"):  # another file, beside this one
            merged = load_recipe(path.parent / str(base), (*_seen, path.resolve()))
            # Named after the bundled recipe at the chain's root, else 'custom' (as a file
            # without a base is): a path here became the default run folder's name.
            return {**_over(merged, data), "recipe": merged.get("recipe", "custom")}
        # An unknown name is an error with the closest names (a typo used to train on bare
        # defaults).
        return _over(load_recipe(str(base)), data)
    names = list_recipes()
    if str(name_or_path) not in names:
        close = difflib.get_close_matches(str(name_or_path), names, n=2)
        hint = f"did you mean {', '.join(close)}?" if close else f"use one of {', '.join(names)}"
        raise ValueError(f"unknown recipe {name_or_path!r}: {hint} (or a .yaml file)")
    text = (resources.files("xception") / "recipes" / f"{name_or_path}.yaml").read_text()
    return {**_read_yaml(text, f"recipe {name_or_path}"), "recipe": str(name_or_path)}


def _over(base: dict, changes: dict) -> dict:
    """`changes` over `base`, model_args merged key by key as `--set model_args.X` merges them: a
    file's `model_args: {middle_blocks: 2}` used to drop every model_args its base recipe set."""
    merged = {**base, **changes}
    if isinstance(base.get("model_args"), dict) and isinstance(changes.get("model_args"), dict):
        merged["model_args"] = {**base["model_args"], **changes["model_args"]}
    return merged


def _check_keys(keys, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=2)
            hint = (f"did you mean {', '.join(close)}?" if close
                    else f"valid keys: {', '.join(valid)}")  # fmt: skip
            raise ValueError(f"unknown recipe key {key!r} in {where}: {hint}")


def make_config(config: str | Path | dict | TrainConfig | None = None, **overrides) -> TrainConfig:
    """A validated TrainConfig from a recipe name, a YAML path, a dict or a TrainConfig,
    with `overrides` applied on top (None values in overrides are ignored)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_keys(overrides, "overrides")
    if isinstance(config, TrainConfig):
        return config.replace(**overrides)
    if config is None:
        base: dict = {}
    elif isinstance(config, dict):
        base = dict(config)
        if base.get("recipe", "custom") != "custom":  # a base recipe: a name or a YAML file
            base = _over(load_recipe(base["recipe"]), base)
    else:
        base = load_recipe(config)
    _check_keys(base, f"recipe {config}" if not isinstance(config, dict) else "config")
    merged = _over(base, overrides)
    if "model_args" in merged and not isinstance(merged["model_args"], dict):
        raise ValueError("model_args must be a mapping of model config fields")
    return TrainConfig(**merged)


# ---------------------------------------------------------------------------------------------
# Engine pieces
# ---------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a model's weights and float buffers (Polyak averaging,
    as the paper uses for inference). The decay ramps up as (1 + t) / (10 + t) early on so the
    average is not dominated by the random initialisation in short runs."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._pairs is None:
            own, live = self.module.state_dict(), model.state_dict()
            self._pairs = [(own[k], live[k]) for k in own]
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats = [(e, v) for e, v in self._pairs if e.dtype.is_floating_point]
        torch._foreach_lerp_([e for e, _ in floats], [v for _, v in floats], 1.0 - d)
        for e, v in self._pairs:
            if not e.dtype.is_floating_point:
                e.copy_(v)


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The optimizer steps of the linear warm-up: warmup_epochs' worth, rounded."""
    return round(cfg.warmup_epochs * steps_per_epoch)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): warm-up, then the schedule."""
    total = cfg.epochs * steps_per_epoch
    warmup = warmup_steps(cfg, steps_per_epoch)
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if cfg.schedule == "step":
        if cfg.lr_decay_samples:
            # By the samples seen before this step: a period of whole steps (3M // 256) had
            # decayed 192 samples early per decay, a growing lead over the run.
            decays = step * cfg.batch_size // cfg.lr_decay_samples
        else:
            decays = step // max(1, round(cfg.lr_decay_epochs * steps_per_epoch))
        factor *= cfg.lr_decay**decays
    elif cfg.schedule == "cosine":
        t = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        factor *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    if cfg.decay_norm_and_bias or cfg.weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)  # fmt: skip
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=cfg.rmsprop_alpha, eps=cfg.opt_eps,
                                   momentum=cfg.momentum, weight_decay=cfg.weight_decay)  # fmt: skip
    return torch.optim.AdamW(groups, lr=lr, eps=cfg.opt_eps, weight_decay=cfg.weight_decay)


class _Signals:
    """Turns SIGINT/SIGTERM into a flag the training loop polls after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _uses_cuda(name: str) -> bool:
    """Whether device `name` means the GPU for this process. "auto" means CUDA only when every
    local rank of torchrun gets a GPU of its own; otherwise (say 2 ranks on a 1-GPU machine) all
    ranks train on the CPU, with a warning."""
    if name != "auto":
        return resolve_device(name).type == "cuda"  # a clear error for names it cannot use
    if not torch.cuda.is_available():
        return False
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if ranks > torch.cuda.device_count():
        log.warning("%d local ranks but %d GPU(s): device 'auto' trains on the CPU; start "
                    "torchrun with --nproc_per_node %d to use the GPUs", ranks,
                    torch.cuda.device_count(), torch.cuda.device_count())  # fmt: skip
        return False
    return True


def _resolve_device(name: str) -> torch.device:
    if not _uses_cuda(name):
        return torch.device(name if name != "auto" else "cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available: use device='cpu'")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if name in ("auto", "cuda"):
        device = torch.device("cuda", local)
    else:
        device = torch.device(name)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if per_node > 1:  # every rank on that one GPU: NCCL's "Duplicate GPU detected" per rank
            raise ValueError(f"device={name!r} with {per_node} torchrun processes on this node "
                             "would put them all on one GPU: use device='cuda' (or 'auto'), "
                             "which gives each process the GPU of its LOCAL_RANK")  # fmt: skip
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device} does not exist: this machine has {torch.cuda.device_count()} "
            "GPU(s); start torchrun with at most that many processes per node, or use "
            "device='cpu'"
        )
    return device


def _subset(dataset, n: int | None, seed: int):
    if n is None or n >= len(dataset):
        return dataset
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.Subset(dataset, sorted(perm[:n].tolist()))


def _base(dataset):
    return dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset


# The epoch order's version, recorded in checkpoints: 1 seeded the permutation with seed +
# epoch, so seed 1's epoch 0 was seed 0's epoch 1 (the seeds of a multi-seed experiment shared
# their orders, shifted); 2 seeds it with a hash of both. A run resumes in its own.
BATCH_ORDER = 2


class _EpochBatches(torch.utils.data.Sampler):
    """Per-rank batches of one epoch: DistributedSampler's permutation, seeded by a hash of
    (seed, epoch) (`order` 1: seed + epoch), every world-th sample to each rank, incomplete
    global batches dropped, the first `start` skipped (a mid-epoch resume never loads the
    batches it skips)."""

    def __init__(self, n: int, per_rank: int, rank: int, world: int, seed: int, dataset,
                 order: int = BATCH_ORDER) -> None:  # fmt: skip
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.per_rank, self.start, self.seed, self.order = per_rank, 0, seed, order
        self.num_batches = n // (per_rank * world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if self.order == 1:
            self.sampler.set_epoch(epoch)
        else:
            key = sample_keys(self.seed ^ 0x0DE5, epoch, [0])[0] >> np.uint64(1)
            self.sampler.seed = int(key)
            self.sampler.set_epoch(0)
        self.start = start

    def __len__(self) -> int:
        return self.num_batches - self.start

    def __iter__(self):
        mine = list(self.sampler)
        for j in range(self.start, self.num_batches):
            yield mine[j * self.per_rank : (j + 1) * self.per_rank]


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
def given_keys(config: str | Path | dict | TrainConfig | None, overrides: dict) -> set[str]:
    """The config keys a caller set: those `config` names (a recipe, a YAML file, a dict; all
    of them for a TrainConfig) and the non-None `overrides`."""
    if isinstance(config, TrainConfig):
        return {f.name for f in dataclasses.fields(TrainConfig)}
    named = set(config) if isinstance(config, dict) else set()
    if isinstance(config, str | Path):
        named = set(load_recipe(config))
    elif isinstance(config, dict) and config.get("recipe", "custom") != "custom":
        named |= set(load_recipe(config["recipe"]))
    return named | {k for k, v in overrides.items() if v is not None}


def fit(config: str | Path | dict | TrainConfig | None = None, *, given: Iterable[str] | None = None,
        **overrides) -> dict:  # fmt: skip
    """Train as configured (see the module docstring) and return the result dict.

    Resuming, the run's settings in RUN_SETTINGS (epochs, checkpoint interval, ...) come from
    the checkpoint unless `given` names them; `given` defaults to the keys `config` and
    `overrides` set (`given_keys`): `fit(None, resume=ckpt)` continues the run as it was.

    Raises Interrupted after SIGINT/SIGTERM (checkpoint saved), TrainingError on a non-finite
    loss, ValueError/DataError/CheckpointError for bad input."""
    given = set(given) if given is not None else given_keys(config, overrides)
    cfg = make_config(config, **overrides)
    device = _resolve_device(cfg.device)  # once: the process group needs it before the run
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        created = True
    try:
        return _Run(cfg, device, given).run()
    finally:
        if created:
            dist.destroy_process_group()


RESULT_FILES = ("model.safetensors", "model.json", "metrics.csv")


def refuse_replacing_results(out: str | Path) -> None:
    """Refuse a run into folder `out` when it holds a run's results but no checkpoint (removed
    to save space once the run was done): the new run would replace its metrics at its first
    epoch and its final weights at the end. Raises ValueError naming the files and the fix."""
    results = [n for n in RESULT_FILES if (Path(out) / n).is_file()]
    if results:
        raise ValueError(f"{out} holds a finished run's results ({', '.join(results)}) and no "
                         "checkpoint to continue from: a run there would replace them. Choose "
                         "another --out, or move them away first")  # fmt: skip


class _LineProgress:
    """The epoch's progress for a stderr that is not a terminal (a log file): a plain log line
    at most every `every` seconds, where tqdm redrew its bar with carriage returns several
    times a second. Takes the calls the epoch loop makes of a tqdm bar."""

    def __init__(self, total: int, initial: int, desc: str, every: float = 60.0) -> None:
        self.total, self.n, self.desc, self.every = total, initial, desc, every
        self.last, self.postfix = time.monotonic(), ""

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every and self.n < self.total:
            self.last = now
            log.info("%s: batch %d/%d%s", self.desc, self.n, self.total, self.postfix)

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


class _Run:
    def __init__(self, cfg: TrainConfig, device: torch.device, given: set[str]) -> None:
        self.device, self.given = device, given
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.cfg = cfg
        self.resume_from: dict | None = None
        resume = cfg.resume
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and (
            resume is None
            or (cfg.out is not None and C.find_latest(Path(cfg.out) / "checkpoints") is not None)
        ):
            # torchrun --max-restarts restarted us: continue from the run's last save, also in
            # a job started with --resume PATH (its fork's folder, or its own, has newer ones).
            resume = "auto"
        # A run still writing into the folder: said first, not "already holds a run: continue
        # it with --resume auto" (wrong while it runs), nor its half-read newest checkpoint.
        if cfg.out is not None:
            self._refuse_if_in_use(Path(cfg.out))
        if resume is not None:
            self._load_resume(resume)
        out_given, cfg = cfg.out is not None, self.cfg
        if cfg.out is None:
            raise ValueError("no output folder: set out (--out DIR)")
        self.out = Path(cfg.out)
        if not out_given:  # the run folder of the checkpoint resumed
            self._refuse_if_in_use(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out={cfg.out!r} is a file: give a folder for the run")
        if not self.out.is_dir():  # before the set-up: a file above it, /proc, a dangling link
            C.check_output_file(self.out / "config.yaml")
        self.ckpt_dir = self.out / "checkpoints"
        holds_a_run = C.find_latest(self.ckpt_dir) is not None
        if self.resume_from is None and holds_a_run:
            raise ValueError(
                f"{self.out} already holds a run: continue it with --resume auto, or choose "
                "another --out"
            )
        if not holds_a_run:
            refuse_replacing_results(self.out)
        if self.resume_from is not None and holds_a_run:
            own = Path(self.resume_from["path"]).resolve().parent.parent
            if own != self.out.resolve():  # the checkpoint belongs to another run's folder
                raise ValueError(
                    f"{self.out} already holds another run: resuming {self.resume_from['path']} "
                    f"there would replace its checkpoints and results. Resume in the "
                    f"checkpoint's own run (--out {own}), or in a new folder to fork it"
                )
            newest = C.find_latest(self.ckpt_dir)
            if self.resume_from["state"]["step"] < (C.checkpoint_step(newest) or 0):
                # Pruning keeps the highest steps: the resumed run's own saves went first.
                try:
                    _load_for_resume(newest, state_only=True)
                except C.CheckpointError as err:  # `--resume auto` would fail on it too
                    raise ValueError(
                        f"{self.resume_from['path']} is older than {newest.name} in the same "
                        f"run, which cannot be resumed ({err}): move {newest} out of "
                        f"{newest.parent}, then --resume auto continues from the newest intact "
                        "checkpoint"
                    ) from None
                raise ValueError(
                    f"{self.resume_from['path']} is older than {newest.name} in the same run: "
                    "resumed there, the run's new checkpoints would be pruned as soon as "
                    "written. Resume it in a new folder to fork the run (--out NEW_FOLDER), or "
                    "continue from the newest (--resume auto)"
                )

    def _refuse_if_in_use(self, folder: Path) -> None:
        """Stop every rank when another run holds `folder` (rank 0 looks; its lock is taken
        later, in `_run`, and the others wait here for its answer)."""
        refused = None
        if self.rank == 0 and folder.is_dir():
            try:
                C.check_run_folder_free(folder)
            except ValueError as err:
                refused = err
        self._stop_together(refused, folder)

    def _stop_together(self, refused: ValueError | None, folder: Path) -> None:
        """Raise rank 0's refusal of `folder` on every rank: the others would wait in their
        next collective call (a collective call itself, made by all ranks)."""
        if self.distributed and reduce_sums([float(refused is not None)], self.device)[0]:
            refused = refused or ValueError(f"{folder} is in use by another training run "
                                            "(named on rank 0)")  # fmt: skip
        if refused is not None:
            raise refused

    def _info(self, msg: str, *args) -> None:
        """Progress news, once per run: from rank 0 only under torchrun."""
        if self.rank == 0:
            log.info(msg, *args)

    def _load_resume(self, resume: str) -> None:
        cfg = self.cfg
        if resume == "auto":
            if cfg.out is None:
                raise ValueError("resume='auto' needs the run folder: set out (--out DIR)")
            latest = C.find_latest(Path(cfg.out) / "checkpoints")
            if latest is None:
                self._info("no checkpoint under %s: starting a new run", cfg.out)
                return
            resume = str(latest)
            try:
                ckpt = _load_for_resume(resume)
            except C.CheckpointError as err:
                raise _past_damaged(err, latest) from None
        else:
            ckpt = _load_for_resume(resume)
        saved = ckpt["state"]["config"]
        if cfg.out is None:
            # The run folder holds checkpoints/step-N: a checkpoint copied elsewhere had made
            # its grandparent (a home folder) the run's, written over its config.yaml.
            folder = Path(ckpt["path"]).parent
            if folder.name != "checkpoints":
                raise ValueError(f"resume={str(resume)!r}: the checkpoint is not in a run's "
                                 "checkpoints/ folder, so there is no run folder to continue "
                                 "in: set out (--out DIR; a new folder forks the run there)")  # fmt: skip
            self.cfg = cfg = cfg.replace(out=str(folder.parent))
        keep = {k: getattr(cfg, k) for k in RESUMABLE
                if k not in RUN_SETTINGS or k in self.given or k not in saved}  # fmt: skip
        _check_keys(saved, f"checkpoint {ckpt['path']}")
        if saved.get("amp") == "fp16" and self.device.type != "cuda":
            # Not "the checkpoint's config is not valid": every save of such a run has it, and
            # --amp bf16 is no fix, as a resume keeps the run's amp.
            raise ValueError(f"{ckpt['path']} is of a run trained with amp='fp16', which needs "
                             "CUDA: resume it on a machine with a GPU (device='cuda' or 'auto'), "
                             "or start a new run here (--weights from its checkpoint "
                             "fine-tunes)")  # fmt: skip
        try:
            self.cfg = TrainConfig(**{**saved, **keep})
        except ValueError as err:  # the given values were checked already: the saved ones
            raise C.CheckpointError(f"{ckpt['path']}/state.pt: the run's config in it is not "
                                    f"valid ({err}); resume from another checkpoint") from None  # fmt: skip
        # Data spelt relative to the folder the run started in is found from another folder by
        # the real path the run recorded (a resume from elsewhere had needed --data again).
        recorded = ckpt["state"].get("data_path")
        data = self.cfg.data
        if ("data" not in self.given and recorded and data not in ("fashion-mnist", "mnist")
                and not Path(data).expanduser().exists() and Path(recorded).exists()):  # fmt: skip
            self._info("the run's data %s is not found from %s: using %s, where the run read it",
                       data, os.getcwd(), recorded)  # fmt: skip
            self.cfg = self.cfg.replace(data=recorded)

        # What was given and cannot change in a resume is said, not dropped without a word
        # (only the CLI said it): the run's own value stays.
        def given(key):  # model_args given are some keys: the others are the run's own
            value = getattr(cfg, key)
            return {**self.cfg.model_args, **value} if key == "model_args" else value

        dropped = [k for k in sorted(self.given) if k not in RESUMABLE and k in saved
                   and given(k) != getattr(self.cfg, k)]  # fmt: skip
        if dropped and self.rank == 0:
            log.warning("a resume continues the run as it was configured: %s given here not "
                        "applied, the run's %s kept (start a new run to change them)",
                        ", ".join(f"{k}={getattr(cfg, k)!r}" for k in dropped),
                        ", ".join(f"{k}={getattr(self.cfg, k)!r}" for k in dropped))  # fmt: skip
        self.resume_from = ckpt

    # set-up ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        from .data import make_datasets, resolve_data
        from .zoo import create_model

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.keep_freed_memory and self.device.type == "cpu":
            # Process-wide, like the threads, seed and signal handlers the engine sets.
            runtime.keep_freed_memory()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(cfg.seed)
        train, val = make_datasets(cfg.data, image_size=cfg.image_size, augment=cfg.augment,
                                   padding=cfg.crop_padding, val_fraction=cfg.val_fraction,
                                   seed=cfg.seed)  # fmt: skip
        self.classes = train.classes
        self.multilabel = bool(train.multilabel)
        if self.multilabel and cfg.loss != "sigmoid":
            raise ValueError("multi-label data needs loss='sigmoid' (the jft recipe uses it)")
        self.channels = getattr(train, "channels", 3)
        self.norm = (tuple(train.mean.flatten().div(255).tolist()),
                     tuple(train.std.flatten().div(255).tolist())) if hasattr(train, "channels") \
            else ((0.5,) * 3, (0.5,) * 3)  # fmt: skip
        # What eval needs to take the run's held-out part again (the data spelt relative to
        # another folder, and the split's training part before --train-subset).
        self.data_path = os.path.realpath(resolve_data(cfg.data))
        self.split_images = len(train)
        self.train_set = _subset(train, cfg.train_subset, cfg.seed)
        self.val_set = _subset(val, cfg.val_subset, cfg.seed + 1)
        if len(val) == 0:  # every epoch had been scored NaN, and the run gone on to its end
            from .data import DataError

            raise DataError(f"{cfg.data}: its validation part holds no images, so no epoch can "
                            "be scored: give data with images in its test split or val/ folder, "
                            "or hold some out of the training images (val_fraction)")  # fmt: skip
        if self.resume_from is not None:
            self._check_same_data()
        per_rank = cfg.batch_size // self.world
        if cfg.batch_size % self.world or per_rank % cfg.accum_steps:
            raise ValueError(
                f"batch_size={cfg.batch_size} must be divisible by the {self.world} ranks "
                f"times accum_steps={cfg.accum_steps}"
            )
        # A run resumes in the epoch order it began in (checkpoints before BATCH_ORDER: 1).
        self.batch_order = (self.resume_from["state"].get("batch_order", 1)
                            if self.resume_from is not None else BATCH_ORDER)  # fmt: skip
        self.sampler = _EpochBatches(len(self.train_set), per_rank, self.rank, self.world,
                                     cfg.seed, self.train_set, self.batch_order)  # fmt: skip
        self.steps_per_epoch = self.sampler.num_batches
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size={cfg.batch_size} is larger than the {len(self.train_set)} "
                "training samples: lower batch_size"
            )
        warmup = warmup_steps(cfg, self.steps_per_epoch)
        if cfg.warmup_epochs > 0 and warmup <= 1 and self.rank == 0:
            # Step s runs at (s + 1) / warmup of the rate: 0 or 1 warm-up step is none.
            log.warning("warmup_epochs=%s is %d step(s) at %d steps an epoch: no step runs "
                        "below the full learning rate; give more warmup_epochs, or a smaller "
                        "batch_size", _fmt(cfg.warmup_epochs), warmup, self.steps_per_epoch)  # fmt: skip
        # Its own generator, seeded per epoch in _train_epoch: each iterator draws its workers'
        # base seed from it. From the global generator, a mid-epoch resume's extra iterator
        # shifted the torch RNG state every later checkpoint records.
        self.loader_generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=_base(train).collate,
            num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
            generator=self.loader_generator,
        )  # fmt: skip

        if cfg.model == "inception-v3" and self.channels != 3:
            # Its first convolution takes RGB: the first step failed with a traceback.
            raise ValueError(f"model=inception-v3 takes 3-channel (RGB) images, and {cfg.data} "
                             f"has {self.channels}: use inception-v3-compact (any channels, "
                             "small images) or an xception model")  # fmt: skip
        # model_args go to every model: inception-v3 refuses those it does not take, by name
        # (they used to be dropped without a word).
        kw = dict(num_classes=len(self.classes), in_chans=self.channels, **cfg.model_args)
        if cfg.drop_rate:
            kw["drop_rate"] = cfg.drop_rate
        if self.resume_from is None:
            model = create_model(cfg.model, weights=cfg.weights, **kw)
        else:  # every weight is in the checkpoint: its --weights file may be gone by now
            saved = self.resume_from["state"]["meta"].get("model_config")
            model = create_model(cfg.model, **(saved or kw))
        self.params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"grad_checkpointing=true: model {cfg.model} cannot recompute its "
                                 "blocks (torchvision's Inception V3): use inception-v3-compact or "
                                 "an xception model, or drop grad_checkpointing")  # fmt: skip
            model.set_grad_checkpointing(True)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
        self.lr = cfg.lr * cfg.batch_size / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr
        self.optimizer = make_optimizer(model, cfg, self.lr)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp='fp16' needs CUDA; on a CPU use bf16 or none")
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        # Dropout draws from the global generator, which a resume or another loader iterator
        # would shift: each micro-batch seeds it from (seed, step, its index in the global
        # batch) instead, so a resumed run and N ranks equal one process with accum_steps=N.
        self.seeded_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
        self.batch_norms = [m for m in model.modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm)
                            and m.track_running_stats]  # fmt: skip
        net = model
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        # Compiled on one CUDA device, the step is replayed as CUDA graphs: there a batch-32
        # step of the eager model is bound by kernel launches (benchmarks/BENCHMARKS.md). Not
        # under DDP (its hooks run between the graphs) nor with accumulated micro-batches (a
        # replay would overwrite the gradients that the next micro-batch adds to).
        self.cuda_graphs = bool(cfg.compile and self.device.type == "cuda"
                                and not self.distributed and cfg.accum_steps == 1)  # fmt: skip
        if cfg.compile:
            net = compile_training(net, self.cuda_graphs)
        self.net = net

        # progress state
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.history: list[dict] = []
        self.partial: dict = {}
        if self.resume_from is not None:
            try:
                self._restore(self.resume_from)
            except C.CheckpointError as err:  # damage only the restore finds
                raise _past_damaged(err, Path(self.resume_from["path"])) from None

    def _check_same_data(self) -> None:
        """A resume's data (moved, perhaps) is the run's: its classes and training images."""
        state, path = self.resume_from["state"], self.resume_from["path"]
        saved = state["meta"]["classes"]
        if list(self.classes) != list(saved):
            shown = ", ".join(saved[:5]) + (", ..." if len(saved) > 5 else "")
            raise ValueError(f"{self.cfg.data} holds other classes than the run was trained on "
                             f"({len(saved)}: {shown}): resume with the run's data, or start a "
                             f"new run from its weights (--weights {path}/model.safetensors)")  # fmt: skip
        # The split's training part before --train-subset, then the subset (the first is not
        # recorded by older checkpoints; one image more draws another subset).
        for key, have in (("split_images", self.split_images),
                          ("train_images", len(self.train_set))):  # fmt: skip
            images = state.get(key)
            if images is not None and images != have:
                raise ValueError(f"{self.cfg.data} has {have} training images, the run had "
                                 f"{images}: its batches would not continue the run's. Resume "
                                 "with the run's data, or start a new run from its weights "
                                 f"(--weights {path}/model.safetensors)")  # fmt: skip

    def _restore(self, ckpt: dict) -> None:
        state, path = ckpt["state"], Path(ckpt["path"])
        _load_exact(self.model, ckpt["model"], path / "model.safetensors")
        if self.ema is not None:
            if ckpt["ema"] is None:
                raise C.CheckpointError(f"{path / 'ema.safetensors'}: missing, and the run keeps "
                                        f"EMA weights (ema_decay={self.cfg.ema_decay}): the "
                                        "checkpoint is incomplete; resume from another "
                                        "checkpoint")  # fmt: skip
            _load_exact(self.ema.module, ckpt["ema"], path / "ema.safetensors")
            self.ema.updates = state.get("ema_updates", 0)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise C.CheckpointError(f"{path / 'state.pt'}: its optimizer state does not fit the "
                                    f"run's model ({first}): its files come from different runs; "
                                    "resume from another checkpoint") from None  # fmt: skip
        C.restore_rng_state(state["rng"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.step, self.history = state["step"], list(state["history"])
        started = self.epoch + (1 if self.batch_in_epoch else 0)
        if self.cfg.epochs < started:
            # The run "finished" at once, exported the checkpoint's weights as its final ones
            # (from the middle of a later epoch) and recorded the fewer epochs in config.yaml.
            where = (f"is {self.batch_in_epoch} step(s) into epoch {started}" if self.batch_in_epoch
                     else f"has trained {self.epoch} epoch(s)")  # fmt: skip
            raise ValueError(f"epochs={self.cfg.epochs} is fewer than the run has done: "
                             f"{ckpt['path']} {where}. Give --epochs {started} or more, or leave "
                             "it out to continue as the run was configured")  # fmt: skip
        self.partial = dict(state.get("partial", {}))
        self.best = state.get("best")
        self._info("resumed from %s (epoch %d, step %d)", ckpt["path"], self.epoch, self.step)
        saved_epochs = state["config"].get("epochs", self.cfg.epochs)
        if self.cfg.schedule == "cosine" and saved_epochs != self.cfg.epochs and self.step:
            # Allowed (a run extended with --epochs), but the cosine's length is the run's:
            # from here on the learning rate follows another curve, without a word before.
            was = lr_factor(self.cfg.replace(epochs=saved_epochs), self.step, self.steps_per_epoch)
            now = lr_factor(self.cfg, self.step, self.steps_per_epoch)
            if self.rank == 0:
                log.warning("epochs=%d where the run had %d: its cosine schedule is stretched over "
                            "%d epochs from step %d on, and the learning rate goes from %.4g to "
                            "%.4g (neither the %d-epoch run nor a %d-epoch one from the start)",
                            self.cfg.epochs, saved_epochs, self.cfg.epochs, self.step,
                            self.lr * was, self.lr * now, saved_epochs,
                            self.cfg.epochs)  # fmt: skip
        saved_world = state.get("world", self.world)  # not recorded before this field
        if saved_world != self.world and self.rank == 0:
            log.warning("%s was written by %d process(es), resumed by %d: each one's share of "
                        "the batch changes, and the batch-norm statistics that follow it, so the "
                        "run does not continue exactly as it would have; resume with %d to "
                        "continue it exactly", ckpt["path"], saved_world, self.world,
                        saved_world)  # fmt: skip

    # checkpoints and outputs --------------------------------------------------------------------
    def _meta(self) -> dict:
        cfg = self.cfg
        model_config = self.model.config.to_dict() if hasattr(self.model, "config") else None
        return dict(model=cfg.model, model_config=model_config, classes=list(self.classes),
                    image_size=cfg.image_size, mean=list(self.norm[0]), std=list(self.norm[1]),
                    multilabel=self.multilabel, loss=cfg.loss, in_chans=self.channels)  # fmt: skip

    def _save(self, name: str, meter: Meter | None = None) -> Path | None:
        path = None
        # All ranks' part of the epoch so far (a collective call: every rank saves together);
        # rank 0 carries it on after a resume, the others start from zero.
        meter = meter.reduce() if meter is not None else None
        self._check_finite()
        if self.rank == 0:
            state = dict(
                config=self.cfg.to_dict(), meta=self._meta(), epoch=self.epoch,
                batch_in_epoch=self.batch_in_epoch, step=self.step,
                optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                scheduler={"name": self.cfg.schedule, "step": self.step}, rng=C.rng_state(),
                history=self.history, best=self.best,
                partial={"sums": meter.sums, "counts": meter.counts, "seconds": self._seconds(),
                         "wall_s": time.perf_counter() - self.start_wall}
                if meter is not None else {},
                ema_updates=self.ema.updates if self.ema else 0, world=self.world,
                train_images=len(self.train_set), split_images=self.split_images,
                data_path=self.data_path, batch_order=self.batch_order,
            )  # fmt: skip
            ema = self.ema.module.state_dict() if self.ema else None
            sd = {k: v for k, v in self.model.state_dict().items()}
            path = C.save_checkpoint(self.ckpt_dir, name, sd, state, ema)
            C.prune(self.ckpt_dir, self.cfg.keep_last)
        if self.distributed:
            dist.barrier()
        return path

    def _check_finite(self) -> None:
        """Raise TrainingError when a weight or a batch-norm statistic is NaN or infinite:
        with batch statistics in training mode the loss can stay finite while the running
        variances overflow, and such weights were checkpointed as good and exported."""
        modules = {"weights": self.model, "EMA weights": self.ema.module if self.ema else None}
        bad = [f"{name} {k}" for name, module in modules.items() if module is not None
               for k, v in module.state_dict().items()
               if v.is_floating_point() and not torch.isfinite(v).all()]  # fmt: skip
        # Every rank decides together (each rank's batch-norm statistics are its own).
        if reduce_sums([float(len(bad))], self.device)[0] if self.distributed else len(bad):
            last = C.find_latest(self.ckpt_dir)
            where = f"{bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}" if bad \
                else "on another rank"  # fmt: skip
            raise TrainingError(
                f"weights no longer finite at epoch {self._epoch_of(self.step)}, step {self.step} "
                f"({where}): "
                f"training stopped; last good checkpoint: {last or 'none'}",
                _DIVERGED,
            )

    def _epoch_of(self, step: int) -> int:
        """The epoch (from 1) that optimizer step `step` (from 1) belongs to: checks at an
        epoch's end ran after the count moved on, and named the next epoch."""
        return max(0, step - 1) // self.steps_per_epoch + 1

    def _seconds(self) -> float:
        return self.partial_seconds + (time.perf_counter() - self.epoch_start)

    def _write_outputs(self) -> None:
        if self.rank != 0:
            return
        import yaml

        C.atomic_write(
            self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        )
        if self.history:
            columns = list(dict.fromkeys(k for row in self.history for k in row))
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: _fmt(v) for k, v in row.items()})
            C.atomic_write(self.out / "metrics.csv", buf.getvalue())
            C.atomic_write(self.out / "curves.png", _plot_curves(self.history, self.cfg.recipe))

    def _export(self) -> Path:
        """Final weights (EMA when kept) and the model card, in the run folder."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        weights = self.out / "model.safetensors"
        self._check_finite()
        if self.rank == 0:
            src = self.ema.module if self.ema else self.model
            sd = {k: v.detach().cpu().contiguous().clone() for k, v in src.state_dict().items()}
            tmp = self.out / ".model.safetensors.tmp"
            try:
                save_file(sd, str(tmp), metadata=self._weights_metadata())
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                C.publish(tmp, weights)  # safetensors writes 0600: follow the umask
            except (OSError, RuntimeError, SafetensorError) as err:
                # A full disk is a SafetensorError: it was a traceback, and left the partial
                # file behind.
                tmp.unlink(missing_ok=True)
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise OSError(f"cannot write {weights} ({first}): free space, then `xception "
                              f"train --out {self.out} --resume auto` writes it (the run is "
                              "finished and its checkpoints are intact)") from None  # fmt: skip
            except BaseException:  # Ctrl-C while writing: no temporary file left behind
                tmp.unlink(missing_ok=True)
                raise
            card = dict(
                name=f"{self.cfg.model} trained with recipe {self.cfg.recipe}",
                **self._meta(), parameters=self.params,
                weights="model.safetensors (EMA weights)" if self.ema else "model.safetensors",
                data=dict(source=str(self.cfg.data), path=self.data_path,
                          train_images=len(self.train_set), split_images=self.split_images,
                          val_images=len(self.val_set)),
                final=self.history[-1] if self.history else None, best=self.best,
                epochs=self.epoch, steps=self.step, config=self.cfg.to_dict(),
            )  # fmt: skip
            # JSON has no NaN (strict readers refused the file): a metric without a value is null.
            C.atomic_write(self.out / "model.json",
                           json.dumps(_null_if_not_finite(card), indent=2, allow_nan=False))  # fmt: skip
        return weights

    def _weights_metadata(self) -> dict[str, str]:
        """The run's config and preprocessing inside its weights file, as `save_safetensors`
        writes them: `--weights model.safetensors` then rebuilds this model anywhere."""
        from .weights import run_weights_card, safetensors_metadata

        meta = self._meta()
        card = run_weights_card(meta, f"{self.cfg.model} trained with recipe {self.cfg.recipe}",
                                f"trained on {self.cfg.data} ({meta['loss']} loss)")  # fmt: skip
        return safetensors_metadata(meta["model_config"], card)

    # the loop -----------------------------------------------------------------------------------
    def run(self) -> dict:
        self._lock = None
        try:
            return self._run()
        finally:  # not left to the garbage collector: a traceback kept would keep the lock
            if self._lock is not None:
                self._lock.close()

    def _run(self) -> dict:
        self.best: dict | None = None
        self._setup()
        cfg = self.cfg
        refused = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                self._lock = C.lock_run_folder(self.out)
            except ValueError as err:
                refused = err
        self._stop_together(refused, self.out)
        if self.rank == 0:
            self._write_outputs()
        self.tb = self._tensorboard() if self.rank == 0 and cfg.tensorboard else None
        done = self.partial.get("wall_s") or (self.history[-1]["wall_s"] if self.history else 0)
        self.start_wall = start_wall = time.perf_counter() - done
        if self.epoch >= cfg.epochs:
            self._info(
                "run in %s already finished (%d epoch%s): nothing to do",
                self.out,
                self.epoch,
                "" if self.epoch == 1 else "s",
            )
        with _Signals() as signals:
            while self.epoch < cfg.epochs:
                row = self._train_epoch(signals)
                row.update(self._validate())
                row["wall_s"] = round(time.perf_counter() - start_wall, 2)
                self.history.append(row)
                key = "val_map100" if self.multilabel else "val_top1"
                improved = self.best is None or row[key] > self.best[key]
                if improved:
                    self.best = row
                self.epoch, self.batch_in_epoch, self.partial = self.epoch + 1, 0, {}
                # Best first: a run stopped between the two saves resumes from the step before
                # and saves both again. The other way round it resumed from this step, already
                # counted as the best, and never wrote the best checkpoint.
                if improved:
                    self._save(f"best-step-{self.step:09d}")
                saved = self._save(f"step-{self.step:09d}")
                self._write_outputs()
                if self.tb is not None:
                    for k, v in row.items():
                        self.tb.add_scalar(k, v, row["epoch"])
                self._info("epoch %d/%d: %s", row["epoch"], cfg.epochs,
                         ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "epoch"))  # fmt: skip
                # A signal during validation or the saves: stop here, at the checkpoint just
                # written. It used to start the next epoch (its data loader workers, one step)
                # and save again, past the grace period of a cluster's SIGTERM.
                stop = signals.signum is not None
                if self.distributed:
                    stop = reduce_sums([float(stop)], self.device)[0] > 0
                if stop and self.epoch < cfg.epochs:
                    raise Interrupted(signals.signum or signal.SIGTERM, saved)
        weights = self._export()
        if self.tb is not None:
            self.tb.close()
        return dict(
            out=str(self.out), weights=str(weights), model=cfg.model, params=self.params,
            classes=list(self.classes), history=self.history,
            final=self.history[-1] if self.history else None, best=self.best,
            wall_s=self.history[-1]["wall_s"] if self.history else 0.0,
            checkpoint=str(C.find_latest(self.ckpt_dir)), config=cfg.to_dict(),
        )  # fmt: skip

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard requested but not installed: pip install tensorboard")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "sigmoid":
            target = y.float() if self.multilabel else F.one_hot(y, logits.shape[1]).float()
            if self.cfg.label_smoothing:
                target = target * (1 - self.cfg.label_smoothing) + self.cfg.label_smoothing / 2
            # Summed over classes, averaged over samples: gradients do not shrink with 17k classes.
            return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(y)
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)

    def _train_epoch(self, signals: _Signals) -> dict:
        cfg = self.cfg
        meter = Meter()
        if self.partial and self.rank == 0:  # the saved sums are all ranks' (see _save)
            meter.sums, meter.counts = dict(self.partial["sums"]), dict(self.partial["counts"])
        self.partial_seconds = self.partial.get("seconds", 0.0)
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        self.loader_generator.manual_seed(
            int(sample_keys(cfg.seed ^ 0x10AD, self.epoch, [0])[0] >> np.uint64(1))
        )
        base = _base(self.train_set)
        base.set_epoch(self.epoch)
        self.net.train()
        bar = None
        desc = f"epoch {self.epoch + 1}/{cfg.epochs}"
        if cfg.progress and self.rank == 0 and not runtime.stderr_is_terminal():
            bar = _LineProgress(self.steps_per_epoch, self.batch_in_epoch, desc)
        elif cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=desc,
                       unit="batch", dynamic_ncols=True, leave=True)  # fmt: skip
        self.epoch_start = time.perf_counter()
        seen_since = 0
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * lr_factor(cfg, self.step, self.steps_per_epoch)
            finite = self._step(x, y, meter)
            self.step += 1
            self.batch_in_epoch += 1
            seen_since += len(x) * self.world
            stop = signals.signum is not None
            if self.distributed:
                flags = reduce_sums([0.0 if finite else 1.0, 1.0 if stop else 0.0], self.device)
                finite, stop = flags[0] == 0, flags[1] > 0
            if not finite:
                if bar is not None:
                    bar.close()
                last = C.find_latest(self.ckpt_dir)
                raise TrainingError(
                    f"non-finite loss at epoch {self.epoch + 1}, step {self.step}: training "
                    f"stopped; last good checkpoint: {last or 'none'}",
                    _DIVERGED,
                )
            if bar is not None:
                bar.update(1)
                if self.batch_in_epoch % 10 == 0 or self.batch_in_epoch == self.steps_per_epoch:
                    elapsed = self._seconds()
                    done = meter.counts.get("loss", 0)
                    bar.set_postfix(loss=f"{meter.mean('loss'):.4f}", acc=f"{meter.mean('top1'):.2f}",
                                    img_s=f"{done * self.world / max(elapsed, 1e-9):.0f}")  # fmt: skip
            if stop:
                if bar is not None:
                    bar.close()
                signum = signals.signum or signal.SIGTERM
                path = self._save(f"step-{self.step:09d}", meter)
                raise Interrupted(signum, path)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                    and self.batch_in_epoch < self.steps_per_epoch:  # fmt: skip
                self._save(f"step-{self.step:09d}", meter)
        if bar is not None:
            bar.close()
        seconds = self._seconds()
        totals = meter.reduce()
        images = totals.counts.get("loss", 0)
        return dict(
            epoch=self.epoch + 1, step=self.step,
            lr=self.optimizer.param_groups[0]["lr"],
            train_loss=totals.mean("loss"), train_top1=totals.mean("top1"),
            images_per_s=images / seconds if seconds > 0 else float("nan"),
            epoch_s=seconds,
        )  # fmt: skip

    def _step(self, x: torch.Tensor, y: torch.Tensor, meter: Meter) -> bool:
        """One optimizer step over `accum_steps` interleaved micro-batches; False if the loss
        was not finite (nothing is updated then)."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        finite = True
        for k in range(cfg.accum_steps):
            xs, ys = x[k :: cfg.accum_steps], y[k :: cfg.accum_steps]
            sync = k == cfg.accum_steps - 1 or not self.distributed
            no_sync = not sync and hasattr(self.net, "no_sync")
            ctx = self.net.no_sync() if no_sync else contextlib.nullcontext()
            if self.seeded_dropout:
                # Rank r's micro-batch k holds the global batch's places p with p % world == r
                # and (p // world) % accum_steps == k: the micro-batch one process with
                # accum_steps = world x accum_steps calls k * world + r.
                index = k * self.world + self.rank
                key = sample_keys(cfg.seed ^ 0x5EED, self.step, [index])[0] >> np.uint64(1)
                torch.manual_seed(int(key))
            if cfg.accum_steps > 1:
                # BN's running statistics follow micro-batch 0 alone, as DDP's buffers follow
                # rank 0's: one process with accum_steps=N keeps the statistics N ranks keep.
                for bn in self.batch_norms:
                    bn.track_running_stats = k == 0
            with ctx:
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may go
                with autocast(self.device, cfg.amp):
                    try:
                        logits = self.net(xs)
                    except ValueError as err:
                        if "more than 1 value per channel" not in str(err):
                            raise
                        raise ValueError(
                            f"each micro-batch holds {len(xs)} image(s) (batch_size="
                            f"{cfg.batch_size} over {self.world} process(es) and accum_steps="
                            f"{cfg.accum_steps}), and at image_size={cfg.image_size} the "
                            "model's last batch norm then sees one value per channel, which "
                            "it cannot normalise: raise batch_size or lower accum_steps so "
                            "that each micro-batch holds 2 or more"
                        ) from None
                    loss = self._loss(logits.float(), ys)
                if not torch.isfinite(loss):
                    finite = False
                    # Still run backward so DDP's collective calls stay matched across ranks.
                self.scaler.scale(loss / cfg.accum_steps).backward()
            with torch.no_grad():
                n = len(xs)
                meter.update("loss", loss.item() * n, n)
                if self.multilabel:  # precision@1 as `eval` scores it: ties, NaN last
                    hits = average_precision_at_k(logits.float(), ys, 1).sum().item()
                    meter.update("top1", hits * 100, n)
                else:
                    meter.update("top1", topk_correct(logits.float(), ys, (1,))[1] * 100, n)
        if cfg.accum_steps > 1:
            for bn in self.batch_norms:
                bn.track_running_stats = True
        if not finite:
            return False
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return True

    def _validate(self) -> dict:
        cfg = self.cfg
        if self.distributed:  # each rank's BN statistics followed its own micro-batches
            for module in (self.model, self.ema.module if self.ema else None):
                for buffer in module.buffers() if module is not None else ():
                    dist.broadcast(buffer, 0)
        kw = dict(device=self.device, batch_size=cfg.eval_batch_size, multilabel=self.multilabel,
                  loss=cfg.loss, amp=cfg.amp, channels_last=cfg.channels_last, rank=self.rank,
                  world=self.world, workers=cfg.workers)  # fmt: skip
        main = evaluate_model(self.ema.module if self.ema else self.model, self.val_set, **kw)
        if main["unreadable"] and self.rank == 0:
            log.warning("validation left out %d unreadable image(s), scored %d",
                        main["unreadable"], main["n"])  # fmt: skip
        row = {f"val_{k}": v for k, v in main.items() if k not in ("n", "unreadable")}
        if self.ema is not None:
            raw = evaluate_model(self.model, self.val_set, **kw)
            row["val_top1_raw"] = raw["top1"]
        return row


# What a resume reads from a checkpoint's state.pt (`_Run._save` writes every one of them).
RESUME_FIELDS = ("config", "meta", "epoch", "batch_in_epoch", "step", "optimizer", "scaler",
                 "rng", "history")  # fmt: skip


def _null_if_not_finite(value):
    """`value` with every NaN or infinite float inside it (dicts, lists) made None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _null_if_not_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_null_if_not_finite(v) for v in value]
    return value


def _past_damaged(err: C.CheckpointError, path: Path) -> C.CheckpointError:
    """`err` about checkpoint `path`, with the way past it when it is its run's newest: the
    one before it. Not `--resume OLDER`: in its own run folder, behind the damaged newest one,
    that is refused (its saves would be pruned), and that refusal's advice is `--resume auto`,
    which meets this error again."""
    if C.find_latest(path.parent) != path:
        return err
    older = [p for p in C.list_checkpoints(path.parent) if p != path]
    if not older:
        return err
    return C.CheckpointError(f"{err}; the one before it may be intact: move {path} out of "
                             f"{path.parent}, then --resume auto continues from "
                             f"{older[-1].name}")  # fmt: skip


def _load_for_resume(path, state_only: bool = False) -> dict:
    """`C.load_checkpoint`, and a CheckpointError naming state.pt when it lacks what a resume
    reads (a KeyError's traceback, deep in the set-up, before)."""
    ckpt = C.load_checkpoint(path, state_only=state_only)
    state = ckpt["state"]
    missing = [k for k in RESUME_FIELDS if k not in state]
    if not missing:
        missing = [k for k in ("config", "meta") if not isinstance(state[k], dict)]
    if missing:
        raise C.CheckpointError(f"{Path(ckpt['path']) / 'state.pt'}: not a complete training "
                                f"checkpoint (no valid {', '.join(missing)}); resume from "
                                "another checkpoint")  # fmt: skip
    return ckpt


def _load_exact(model: nn.Module, sd: dict, where) -> None:
    """Our own checkpoint into the model it was saved from: every key, buffers included."""
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        # torch's first line only says "Error(s) in loading state_dict for Xception:".
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "no detail"
        if len(detail) > 160:  # a list of every missing key: the first few
            cut = detail.rfind(", ", 0, 160)
            detail = detail[: cut if cut > 0 else 160] + ", ..."
        # The model is the one the checkpoint's own state.pt describes, whatever the config
        # given: "resume with the run's config", the advice here before, could not help.
        raise C.CheckpointError(
            f"{where}: does not fit the model its checkpoint's state.pt describes ({detail}): "
            "its files come from different runs or another xception version; resume from "
            "another checkpoint"
        ) from None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _plot_curves(history: list[dict], title: str) -> bytes:
    """Loss and top-1 per epoch, train and val, side by side (as the paper's figures)."""
    from matplotlib.figure import Figure  # not pyplot, which the caller's backend is for

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for ax, metric, label in ((ax1, "loss", "loss"), (ax2, "top1", "top-1 accuracy (%)")):
        for split in ("train", "val"):
            key = f"{split}_{metric}"
            if any(key in r for r in history):
                ax.plot(epochs, [r.get(key, float("nan")) for r in history], marker="o",
                        label=split)  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
