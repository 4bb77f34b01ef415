"""The paper's ablations rerun at small scale: suites of training runs, a results store, verdicts.

A *suite* is a list of model variants and the claims that compare them (residual connections,
the activation between depthwise and pointwise, the order of the two halves, Xception against an
Inception V3 of the same size, and the spectrum of segment counts). A *scale* says how much
training each run gets (`quick` for a smoke run in minutes, `full` for the documented results).

Every run is trained by the engine of `xception train` (`train.fit`) and stored as one JSON file,
`OUT/runs/<key>.json`, written atomically when the run has finished. The key is a hash of the
run's full config (the resolved model config, the training settings, the data and the seed), so a
variant shared by several suites (the baseline is the same model in four of them) is trained once,
finished runs are never redone, and an interrupted suite continues where it stopped.

Verdict rule (also in docs/EXPERIMENTS.md): a claim compares the per-seed final validation
accuracies of two variants. The difference of means d gets a standard error from the seed noise
pooled over every distinct variant in the report (s_p^2 = sum (n_i - 1) s_i^2 / sum (n_i - 1),
SE = s_p sqrt(1/n_a + 1/n_b)): all variants share the data, recipe and scale, and 2 or 3 seeds
per variant are too few to estimate each variant's noise on its own. The 95% interval is
d +- t*SE with Student's t quantile at the pooled degrees of freedom. For "A is better than B":
*holds* when the interval lies above 0, *does not hold* when it lies below 0, *inconclusive*
otherwise, and always when no variant has 2 seeds (no noise estimate). For "A and B are
equivalent" (the order of the halves): *holds* when the interval lies inside +-margin (1
percentage point), *does not hold* when it lies wholly outside +-margin (a gap beyond the
margin, not just beyond 0, is what refutes "within the margin"), *inconclusive* otherwise.
For "some intermediate segment count beats depthwise", with k intermediate variants, each
comparison uses a 1 - 0.05/k interval (Bonferroni), so that k chances to win do not inflate the
chance of a false "holds".

Nothing here prints: progress goes to `logging`, results are returned and written as files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import torch
from torch import nn

from .checkpoint import atomic_write, check_output_file

log = logging.getLogger(__name__)

__all__ = [
    "SCALES",
    "SUITES",
    "Claim",
    "Scale",
    "Variant",
    "compare",
    "difference",
    "judge",
    "measure_speed",
    "pooled_noise",
    "run_experiments",
    "suite_plan",
    "t_coverage",
    "t_quantile",
]

SUITES = ("residual", "mid-activation", "order", "vs-inception", "segments")
SCHEMA = 2  # bump when the meaning of a stored run changes, so old runs are not reused
# (2: the data's content hash joined the key)
EQUIVALENCE_MARGIN = 0.01  # 1 percentage point of accuracy

CONFIDENCE = 0.95  # two-sided level of every interval


# ---------------------------------------------------------------------------------------------
# what to run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """How much training each run of a suite gets.

    `model` overrides apply to every Xception variant (the Inception baseline is re-sized to match
    the resulting parameter count, and takes those it has too: drop_rate, bn_eps, bn_momentum);
    `segments` lists the spectrum's segment counts (None: every power of two that divides all of
    the model's channel counts), "depthwise" is always added.
    """

    name: str
    seeds: int
    epochs: int
    train_size: int
    val_size: int
    batch_size: int = 128
    model: dict = field(default_factory=dict)
    segments: tuple[int, ...] | None = None
    speed_batch: int = 64
    speed_repeats: int = 5


SCALES: dict[str, Scale] = {
    # Smoke scale: every suite in about 10 minutes on 2 cores, with a 3/4-width compact model
    # (its narrowest layer, 24 channels, allows 1..8 segments). 5,000 training images took
    # 12.0 min; 4,000 are used.
    "quick": Scale(
        name="quick", seeds=2, epochs=2, train_size=4000, val_size=2000, batch_size=64,
        model=dict(width=0.75), segments=(1, 2, 4, 8), speed_repeats=3,
    ),
    # The documented scale: the compact preset as it is, 3 seeds (docs/EXPERIMENTS.md: about
    # 2.5 hours on 2 cores, one seed of three measured; 3 min on an H100 as 4 processes).
    "full": Scale(
        name="full", seeds=3, epochs=4, train_size=15000, val_size=5000, batch_size=128,
        segments=(1, 2, 4, 8, 16),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One model of a suite: a label for tables and plots, a preset and its overrides."""

    label: str
    model: str
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    """A statement of the paper about two variants (or, for `any_better`, a set against one).

    kind: "better" (a beats b), "equivalent" (a and b within the margin), or "any_better"
    (at least one of the variants in `a` beats b; `a` is then a tuple of labels).
    """

    text: str
    a: str | tuple[str, ...]
    b: str
    kind: str = "better"
    metric: str = "final"  # "final": last epoch's accuracy; "curve": mean over all epochs


# The model field each suite compares: a `Scale.model` override of it would give the suite two
# labels for one model.
SUITE_FIELDS = {"residual": "residual", "mid-activation": "mid_activation", "order": "order",
                "segments": "segments"}  # fmt: skip
# Fields the data fixes (1-channel images, 10 classes).
DATA_FIELDS = ("in_chans", "num_classes")

BASE_MODEL = "xception-compact"
INCEPTION_MODEL = "inception-v3-compact"
PARAM_MATCH = 0.10  # vs-inception: the largest relative gap in parameters still called matched


def _spectrum(scale: Scale, in_chans: int, num_classes: int) -> list[int]:
    """Segment counts from 1 up, each dividing every spatial conv's channel count."""
    from .zoo import create_model

    def fits(k) -> bool:
        try:
            with torch.device("meta"):  # only the channel counts are checked: nothing allocated
                create_model(BASE_MODEL, num_classes=num_classes, in_chans=in_chans,
                             **{**scale.model, "segments": k})  # fmt: skip
        except ValueError:
            return False
        return True

    # The model as set, first: a bad setting of it (an unknown --set key, width=-1) fails here
    # with its own message, not as the first segment count's "does not divide" below.
    with torch.device("meta"):
        create_model(BASE_MODEL, num_classes=num_classes, in_chans=in_chans, **scale.model)
    if scale.segments is None:
        valid = []
        for k in (2**i for i in range(12)):
            if not fits(k):
                break
            valid.append(k)
        return valid
    bad = [k for k in scale.segments if not fits(k)]
    if bad:
        # The full scale's own list (up to 16) asked of a narrower --set width: name the
        # counts that fit, which the user never had to spell out before.
        ok = [k for k in scale.segments if k not in bad] or _spectrum(
            dataclasses.replace(scale, segments=None), in_chans, num_classes
        )
        raise ValueError(
            f"segments={bad[0]} does not divide the channels of {BASE_MODEL} at scale "
            f"{scale.name!r}: use counts that divide its narrowest layer, e.g. --segments "
            f"{','.join(map(str, ok))}"
        )
    return list(scale.segments)


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_inception_width(target_params: int, in_chans: int, num_classes: int) -> float:
    """The `width` of `inception-v3-compact` whose parameter count is closest to `target_params`."""
    return _closest_inception(target_params, in_chans, num_classes)[0]


def _closest_inception(target_params: int, in_chans: int, num_classes: int) -> tuple[float, int]:
    """(width, parameter count) of the `inception-v3-compact` closest to `target_params`."""
    from .zoo import create_model

    best = (math.inf, 1.0, 0)
    for step in range(5, 101):  # widths 0.05 .. 1.00
        width = step / 100
        with torch.device("meta"):  # counted, not allocated
            params = _param_count(create_model(INCEPTION_MODEL, num_classes=num_classes,
                                               in_chans=in_chans, width=width))  # fmt: skip
        best = min(best, (abs(params - target_params), width, params))
        if params > target_params:  # parameters grow with width: no need to go on
            break
    return best[1], best[2]


def suite_plan(
    suite: str, scale: Scale, *, in_chans: int = 1, num_classes: int = 10
) -> tuple[list[Variant], list[Claim]]:
    """The variants a suite trains and the claims it judges."""
    base = Variant("Xception", BASE_MODEL, dict(scale.model))

    def variant(label: str, **overrides) -> Variant:
        return Variant(label, BASE_MODEL, {**scale.model, **overrides})

    if suite == "residual":
        variants = [variant("with residual connections"),
                    variant("without residual connections", residual=False)]  # fmt: skip
        claims = [Claim("residual connections improve final accuracy (Figure 9)",
                        variants[0].label, variants[1].label),
                  Claim("residual connections speed up convergence (Figure 9; mean accuracy "
                        "over all epochs)", variants[0].label, variants[1].label,
                        metric="curve")]  # fmt: skip
    elif suite == "mid-activation":
        variants = [variant("no intermediate activation"),
                    variant("intermediate ELU", mid_activation="elu"),
                    variant("intermediate ReLU", mid_activation="relu")]  # fmt: skip
        claims = [
            Claim("no activation beats ELU between depthwise and pointwise (Figure 10)",
                  variants[0].label, variants[1].label),
            Claim("no activation beats ReLU between depthwise and pointwise (Figure 10)",
                  variants[0].label, variants[2].label),
        ]  # fmt: skip
    elif suite == "order":
        variants = [variant("depthwise first"), variant("pointwise first", order="pointwise_first")]
        claims = [Claim("the order of depthwise and pointwise does not matter",
                        variants[0].label, variants[1].label, kind="equivalent")]  # fmt: skip
    elif suite == "vs-inception":
        from .zoo import create_model

        target = _param_count(create_model(BASE_MODEL, num_classes=num_classes,
                                           in_chans=in_chans, **scale.model))  # fmt: skip
        width, closest = _closest_inception(target, in_chans, num_classes)
        if abs(closest - target) > PARAM_MATCH * target:  # the claim says "matched": refuse
            raise ValueError(
                f"no width of {INCEPTION_MODEL} matches the {target:,} parameters of "
                f"{BASE_MODEL} at scale {scale.name!r} within {100 * PARAM_MATCH:g}% (closest: "
                f"{closest:,} at width {width:g}): use a larger model, e.g. --set width=0.5"
            )
        from .inception import InceptionConfig

        # Settings both models have (dropout, BN) apply to the baseline too, so that only the
        # architecture differs; `width` scales each model's own channel plan: matched instead.
        fields = {f.name for f in dataclasses.fields(InceptionConfig)} - {"width"}
        shared = {k: v for k, v in scale.model.items() if k in fields}
        variants = [base, Variant("Inception V3", INCEPTION_MODEL, {**shared, "width": width})]
        claims = [Claim("Xception beats Inception V3 at a matched parameter count",
                        base.label, "Inception V3")]  # fmt: skip
    elif suite == "segments":
        ks = _spectrum(scale, in_chans, num_classes)
        variants = [variant(f"{k} segment{'s' if k > 1 else ''}", segments=k) for k in ks]
        variants.append(variant("depthwise", segments="depthwise"))
        # 1 segment is the regular conv, not a point in between (--segments may leave it out).
        intermediate = tuple(v.label for k, v in zip(ks, variants, strict=False) if k > 1)
        claims = [Claim("a model between a regular conv and depthwise beats depthwise "
                        "(the question the paper leaves open)",
                        intermediate, "depthwise", kind="any_better")]  # fmt: skip
    else:
        raise ValueError(f"unknown suite {suite!r}: use one of {', '.join(SUITES)} or all")
    return variants, claims


# ---------------------------------------------------------------------------------------------
# statistics and verdicts
# ---------------------------------------------------------------------------------------------
def t_coverage(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with an integer number of degrees of freedom, exactly
    (Abramowitz and Stegun 26.7.3-4: finite series in theta = atan(t / sqrt(df))); 0 for
    t <= 0, where no value of |T| is below t."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, not {df}")
    if t <= 0:  # the series is odd in t: it gave a negative "probability"
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:  # sin(theta) (1 + c2/2 + 1*3 c2^2/(2*4) + ... up to c2^((df-2)/2))
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    series = 0.0  # 1 + 2/3 c2 + 2*4/(3*5) c2^2 + ... up to c2^((df-3)/2)
    if df > 1:
        term = series = 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
    return 2 / math.pi * (theta + s * math.cos(theta) * series)


def t_quantile(coverage: float, df: int) -> float:
    """The t with P(|T| < t) = `coverage` (two-sided), by bisection on `t_coverage`: 2.074 for
    95% at 22 degrees of freedom, 2.819 for 99%."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must lie strictly between 0 and 1, not {coverage}")
    lo, hi = 0.0, 1.0
    while t_coverage(hi, df) < coverage:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_coverage(mid, df) < coverage else (lo, mid)
    return (lo + hi) / 2


def pooled_noise(groups: Sequence[Sequence[float]]) -> tuple[float, int] | None:
    """Seed-to-seed variance pooled over `groups` (each a variant's per-seed values) and its
    degrees of freedom; None when no group has two values.

    The variants of a report share the data, the recipe and the scale, so their seed noise is
    taken to be the same: pooling gives a usable estimate from 2 or 3 seeds per variant, where a
    per-pair (Welch) estimate would rest on 1 or 2 degrees of freedom.
    """
    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    if df == 0:
        return None
    ss = sum(statistics.variance(g) * (len(g) - 1) for g in groups if len(g) > 1)
    return ss / df, df


def difference(
    a: Sequence[float], b: Sequence[float], noise: tuple[float, int] | None = None,
    coverage: float = CONFIDENCE,
) -> dict:  # fmt: skip
    """Difference of means a - b with its standard error and two-sided `coverage` interval
    (Student t, 95% by default).

    `noise` is a pooled (variance, degrees of freedom), by default pooled from a and b alone.
    Without a noise estimate (one value per variant) se, df and the interval are None.
    """
    d = statistics.fmean(a) - statistics.fmean(b)
    out = dict(diff=d, se=None, df=None, t=None, lo=None, hi=None, n_a=len(a), n_b=len(b))
    noise = noise if noise is not None else pooled_noise([a, b])
    if noise is None:
        return out
    var, df = noise
    se = math.sqrt(var * (1 / len(a) + 1 / len(b)))
    t = t_quantile(coverage, df)
    out.update(se=se, df=df, t=t, coverage=coverage, lo=d - t * se, hi=d + t * se)
    return out


def compare(
    a: Sequence[float], b: Sequence[float], kind: str = "better",
    noise: tuple[float, int] | None = None, margin: float = EQUIVALENCE_MARGIN,
    coverage: float = CONFIDENCE,
) -> tuple[str, dict]:  # fmt: skip
    """Verdict ("holds", "does not hold", "inconclusive") on a claim about per-seed values a, b
    (see the module docstring for the rule)."""
    if kind not in ("better", "equivalent"):  # also with one seed, where no rule is applied
        raise ValueError(f"unknown claim kind {kind!r}: use 'better' or 'equivalent'")
    stats = difference(a, b, noise, coverage)
    if stats["se"] is None:
        return "inconclusive", stats
    lo, hi = stats["lo"], stats["hi"]
    if kind == "better":
        verdict = "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"
    elif -margin < lo and hi < margin:  # equivalent
        verdict = "holds"
    elif lo > margin or hi < -margin:  # every difference the data allows exceeds the margin
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    return verdict, stats


def judge(
    claim: Claim, values: dict[str, dict[str, list[float]]],
    noise: tuple[float, int] | None = None,
) -> dict:  # fmt: skip
    """Apply `compare` to a claim. `values[label][metric]` are a variant's per-seed accuracies;
    `noise` is the pooled seed noise, by default pooled over the variants in `values`."""
    values = {label: v[claim.metric] for label, v in values.items()}
    if noise is None:
        noise = pooled_noise(list(values.values()))
    if claim.kind == "any_better":
        # k chances to win: each comparison at level 1 - (1 - CONFIDENCE) / k (Bonferroni), so
        # the claim as a whole keeps a 5% chance of a false "holds".
        coverage = 1 - (1 - CONFIDENCE) / max(1, len(claim.a))
        parts = []
        for label in claim.a:
            verdict, stats = compare(values[label], values[claim.b], "better", noise,
                                     coverage=coverage)  # fmt: skip
            parts.append(dict(a=label, verdict=verdict, **stats))
        if any(p["verdict"] == "holds" for p in parts):
            verdict = "holds"
        elif parts and all(p["verdict"] == "does not hold" for p in parts):
            verdict = "does not hold"
        else:
            verdict = "inconclusive"
        return dict(text=claim.text, kind=claim.kind, metric=claim.metric, b=claim.b,
                    verdict=verdict, comparisons=parts)  # fmt: skip
    verdict, stats = compare(values[claim.a], values[claim.b], claim.kind, noise)
    return dict(text=claim.text, kind=claim.kind, metric=claim.metric, a=claim.a, b=claim.b,
                verdict=verdict, **stats)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------
def measure_speed(
    model: nn.Module, size: int, in_chans: int, *, batch: int = 64, repeats: int = 5,
    channels_last: bool = True,
) -> float:  # fmt: skip
    """Inference images per second at `size` x `size`: eval mode, no grad, median of `repeats`
    timed batches after one warm-up batch; channels_last as the training engine runs on a CPU."""
    model = model.eval()
    x = torch.randn(batch, in_chans, size, size)
    if channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


# ---------------------------------------------------------------------------------------------
# the results store
# ---------------------------------------------------------------------------------------------
def run_key(config: dict) -> str:
    """Hash of a run's full config (canonical JSON): its file name in the store.

    The engine's `model_args` are left out: they only spell `model_config`, which is hashed, as
    a difference from the preset, so a preset that changes under a variant that does not would
    otherwise change its key. So is the data's path: `data_sha256` holds its content, and the
    same files under another path (or spelt another way) are the same runs.
    """
    train = {k: v for k, v in config["train"].items() if k not in ("model_args", "data")}
    blob = json.dumps(
        {**config, "train": train}, sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_record(record: dict) -> None:
    """Raise ValueError naming what a run's record lacks that the report reads: a record cut
    down by hand was reused, then ended the report with a KeyError traceback (or, with no
    history, "fmean requires at least one data point")."""
    history = record.get("history")
    if not isinstance(history, list) or not history:
        raise ValueError("no training history")
    if not all(isinstance(row, dict) and _is_number(row.get("val_top1")) for row in history):
        raise ValueError("an epoch of its history has no validation accuracy")
    missing = [k for k in _RECORD_NUMBERS if not _is_number(record.get(k))]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")


_RECORD_NUMBERS = ("final_val_acc", "train_seconds", "params", "macs", "images_per_s")


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class Store:
    """Finished runs, one JSON file each under `root/runs/`."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "runs"

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not a run's record")
            if record.get("key") == key:
                _check_record(record)
        except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
            # Writes are atomic, so this is a file damaged or edited by hand: train it again.
            log.warning("%s is unreadable (%s): the run will be trained again", path, err)
            return None
        return record if record.get("key") == key else None

    def put(self, record: dict) -> None:
        atomic_write(self.path(record["key"]), json.dumps(record, indent=1).encode())


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
RECIPE = "fashion-mnist"
# Fields of the engine's config that do not change what a run computes: left out of the key.
_NOT_IDENTITY = ("out", "resume", "progress", "workers", "device", "threads", "compile",
                 "checkpoint_every", "keep_last", "tensorboard", "eval_batch_size",
                 "grad_checkpointing")  # fmt: skip


def dataset_info(data: str | Path) -> dict:
    """What the runs need to know of the data: experiments use IDX data (Fashion-MNIST, MNIST)."""
    from .data import (
        IDX_FILES,
        MNIST_CLASSES,
        _find_idx,
        idx_count,
        is_idx_dir,
        open_idx,
        read_idx,
        resolve_data,
    )
    from .train import make_config

    root = resolve_data(data)
    if not is_idx_dir(root):
        raise ValueError(
            f"{root}: the experiments run on Fashion-MNIST-style IDX files (train-images-idx3-"
            "ubyte.gz, ...): pass --data DIR holding them, or leave --data out for Fashion-MNIST"
        )
    # The runs' key holds the files' content: other data under the same path (or the same data
    # under another path) is told apart from what the store holds. The decompressed bytes: a
    # gzip header holds the time it was written, which says nothing of the data.
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for stem in IDX_FILES[split]:
            path = _find_idx(root, stem)
            with open_idx(path) as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    # As many classes as the engine's loader (data.load_idx) gives the data: ten, or as many
    # as the labels name (EMNIST's 26 letters had been trained as 26 and reported as 10).
    labels = read_idx(_find_idx(root, IDX_FILES["train"][1]))
    num_classes = max(len(MNIST_CLASSES), int(labels.max()) + 1 if len(labels) else 0)
    return dict(
        name=str(data),
        title="Fashion-MNIST" if str(data) == "fashion-mnist" else root.name,
        sha256=digest.hexdigest(),
        in_chans=1,
        num_classes=num_classes,
        size=make_config(RECIPE).image_size,
        train_images=idx_count(root, "train"),
        test_images=idx_count(root, "test"),
    )


def run_config(variant: Variant, scale: Scale, seed: int, data: dict) -> dict:
    """The full config of one run, which is also what its key hashes: the resolved model config
    and every field of the training engine's config that affects the result.

    The engine gets the model overrides in canonical form (only the fields that differ from the
    preset), so `segments="depthwise"` spelt out is the same run as the preset itself.
    """
    from .train import make_config

    args = json.dumps(variant.overrides, sort_keys=True)
    model_config = dict(_model_config(variant.model, args, data["num_classes"], data["in_chans"]))
    default = _model_config(variant.model, "{}", data["num_classes"], data["in_chans"])
    model_args = {k: v for k, v in model_config.items()
                  if v != default[k] and k not in ("num_classes", "in_chans")}  # fmt: skip
    train = make_config(RECIPE, model=variant.model, model_args=model_args,
                        data=data["name"], epochs=scale.epochs, batch_size=scale.batch_size,
                        train_subset=scale.train_size, val_subset=scale.val_size, seed=seed)  # fmt: skip
    identity = {k: v for k, v in train.to_dict().items() if k not in _NOT_IDENTITY}
    return dict(schema=SCHEMA, model_config=model_config, train=identity,
                data_sha256=data["sha256"])  # fmt: skip


@functools.lru_cache(maxsize=256)
def _model_config(model: str, overrides: str, num_classes: int, in_chans: int) -> dict:
    from .zoo import create_model

    built = create_model(model, num_classes=num_classes, in_chans=in_chans, **json.loads(overrides))
    # JSON form (lists, not tuples), as the config reads back from a stored run.
    return json.loads(json.dumps(built.config.to_dict()))


def train_run(config: dict, workdir: Path) -> dict:
    """Train one run with the engine of `xception train`; resumes a run cut short in `workdir`.
    Its checkpoints stay until the caller has stored the run (then `shutil.rmtree`)."""
    from .checkpoint import CheckpointError, find_latest
    from .train import RESULT_FILES, fit

    # The newest checkpoint named, not resume="auto": a damaged one then fails as itself, where
    # "auto" advised `--resume <the one before>`, an option `xception experiment` does not have.
    latest = find_latest(workdir / "checkpoints")
    if latest is None:
        # A run trained again (its stored record was damaged): its old results here are this
        # suite's own work files, which the engine refuses to train over.
        for name in RESULT_FILES:
            (workdir / name).unlink(missing_ok=True)
    try:
        return fit(dict(config["train"]), out=str(workdir), progress=False,
                   resume=None if latest is None else str(latest))  # fmt: skip
    except CheckpointError as err:
        if latest is None:
            raise
        raise CheckpointError(f"{err}. This run cannot resume from it: delete {latest} to resume "
                              f"from the checkpoint before it, or {workdir} to train the run "
                              "again from the start") from None  # fmt: skip


def _machine() -> dict:
    """Where a run trained: speeds and times compare only within one machine."""
    from . import deploy

    cuda = torch.cuda.is_available()
    return dict(device="cuda" if cuda else "cpu",
                gpu=torch.cuda.get_device_name() if cuda else None,
                cpu=deploy.cpu_model(), threads=torch.get_num_threads())  # fmt: skip


def _build(variant: Variant, data: dict) -> nn.Module:
    from .zoo import create_model

    return create_model(variant.model, num_classes=data["num_classes"],
                        in_chans=data["in_chans"], **variant.overrides)  # fmt: skip


def _speed(model: nn.Module, data: dict, scale: Scale) -> dict:
    """A model's measured CPU inference speed and where it was measured, always with glibc
    keeping freed memory: speeds measured after CPU training ran with it (fit() sets it for
    the process), those measured again (`remeasure_speed`) or after GPU training did not, and
    the two were set side by side in one report."""
    from . import deploy, runtime

    runtime.keep_freed_memory()  # the process is the experiment's, as it is fit()'s
    ips = measure_speed(model, data["size"], data["in_chans"], batch=scale.speed_batch,
                        repeats=scale.speed_repeats)  # fmt: skip
    return dict(images_per_s=ips,
                speed_machine=dict(cpu=deploy.cpu_model(), threads=torch.get_num_threads(),
                                   batch=scale.speed_batch))  # fmt: skip


def _variant_stats(variant: Variant, data: dict, scale: Scale) -> dict:
    """Parameters, MACs and measured inference speed of a variant (weights do not matter)."""
    from .model import count_macs

    model = _build(variant, data)
    size = data["size"]
    return dict(params=_param_count(model), macs=count_macs(model, (size, size), data["in_chans"]),
                **_speed(model, data, scale))  # fmt: skip


def val_acc(row: dict) -> float:
    """Validation top-1 of one epoch of the engine's history, as a fraction."""
    return row["val_top1"] / 100.0


def run_experiments(
    suites: Sequence[str],
    out: str | Path,
    scale: Scale,
    data: str | Path = "fashion-mnist",
    *,
    remeasure_speed: bool = False,
) -> dict:
    """Train every run the suites need that the store does not hold yet, then write the outputs
    (for every suite of this scale whose runs are all in the store, so suites run one at a time
    add up to one report).

    `remeasure_speed`: measure every variant's inference speed again on this machine and store
    it in the finished runs (for runs trained elsewhere, e.g. on a GPU machine, whose speeds
    should be reported for this one); nothing is trained then, and runs not finished are left
    out; with none finished, a ValueError says so and nothing is written. Returns the aggregated
    results (see `aggregate`) with `trained`, `reused` and `remeasured` run counts.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file: pass a folder for the runs and the report "
                         "(it is created if missing)")  # fmt: skip
    check_output_file(out / "REPORT.md")  # a folder that cannot be made (/proc/x) or written
    # Found in the way only when the first run was stored, or when every run was trained.
    for name in ("runs", "work"):
        if (out / name).exists() and not (out / name).is_dir():
            raise ValueError(f"{out / name} is a file, where the experiments keep their {name} "
                             "(a folder): move it away, or choose another --out")  # fmt: skip
    for name in ("results.json", "results.csv", *_plot_names(SUITES).values()):
        if (out / name).is_dir():
            raise ValueError(f"{out / name} is a folder, where the experiments write their "
                             f"{name}: move it away, or choose another --out")  # fmt: skip
    for suite in suites:
        field_ = SUITE_FIELDS.get(suite)
        if field_ in scale.model:
            raise ValueError(f"the {suite} suite compares models by {field_}: a setting of it for "
                             f"every variant ({field_}={scale.model[field_]!r}) would make them "
                             "one model; leave it out")  # fmt: skip
    fixed = sorted(set(scale.model) & set(DATA_FIELDS))
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: fixed by the data (1-channel images, 10 classes), "
                         "not a model setting here")  # fmt: skip
    # seeds=0 failed after hashing the data ("min() arg is an empty sequence"), speed_repeats=0
    # after training the first run.
    for name in ("seeds", "epochs", "train_size", "val_size", "batch_size", "speed_batch",
                 "speed_repeats"):  # fmt: skip
        value = getattr(scale, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"scale {scale.name!r}: {name}={value!r}: use a positive integer")
    if scale.train_size < scale.batch_size:
        raise ValueError(f"{scale.train_size} training images are fewer than one batch of "
                         f"{scale.batch_size}: use at least {scale.batch_size}")  # fmt: skip
    info = dataset_info(data)
    for size, have, what in ((scale.train_size, info["train_images"], "training"),
                             (scale.val_size, info["test_images"], "test")):  # fmt: skip
        if size > have:  # the engine would take them all, and the report claim `size`
            raise ValueError(f"{size:,} {what} images asked for, but {data} has {have:,}: "
                             f"ask for at most {have:,}")  # fmt: skip
    store = Store(out)
    plans = {s: suite_plan(s, scale, in_chans=info["in_chans"], num_classes=info["num_classes"])
             for s in suites}  # fmt: skip
    # Seed-major order: an interrupted suite leaves every variant with about as many seeds.
    todo: dict[str, tuple[Variant, dict]] = {}
    for seed in range(scale.seeds):
        for variants, _ in plans.values():
            for v in variants:
                config = run_config(v, scale, seed, info)
                todo.setdefault(run_key(config), (v, config))
    counts = {"trained": 0, "reused": 0, "remeasured": 0}
    if remeasure_speed:
        finished = {key for key in todo if store.get(key) is not None}
        if not finished:  # before the report: it would be rewritten with no results
            raise ValueError(_nothing_to_remeasure(store, suites, scale))
        reported = _reported_suites(out / "results.json")
        for suite, (variants, _) in plans.items():
            # A suite the report holds but not complete at this scale would be dropped from
            # the report rewritten, its plot deleted, by a command that trains nothing: most
            # often the scale is not the runs' (--seeds 2 left out).
            keys = {run_key(run_config(v, scale, seed, info))
                    for seed in range(scale.seeds) for v in variants}  # fmt: skip
            if suite in reported and keys - finished:
                raise ValueError(
                    f"{len(keys - finished)} of the {len(keys)} runs of the {suite} suite at "
                    f"this scale ({scale.seeds} seeds) are not finished in {store.dir}, so the "
                    "report rewritten would leave it out: give the scale the runs were trained "
                    "with (--seeds, --quick, --epochs, --train-size, --val-size, --segments, "
                    "--set), or train them first (the same command without --remeasure-speed)"
                )
        counts["remeasured"] = _remeasure(store, todo, info, scale)
    else:
        # Each run is claimed with a lock file, so several processes given the same `out` share
        # the work (on a machine with cores or GPU to spare): a run another process holds is
        # skipped, then waited for at the end and trained here if that process died without
        # finishing it.
        held = []
        for i, key in enumerate(todo, 1):
            outcome = _ensure_run(store, out, todo, i, key, info, scale, wait=False)
            if outcome is None:
                held.append((i, key))
            else:
                counts[outcome] += 1
        for i, key in held:
            counts[_ensure_run(store, out, todo, i, key, info, scale, wait=True)] += 1
    results = write_outputs(out, scale, info, store)
    results.update(counts)
    return results


def _remeasure(store: Store, todo: dict, info: dict, scale: Scale) -> int:
    """New speed measurements for the finished runs of `todo`, one per variant; returns the
    number of runs updated."""
    speeds: dict[str, dict] = {}
    updated = 0
    for key, (variant, _) in todo.items():
        record = store.get(key)
        if record is None:
            continue
        label = json.dumps([variant.model, variant.overrides], sort_keys=True)
        if label not in speeds:
            log.info("measuring the inference speed of %s", variant.label)
            speeds[label] = _speed(_build(variant, info), info, scale)
        store.put({**record, **speeds[label]})
        updated += 1
    return updated


def _nothing_to_remeasure(store: Store, suites: Sequence[str], scale: Scale) -> str:
    """Why `remeasure_speed` found no run to measure again, and what to do."""
    names = (f"the {suites[0]} suite" if len(suites) == 1
             else f"the {', '.join(suites[:-1])} and {suites[-1]} suites")  # fmt: skip
    runs = sorted(store.dir.glob("*.json")) if store.dir.is_dir() else []
    if not runs:
        return (f"no finished runs of {names} in {store.dir.parent}: nothing to re-measure (train "
                "them first: the same command without --remeasure-speed)")  # fmt: skip
    return (f"{store.dir} holds {len(runs)} finished run(s), none of {names} at {scale.name} "
            "scale: nothing to re-measure (give the --out and the scale they were trained with: "
            "--quick, --epochs, --train-size, --val-size, --segments, --set)")  # fmt: skip


@contextlib.contextmanager
def _claim(out: Path, key: str, *, wait: bool):
    """Hold the lock of run `key` (yields True), or yield False at once if another process holds
    it and `wait` is false."""
    path = out / "work" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _ensure_run(
    store: Store, out: Path, todo: dict, i: int, key: str, info: dict, scale: Scale, *,
    wait: bool,
) -> str | None:  # fmt: skip
    """Make sure run `key` (number `i` of `todo`) is in the store: "reused" if it was, "trained"
    if this process trained it, None if another process holds it and `wait` is false."""
    from .train import TrainingError

    if store.get(key) is not None:
        return "reused"
    with _claim(out, key, wait=wait) as mine:
        if not mine:
            return None
        if store.get(key) is not None:  # finished by another process meanwhile
            return "reused"
        variant, config = todo[key]
        seed = config["train"]["seed"]
        log.info("run %d/%d: %s (%s), seed %d", i, len(todo), variant.label, variant.model, seed)
        start = time.perf_counter()
        try:
            result = train_run(config, out / "work" / key)
        except TrainingError as err:
            # The engine's advice (lower lr, set grad_clip) names settings this command does
            # not take; the run is named, as a rerun would diverge at it again.
            raise TrainingError(
                f"run {i}/{len(todo)}, {variant.label} ({variant.model}), seed {seed}: "
                f"{err.detail}",
                "The suite's recipe does not train this variant at this "
                "scale: change the scale (--set, --epochs, --train-size) or check the data; "
                f"delete {out / 'work' / key} to train the run from its start again",
            ) from None
        history = result["history"]
        if not history or "val_top1" not in history[-1]:
            raise RuntimeError(f"run {key}: the training engine returned no validation history")
        # The engine's own clock spans a resume too; this process's saw only its part.
        seconds = history[-1].get("wall_s") or time.perf_counter() - start
        record = dict(key=key, config=config, history=history,
                      train_seconds=seconds, final_val_acc=val_acc(history[-1]),
                      machine=_machine(), **_variant_stats(variant, info, scale),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
        store.put(record)
        # Stored: the checkpoints were only there for a resume.
        shutil.rmtree(out / "work" / key / "checkpoints", ignore_errors=True)
        log.info("run %d/%d: %s seed %d: val acc %.2f%% in %.0f s", i, len(todo), variant.label,
                 seed, 100 * record["final_val_acc"], seconds)  # fmt: skip
        return "trained"


# ---------------------------------------------------------------------------------------------
# aggregation and outputs
# ---------------------------------------------------------------------------------------------
def _summarise(variant: Variant, records: list[dict]) -> dict:
    accs = [r["final_val_acc"] for r in records]
    epochs = min(len(r["history"]) for r in records)
    curve = [[val_acc(r["history"][e]) for r in records] for e in range(epochs)]
    return dict(
        label=variant.label,
        model=variant.model,
        overrides=variant.overrides,
        keys=[r["key"] for r in records],
        seeds=len(records),
        final_val_accs=accs,
        curve_val_accs=[statistics.fmean(val_acc(row) for row in r["history"]) for r in records],
        val_acc_mean=statistics.fmean(accs),
        val_acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
        curve_mean=[statistics.fmean(c) for c in curve],
        curve_std=[statistics.stdev(c) if len(c) > 1 else 0.0 for c in curve],
        params=records[0]["params"],
        macs=records[0]["macs"],
        images_per_s=statistics.median(r["images_per_s"] for r in records),
        machines=sorted({_machine_text(r.get("machine")) for r in records}),
        # Every machine that measured the median's speeds (a --seeds rerun elsewhere adds one).
        speed_machine="; ".join(sorted({_speed_text(r) for r in records})),
        train_seconds=statistics.fmean(r["train_seconds"] for r in records),
    )


def _machine_text(m: dict | None) -> str:
    if not m:
        return "unrecorded"
    where = m["gpu"] if m.get("device") == "cuda" and m.get("gpu") else m.get("cpu", "?")
    return f"{where} ({m.get('device', 'cpu')})"


def _speed_text(record: dict) -> str:
    m = record.get("speed_machine") or record.get("machine")
    if not m:
        return "unrecorded"
    return f"{m.get('cpu', '?')}, {m.get('threads', '?')} threads"


def aggregate(store: Store, scale: Scale, data: dict) -> dict:
    """Every suite whose runs are all in the store, summarised and judged, with the seed noise
    pooled over every distinct variant of those suites."""
    suites, plans = {}, {}
    for suite in SUITES:
        try:
            variants, claims = suite_plan(suite, scale, in_chans=data["in_chans"],
                                          num_classes=data["num_classes"])  # fmt: skip
        except ValueError:  # e.g. a segment count this scale's model cannot take: never run
            continue
        rows = []
        for v in variants:
            records = [store.get(run_key(run_config(v, scale, seed, data)))
                       for seed in range(scale.seeds)]  # fmt: skip
            if any(r is None for r in records):
                break
            rows.append(_summarise(v, records))
        else:
            suites[suite], plans[suite] = dict(variants=rows), claims
    # The baseline appears in four suites: count each distinct variant (set of runs) once.
    distinct = {tuple(r["keys"]): r for res in suites.values() for r in res["variants"]}
    noise = {m: pooled_noise([r[f"{m}_val_accs"] for r in distinct.values()])
             for m in ("final", "curve")}  # fmt: skip
    for suite, res in suites.items():
        values = {r["label"]: dict(final=r["final_val_accs"], curve=r["curve_val_accs"])
                  for r in res["variants"]}  # fmt: skip
        res["claims"] = [judge(c, values, noise[c.metric]) for c in plans[suite]]
    pooled = {m: None if n is None else dict(std=math.sqrt(n[0]), df=n[1])
              for m, n in noise.items()}  # fmt: skip
    return dict(scale=dataclasses.asdict(scale), data=data, seed_noise=pooled, suites=suites)


def _plot_names(suites) -> dict[str, str]:
    """The plot files `write_outputs` draws for these suites, by key."""
    names = {suite: f"{suite}.png" for suite in suites}
    if "segments" in names:
        names["spectrum"] = "segments-spectrum.png"
    return names


def _previous_results(path: Path) -> dict | None:
    """The results.json at `path` with its suites, or None: no earlier report, or not ours."""
    try:
        results = json.loads(path.read_text())
        ours = isinstance(results, dict) and isinstance(results["suites"], dict)
        return results if ours else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _reported_suites(path: Path) -> set[str]:
    """The suites of the report in `path` (results.json), if any."""
    return set((_previous_results(path) or {"suites": {}})["suites"])


def _dropped_suites(path: Path, results: dict) -> list[str]:
    """The report covers the suites complete at this run's scale: a suite the folder's last
    report held (at another scale: other seeds, epochs, settings; or with runs since removed)
    drops out of it. Say which, where it used to go unsaid; its runs stay in the store.
    Returns the file names of the plots drawn for them, which no report shows any more."""
    before = _previous_results(path)
    dropped = sorted(set(before["suites"]) - set(results["suites"])) if before else []
    if not dropped:
        return []
    old = before.get("scale") or {}
    scale = ", ".join(f"{k} {old[k]}" for k in ("name", "seeds", "epochs", "train_size")
                      if k in old)  # fmt: skip
    log.warning("%s: the report now leaves out %s, reported there before (%s) but not complete "
                "at this run's scale; their plots are removed and their runs kept: rerun them "
                "at this scale, or use another --out for each scale", path.parent,
                ", ".join(dropped), scale)  # fmt: skip
    return list(_plot_names(dropped).values())


def write_outputs(out: Path, scale: Scale, data: dict, store: Store) -> dict:
    """results.json, results.csv, one curve plot per suite, the spectrum plot and REPORT.md.

    One process at a time, each reading the store once it holds the lock: processes sharing
    `out` (one per suite) finish together, and a report read before another's last run was
    stored replaced the one written after it, dropping that suite as "not complete"."""
    out.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(out / ".report.lock")):
        return _write_outputs(out, scale, data, store)


def _write_outputs(out: Path, scale: Scale, data: dict, store: Store) -> dict:
    results = aggregate(store, scale, data)
    stale = _dropped_suites(out / "results.json", results)
    atomic_write(out / "results.json", json.dumps(results, indent=1).encode())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["suite", "variant", "model", "overrides", "seeds", "val_acc_mean",
                     "val_acc_std", "params", "macs", "images_per_s", "train_seconds"])  # fmt: skip
    for suite, res in results["suites"].items():
        for row in res["variants"]:
            writer.writerow([suite, row["label"], row["model"],
                             json.dumps(row["overrides"], sort_keys=True), row["seeds"],
                             f"{row['val_acc_mean']:.5f}", f"{row['val_acc_std']:.5f}",
                             row["params"], row["macs"], f"{row['images_per_s']:.1f}",
                             f"{row['train_seconds']:.1f}"])  # fmt: skip
    atomic_write(out / "results.csv", buf.getvalue().encode())
    plots = _plot_names(results["suites"])
    for suite, res in results["suites"].items():
        _plot_curves(out / plots[suite], suite, res, scale, data["title"])
    if "spectrum" in plots:
        _plot_spectrum(out / plots["spectrum"], results["suites"]["segments"], scale,
                       data["title"])  # fmt: skip
    results["plots"] = plots
    atomic_write(out / "REPORT.md", render_report(results).encode())
    for name in set(stale) - set(plots.values()):  # drawn at another scale, shown nowhere now
        (out / name).unlink(missing_ok=True)
    return results


def _figure():
    """A figure drawn without pyplot, which `matplotlib.use("Agg")` had needed: that switched
    the backend of the whole process (a notebook's, a script's window) for good."""
    from matplotlib.figure import Figure

    return Figure(figsize=(6.4, 4.2))


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def _plot_curves(path: Path, suite: str, res: dict, scale: Scale, title: str) -> None:
    """Validation accuracy against epochs, one line per variant (mean over seeds, +-1 std band),
    in the manner of the paper's Figures 9 and 10."""
    import matplotlib.ticker

    fig = _figure()
    ax = fig.subplots()
    for row in res["variants"]:
        epochs = list(range(1, len(row["curve_mean"]) + 1))
        mean = [100 * m for m in row["curve_mean"]]
        std = [100 * s for s in row["curve_std"]]
        (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=f"{row['label']} "
                          f"({100 * row['val_acc_mean']:.2f}%)")  # fmt: skip
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)],
                        color=line.get_color(), alpha=0.2, lw=0)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{suite}: {title}, {scale.name} scale, mean of {scale.seeds} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def _plot_spectrum(path: Path, res: dict, scale: Scale, title: str) -> None:
    """Accuracy against the number of segments, parameters and MACs on a second axis."""
    rows = res["variants"]
    xs = list(range(len(rows)))
    names = [str(r["overrides"].get("segments", "")) for r in rows]
    fig = _figure()
    ax = fig.subplots()
    ax.errorbar(xs, [100 * r["val_acc_mean"] for r in rows],
                yerr=[100 * r["val_acc_std"] for r in rows], marker="o", capsize=3,
                color="C0", label="validation accuracy")  # fmt: skip
    ax.set_xticks(xs, names)
    ax.set_xlabel("segments of the spatial 3x3 conv (1 = regular conv)")
    ax.set_ylabel("validation accuracy (%)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["params"] / 1e6 for r in rows], "s--", color="C1", label="parameters (M)")
    ax2.plot(xs, [r["macs"] / 1e6 for r in rows], "^:", color="C2", label="MACs per image (M)")
    for x, r in zip(xs, rows, strict=True):
        ax2.annotate(f"{r['images_per_s']:.0f} img/s", (x, r["macs"] / 1e6), fontsize=7,
                     textcoords="offset points", xytext=(0, -12), ha="center")  # fmt: skip
    ax2.set_yscale("log")
    ax2.set_ylabel("parameters (M), MACs (M)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower left")
    ax.set_title(f"segment spectrum: {title}, {scale.name} scale")
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def _pp(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}"


def _claim_line(c: dict) -> str:
    if c["kind"] == "any_better":
        best = max(c["comparisons"], key=lambda p: p["diff"], default=None)
        if best is None:
            detail = "no intermediate variant"
        elif best["se"] is None:  # one seed: "95% interval n/a .. n/a", as it said
            detail = (f"best intermediate: {best['a']}, {_pp(best['diff'])} pp against "
                      f"{c['b']}, too few seeds to estimate the noise")  # fmt: skip
        else:
            detail = (f"best intermediate: {best['a']}, {_pp(best['diff'])} pp against {c['b']} "
                      f"({_level(best)} interval {_pp(best['lo'])} .. {_pp(best['hi'])}, "
                      f"Bonferroni for {len(c['comparisons'])} comparisons)")  # fmt: skip
        return f"- **{c['verdict']}**: {c['text']}. {detail}."
    if c["se"] is None:
        detail = f"{_pp(c['diff'])} pp, too few seeds to estimate the noise"
    else:
        detail = (f"{c['a']} minus {c['b']}: {_pp(c['diff'])} pp, {_level(c)} interval "
                  f"{_pp(c['lo'])} .. {_pp(c['hi'])} pp (t at {c['df']} df)")  # fmt: skip
    return f"- **{c['verdict']}**: {c['text']}. {detail}."


def _level(stats: dict) -> str:
    return f"{100 * stats.get('coverage', CONFIDENCE):.4g}%"


def _noise_text(noise: dict | None) -> str:
    if noise is None:
        return "no variant has two seeds: no estimate"
    return f"standard deviation {100 * noise['std']:.2f} pp, {noise['df']} degrees of freedom"


def render_report(results: dict) -> str:
    """The markdown report: settings, then per suite a table, the plots and the verdicts."""
    scale = results["scale"]
    lines = [
        f"# Xception ablations at {scale['name']} scale",
        "",
        f"Data: {results['data']['name']} ({results['data']['size']} px, "
        f"{results['data']['in_chans']} channel(s)); per seed, {scale['train_size']:,} training "
        f"images and {scale['val_size']:,} validation images (seeded subsets of the train and "
        f"test splits), {scale['epochs']} epoch(s), batch "
        f"{scale['batch_size']}, {scale['seeds']} seed(s). Accuracy is the final epoch's "
        "validation top-1, mean +- standard deviation over seeds.",
        "",
        "Verdict rule: the difference of mean accuracies with a 95% interval from Student's t, "
        "the seed-to-seed noise pooled over every distinct variant below (final accuracy: "
        f"{_noise_text(results['seed_noise']['final'])}; for the convergence claims, the mean "
        f"accuracy over the epochs: {_noise_text(results['seed_noise'].get('curve'))}). "
        "*Better*: holds when the interval "
        "lies above 0, does not hold when "
        f"below 0. *Equivalent*: holds when it lies within +-{100 * EQUIVALENCE_MARGIN:g} pp, "
        "does not hold when it lies wholly outside that margin. *Some of k "
        "variants beats one*: each comparison at a 1 - 0.05/k level (Bonferroni). Otherwise "
        "inconclusive at this scale.",
    ]
    for suite, res in results["suites"].items():
        lines += ["", f"## {suite}", "",
                  "| variant | seeds | val acc (%) | parameters | MMAC/image | images/s |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in res["variants"]:
            lines.append(
                f"| {r['label']} | {r['seeds']} | {100 * r['val_acc_mean']:.2f} +- "
                f"{100 * r['val_acc_std']:.2f} | {r['params']:,} | {r['macs'] / 1e6:.1f} | "
                f"{r['images_per_s']:.0f} |"
            )
        lines += ["", f"![{suite}]({results['plots'][suite]})"]
        if suite == "segments":
            lines += ["", f"![segment spectrum]({results['plots']['spectrum']})"]
        lines += ["", *(_claim_line(c) for c in res["claims"])]
    if not results["suites"]:
        lines += ["", "No suite has all of its runs finished yet."]
    else:
        rows = [r for res in results["suites"].values() for r in res["variants"]]
        trained = sorted({m for r in rows for m in r["machines"]})
        speed = sorted({m for r in rows for m in r["speed_machine"].split("; ")})
        mixed = [r["label"] for r in rows if "; " in r["speed_machine"]]
        seconds = {tuple(r["keys"]): r["train_seconds"] * r["seeds"] for r in rows}
        lines += ["", "## Machines", "",
                  f"Trained on: {'; '.join(trained)}; {sum(seconds.values()) / 60:.1f} "
                  "min of training in all (the runs' own times, summed).",
                  f"Inference speed (images/s, batch {scale['speed_batch']}, channels_last, CPU) "
                  f"measured on: {'; '.join(speed)}."]  # fmt: skip
        if mixed:
            lines += [f"The speeds of {', '.join(dict.fromkeys(mixed))} are medians over runs "
                      "measured on more than one machine: `--remeasure-speed` measures every "
                      "variant again on this one."]  # fmt: skip
    return "\n".join(lines) + "\n"
