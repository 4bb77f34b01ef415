"""The `xception` command line: argument parsing, human output, and one-line errors.

Each subcommand is a pair registered with `@command`: a function that adds its arguments and a
function that runs it and returns the exit status. Errors a user can cause surface as one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["main"]


def _folder(text: str) -> str:
    """An --out folder: an empty name (an unset shell variable, --out "") had trained into
    the current folder, or written to the default one, without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name: give a folder, or leave --out "
                                         "out for the default")  # fmt: skip
    return text


def _path(text: str) -> str:
    """A file or folder to read or write: an empty one (an unset shell variable) had been read
    as the current folder: predict classified every image under it, eval scored the run it was
    run in, and train --config '' trained with the recipe's own settings."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?): give a file "
                                         "or folder")  # fmt: skip
    return text


def _name_part(text: str) -> str:
    """Part of a candidate's name (bench --only): empty text, in every name, had run them all."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty text (an unset shell variable?) is part of every "
                                         "candidate name: give part of one, or leave --only "
                                         "out to run them all")  # fmt: skip
    return text


# What a run folder (train.py) and its checkpoint folders (checkpoint.py) are made of: an output
# given to a command that reads such a folder must not replace one of them.
RUN_FILES = ("model.safetensors", "ema.safetensors", "model.json", "state.pt", "metrics.csv",
             "config.yaml", "curves.png")  # fmt: skip


def _data_read(data: str, out: str | None) -> list[Path]:
    """`out` when it would be a file of the dataset folder `data` (an image, a label list, an
    IDX file), which eval reads: `--json ds/val.csv` replaced the list it was scoring. Other
    names inside the folder (ds/eval.json) are no part of the data."""
    from .data import IMAGE_SUFFIXES, _within

    if out is None or not os.path.isdir(data):
        return [Path(data)]
    inside = _within(os.path.realpath(out), os.path.realpath(data))
    name = Path(out).name.lower()
    read = Path(out).suffix.lower() in {*IMAGE_SUFFIXES, ".csv"} or "-ubyte" in name
    return [Path(data), *([Path(out)] if inside and read else [])]


def _files_read(spec: str | None) -> list[Path]:
    """The files a weights argument reads: the file itself, or a run or checkpoint folder's own
    files (an eval.json of one's own inside it is no part of the run)."""
    if spec is None or not os.path.isdir(spec):
        return [Path(spec)] if spec else []
    return [f for f in Path(spec).rglob("*") if f.name in RUN_FILES]


log = logging.getLogger("xception")

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help: str, arguments: Callable | None = None):
    """Register `run(args) -> int` as subcommand `name`; `arguments(parser)` adds its flags."""

    def register(run: Callable) -> Callable:
        COMMANDS[name] = (help, arguments or (lambda parser: None), run)
        return run

    return register


class UserError(Exception):
    """An error the user can fix; printed as one line."""


def _fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination, named as the API names the setting it gives (--batch-size:
    batch_size, eval's --size: image_size), and the option itself."""
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions
            if a.option_strings and a.dest != "help"}  # fmt: skip


def _given_options(args: argparse.Namespace) -> dict[str, str]:
    """The settings the user gave by an option, each with that option (batch_size: --batch-size)."""
    return {dest: option for dest, option in getattr(args, "options", {}).items()
            if getattr(args, dest, None) is not None and getattr(args, dest) is not False}  # fmt: skip


def _as_typed(text: str, args: argparse.Namespace) -> str:
    """An error of the API about a setting (`batch_size=0 is not valid: ...`) in the words the
    user typed, where the setting came from an option (`--batch-size 0 is not valid: ...`); one
    from --set, --config or a recipe keeps its key, which is what the user wrote there."""
    given = _given_options(args)
    subject = re.match(r"(\w+)=", text)
    if subject is None or subject[1] not in given:
        return text
    value = getattr(args, subject[1])
    rest = next((text[len(f"{subject[1]}={v}"):] for v in (repr(value), str(value))
                 if text.startswith(f"{subject[1]}={v}")), None)  # fmt: skip
    if rest is None or (rest and rest[0] not in " :;,)"):  # about another value than the one typed
        return text

    def typed(m: re.Match) -> str:  # every setting of the message that came from an option
        value = m[2] if m[2] is not None else m[3]
        return given[m[1]] if value == "True" else f"{given[m[1]]} {shlex.quote(value)}"

    names = "|".join(map(re.escape, given))
    return re.sub(rf"\b({names})=(?:'([^']*)'|([^\s,;:)]+))", typed, text)


def _values_as_typed(text: str, args: argparse.Namespace) -> str:
    """A warning of the API in the words the user typed: each `key=value` whose value is the one
    an option gave becomes that option (`epochs=5 where the run had 3` -> `--epochs 5 where
    ...`); the same key with another value (the run's own, say) keeps its name."""
    for dest, option in _given_options(args).items():
        value = getattr(args, dest)
        words = option if value is True else f"{option} {shlex.quote(str(value))}"
        for shown in dict.fromkeys((repr(value), str(value))):
            text = re.sub(rf"\b{re.escape(dest)}={re.escape(shown)}(?=$|[\s,;:)])",
                          lambda m, w=words: w, text)  # fmt: skip
    return text


@contextlib.contextmanager
def _warnings_as_typed(args: argparse.Namespace):
    """While a command runs, the package's warnings name settings as the user gave them (see
    `_values_as_typed`); the record factory is the process's, and is restored after."""
    previous = logging.getLogRecordFactory()

    def factory(*a, **kw) -> logging.LogRecord:
        record = previous(*a, **kw)
        if record.levelno >= logging.WARNING and record.name.split(".")[0] == "xception":
            try:
                text = record.getMessage()
            except Exception:  # noqa: BLE001 (a bad format is logging's own error to report)
                return record
            typed = _values_as_typed(text, args)
            if typed != text:
                record.msg, record.args = typed, None
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


def _parse_overrides(pairs: list[str], flags: dict[str, str] | None = None) -> dict:
    """`--set key=value` pairs, values parsed as YAML scalars/lists (e.g. fc_layers=[64,64]).
    `flags` maps keys that the command takes as flags of their own to those flags: a key set
    twice used to be a TypeError from create_model."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected key=value, e.g. --set residual=false")
        if flags and key in flags:
            raise UserError(f"--set {key}: give it as {flags[key]}, not through --set")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).strip().split("\n")[0]
            raise UserError(f"--set {pair!r}: the value is not valid YAML ({problem}): write "
                            "it as YAML, e.g. --set fc_layers=[64,64]") from None  # fmt: skip
    return out


def _model_set(pairs: list[str], command: str) -> dict:
    """`--set` of `predict` and `eval`: the config a plain weights file was trained with. The
    classifier is the weights' own, so a class count is refused rather than given a new,
    random head whose scores would mean nothing."""
    overrides = _parse_overrides(pairs, {"weights": "--weights" if command == "predict"
                                         else "--checkpoint"})  # fmt: skip
    for key in ("num_classes", "global_pool"):
        if key in overrides:
            raise UserError(f"--set {key}: {command} uses the weights' own classifier (a new "
                            "head would be random); train or fine-tune one with xception "
                            "train --weights")  # fmt: skip
    return overrides


# ---------------------------------------------------------------------------------------------
# models / info (foundation)
# ---------------------------------------------------------------------------------------------
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "filter",
        nargs="?",
        help="only names containing this text, or matching a wildcard pattern (*xception*)",
    )


@command("models", "list the model presets", _models_args)
def _run_models(args: argparse.Namespace) -> int:
    from .zoo import PRESETS, list_models

    names = list_models(args.filter)
    if not names:
        import difflib

        if any(c in args.filter for c in "*?["):  # a pattern matches whole names, as timm's
            inner = args.filter.strip("*")
            hint = (f"try '*{inner}*'" if f"*{inner}*" != args.filter
                    else f"names: {', '.join(PRESETS)}")  # fmt: skip
            raise UserError(f"no preset name matches {args.filter!r} (a pattern matches the "
                            f"whole name): {hint}")  # fmt: skip
        close = difflib.get_close_matches(args.filter, PRESETS, n=3, cutoff=0.4)
        raise UserError(f"no preset name contains {args.filter!r}"
                        + (f": did you mean {', '.join(close)}?" if close else
                           f" (names: {', '.join(PRESETS)})"))  # fmt: skip
    rows = [[name, PRESETS[name][0]] for name in names]
    print(_fmt_table(rows, ["model", "description"]))
    return 0


def _print_summary(model, size: int) -> None:
    from .model import count_macs, summary

    rows = [[r["name"], "x".join(map(str, r["shape"])), f"{r['params']:,}"]
            for r in summary(model, (size, size))]  # fmt: skip
    print(_fmt_table(rows, ["block", "output (C x H x W)", "parameters"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    macs = count_macs(model, (size, size), model.config.in_chans)
    print(f"trainable parameters: {trainable:,}")
    print(f"compute at {size}x{size}: {macs / 1e9:.2f} GMAC ({2 * macs / 1e9:.2f} GFLOP) per image")


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="xception", help="preset (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="classifier classes, 0 for none (default: %(default)s)")  # fmt: skip
    p.add_argument("--size", type=int, default=299,
                   help="input height and width (default: %(default)s)")  # fmt: skip
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set segments=4")  # fmt: skip


@command("info", "show a model's blocks, parameter count and compute", _info_args)
def _run_info(args: argparse.Namespace) -> int:
    from .zoo import create_model

    if args.model == "inception-v3":
        raise UserError("info describes Xception presets; inception-v3 is torchvision's model")
    import torch

    if args.size < 1:
        raise UserError(f"--size {args.size}: give the input size in pixels")
    overrides = _parse_overrides(args.set, {"num_classes": "--num-classes"})
    try:
        model = create_model(args.model, num_classes=args.num_classes, **overrides)
    except ValueError as err:  # the config's advice, in this command's words
        raise UserError(re.sub(r"\bset num_classes=(\d+)", r"give --num-classes \1",
                               str(err))) from None  # fmt: skip
    # Too small an input is refused before anything is printed: one line, not two.
    model.check_input(torch.empty(1, model.config.in_chans, args.size, args.size, device="meta"))
    print(f"{args.model}: {model.config}")
    _print_summary(model, args.size)
    return 0


# ---------------------------------------------------------------------------------------------
# predict / convert (weights)
# ---------------------------------------------------------------------------------------------
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        type=_path,
        metavar="PATH",
        help="image files, or folders searched recursively for images",
    )
    p.add_argument(
        "--weights",
        type=_path,
        default="imagenet",
        help="weights name (imagenet), file (.h5, .safetensors, .pth), run folder or "
        "checkpoint folder; "
        "default: %(default)s, downloaded once into the cache",
    )
    p.add_argument(
        "--model",
        default="xception",
        help="preset (default: %(default)s); a safetensors file from "
        "'xception convert' restores its own config",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config field a plain .pth was trained with where the preset's "
                        "differs, e.g. --set middle_blocks=4")  # fmt: skip
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="output on stdout (default: %(default)s)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per forward pass (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--backend",
        default="torch",
        help="inference backend: torch (BN folded, channels_last) or onnxruntime (exported once "
        "per image size); default: %(default)s",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _csv_rows(topk: int):
    """A function writing one prediction as a CSV row, after writing the header once."""
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    ranks = range(1, topk + 1)
    writer.writerow(
        ["path", "error", *(f"{c}_{i}" for i in ranks for c in ("index", "label", "probability"))]
    )

    def write(r) -> None:
        cells = [x for t in r.top for x in (t.index, t.label, f"{t.probability:.6f}")]
        writer.writerow([r.path, r.error or "", *cells, *[""] * (3 * topk - len(cells))])
        sys.stdout.flush()

    return write


def _print_predictions(results: list, fmt: str, topk: int) -> None:
    """The whole table or JSON list (CSV rows are streamed by `_csv_rows`)."""
    if fmt == "json":
        import json

        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        rows = [
            [
                r.path,
                f"error: {r.error}"
                if r.error
                else ", ".join(f"{t.label} ({t.probability:.1%})" for t in r.top),
            ]
            for r in results
        ]
        print(_fmt_table(rows, ["file", f"top-{topk}"]))


@command("predict", "classify image files and folders", _predict_args)
def _run_predict(args: argparse.Namespace) -> int:
    from . import runtime
    from .predict import BACKENDS, IMAGE_EXTENSIONS, check_counts, find_images, predict
    from .weights import refuse_config_overrides
    from .zoo import create_model

    check_counts(args.topk, args.batch_size)  # before the weights are loaded (or downloaded)
    overrides = _model_set(args.set, "predict")
    if args.backend not in BACKENDS:  # before the weights are loaded (or downloaded)
        raise UserError(f"unknown --backend {args.backend!r}: use one of {', '.join(BACKENDS)}")
    files = find_images(args.paths)
    if not files:
        raise UserError(
            f"no image files in {', '.join(args.paths)} (looked for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if not any(f.exists() for f in files):  # fail before loading (or downloading) weights
        raise UserError(f"no such file: {', '.join(map(str, files))}")
    runtime.keep_freed_memory()  # this process is ours, as in `xception eval`
    refuse_config_overrides(args.weights, overrides, progress=not args.no_progress)
    model = create_model(args.model, weights=args.weights, progress=not args.no_progress,
                         **overrides)  # fmt: skip
    num_classes = model.config.num_classes if hasattr(model, "config") else model.fc.out_features
    topk = min(args.topk, num_classes)
    # Checks the model and builds the backend: a model that cannot classify is refused before
    # anything is printed (a CSV header on stdout would be a bogus file).
    # The paths as given, not `files`: a row names a file as it was typed (./-x.png).
    rows = predict(model, args.paths, topk=args.topk, batch_size=args.batch_size,
                   backend=args.backend, progress=not args.no_progress)  # fmt: skip
    # A file name that is not UTF-8 (from another system's archive) is written as its bytes, as
    # ls does: in a strict UTF-8 locale it failed the whole table (or CSV from that row on).
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    # CSV rows are printed as they come; a table or JSON needs every row, so an interruption
    # or a failure part-way prints the rows classified so far before it stops the command.
    stream = _csv_rows(topk) if args.format == "csv" else None
    results = []
    try:
        for r in rows:
            results.append(r)
            if stream is not None:
                stream(r)
    except BaseException:
        if results and stream is None:
            _print_predictions(results, args.format, topk)
            print(f"stopped after {len(results)} of {len(files)} files: the rows above are "
                  "the files classified so far", file=sys.stderr)  # fmt: skip
        raise
    if stream is None:
        _print_predictions(results, args.format, topk)
    failed = sum(r.error is not None for r in results)
    print(
        f"classified {len(results) - failed} of {len(results)} files"
        + (f"; {failed} could not be read" if failed else ""),
        file=sys.stderr,
    )
    return 0 if failed < len(results) else 1


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input",
        type=_path,
        help="weights name (imagenet, imagenet-notop) or file "
        "(Keras .h5, .safetensors, .pth/.pt from timm, Cadene or us), run folder or checkpoint "
        "folder",
    )
    p.add_argument("output", type=_path, help="the file to write: .safetensors (ours), or .h5 "
                   "for Keras' keras.applications.Xception (the paper's model only)")  # fmt: skip
    p.add_argument(
        "--model", default="xception", help="preset the weights fit (default: %(default)s)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config field the weights were trained with where the preset's "
                        "differs, e.g. --set middle_blocks=4 (a plain .pth holds none; the "
                        "safetensors file written keeps them)")  # fmt: skip


@command(
    "convert", "convert weights into our safetensors (config and metadata included), or into a "
    "Keras .h5 file", _convert_args,
)  # fmt: skip
def _run_convert(args: argparse.Namespace) -> int:
    from .checkpoint import check_output_file
    from .weights import input_meta, refuse_config_overrides, save_keras_h5, save_safetensors
    from .zoo import create_model

    out = args.output.lower()
    if out.endswith(".weights.h5"):  # Keras 3 reads this suffix as its own layout, not .h5's
        raise UserError(f"{args.output}: Keras reads a .weights.h5 name as Keras 3's own "
                        "layout; name the file .h5 (the layout of Keras' ImageNet files)")  # fmt: skip
    if not out.endswith((".safetensors", ".h5")):  # as the loaders read suffixes
        raise UserError(f"{args.output}: the output must be a .safetensors file (or .h5 for Keras)")
    if out.endswith(".h5") and not args.output.endswith(".h5"):  # Keras: "format not supported"
        raise UserError(f"{args.output}: Keras reads only a lower-case .h5 name as an .h5 file: "
                        f"name it {args.output[:-3]}.h5")  # fmt: skip
    overrides = _parse_overrides(args.set, {"weights": "IN"})
    if overrides.get("num_classes", 0) != 0:  # a file with a random head, exit 0
        raise UserError(f"--set num_classes={overrides['num_classes']}: convert keeps the "
                        "weights' own classifier (a new head would be random); --set "
                        "num_classes=0 drops it, and xception train --weights fine-tunes a new "
                        "one")  # fmt: skip
    check_output_file(args.output)
    if args.model == "inception-v3" and out.endswith(".h5"):
        raise UserError("a Keras file holds Xception's layers only: convert inception-v3 "
                        "weights to .safetensors")  # fmt: skip
    refuse_config_overrides(args.input, overrides)
    model = create_model(args.model, weights=args.input, **overrides)
    if out.endswith(".h5"):
        path = save_keras_h5(model, args.output)  # refuses a variant Keras cannot build
        cfg = model.config
        load = (f"classes={cfg.num_classes}" if cfg.num_classes
                else "include_top=False")  # fmt: skip
        if not cfg.num_classes and cfg.pooling:  # Keras' default is the map, not our vector
            load += f", pooling={cfg.pooling!r}"
        size = input_meta(model).input_size
        if cfg.in_chans != 3 or size != 299:
            # Keras builds 299x299x3 unless told: its call failed on a grey model's images, and
            # with the top, on the images of a model trained at another size.
            load += f", input_shape=({size}, {size}, {cfg.in_chans})"
        print(f"wrote {path}: Keras weights, {sum(p.numel() for p in model.parameters()):,} "
              f"parameters; keras.applications.Xception(weights={str(path)!r}, {load}) loads "
              "them (the class names and preprocessing are not in a Keras file)")  # fmt: skip
        return 0
    path = save_safetensors(model, args.output, model.weights_meta)
    meta = model.weights_meta
    cfg = getattr(model, "config", None)  # none on torchvision's Inception V3
    port = f"padding={cfg.padding}, bn_eps={cfg.bn_eps}, " if hasattr(cfg, "padding") else ""
    classes = cfg.num_classes if cfg is not None else model.fc.out_features
    preprocessing = (f"preprocessing: {meta.input_size} px" if meta else "no preprocessing "
                     f"stored (predict uses Keras' at {input_meta(model).input_size} px)")  # fmt: skip
    print(
        f"wrote {path}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{classes} classes, {port}{preprocessing}, "
        f"{'class names included' if meta and meta.categories else 'no class names'}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# experiment (the paper's ablations)
# ---------------------------------------------------------------------------------------------
# The names the parser offers, here so that building it loads no torch: `--help`, `--version`
# and a usage error answer at once, not after seconds of imports. The modules' own tuples are
# the truth; tests/test_cli.py checks these against them.
SUITE_NAMES = ("residual", "mid-activation", "order", "vs-inception", "segments")
EXPORT_FORMAT_NAMES = ("onnx", "torchscript", "exported-program")


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", choices=[*SUITE_NAMES, "all"], help="which claims to test")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke scale: small subset, 2 epochs, 2 seeds (all suites ~7 min on 2 cores)",
    )
    p.add_argument("--seeds", type=int, help="seeds per variant (default: 2 quick, 3 full)")
    p.add_argument("--out", type=_folder,
                   help="results folder (default: experiments/quick or experiments/full)")  # fmt: skip
    p.add_argument(
        "--data",
        default="fashion-mnist",
        type=_path,
        help="folder of Fashion-MNIST-style IDX files (default: Fashion-MNIST)",
    )
    p.add_argument("--epochs", type=int, help="override the scale's epochs")
    p.add_argument("--train-size", type=int, help="override the number of training images")
    p.add_argument("--val-size", type=int, help="override the number of validation images")
    p.add_argument(
        "--segments",
        help="segment counts of the spectrum, e.g. 1,2,4,8 (depthwise is always added)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model override for every Xception variant, e.g. --set width=0.5")  # fmt: skip
    p.add_argument("--remeasure-speed", action="store_true",
                   help="train nothing: measure the inference speed of the finished runs' "
                        "variants again on this machine (for runs trained elsewhere, e.g. on a "
                        "GPU) and rewrite the report")  # fmt: skip


MAX_SEEDS = 1000  # a training run per seed and variant: 1000 is days even at --quick


@command("experiment", "rerun the paper's ablations on Fashion-MNIST, with verdicts",
         _experiment_args)  # fmt: skip
def _run_experiment(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from .experiments import SCALES, SUITES, run_experiments
    from .train import Interrupted, TrainingError

    scale = SCALES["quick" if args.quick else "full"]
    knobs = dict(seeds=args.seeds, epochs=args.epochs, train_size=args.train_size,
                 val_size=args.val_size)  # fmt: skip
    for name, value in knobs.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: use a positive number")
    if args.seeds is not None and args.seeds > MAX_SEEDS:  # it planned silently for minutes
        raise UserError(f"--seeds {args.seeds}: each seed trains every variant once; use at most "
                        f"{MAX_SEEDS}")  # fmt: skip
    changes = {k: v for k, v in knobs.items() if v is not None}
    model = _parse_overrides(args.set)
    if model:
        changes["model"] = {**scale.model, **model}
    if args.segments is not None:  # "" is a mistake to name, not the default spectrum
        if args.suite not in ("segments", "all"):
            raise UserError(f"--segments applies to the segments suite, not {args.suite}")
        try:  # each count once, in order: a repeat would be a second row of the same runs
            changes["segments"] = tuple(sorted({int(k) for k in args.segments.split(",")}))
        except ValueError:
            raise UserError(f"--segments {args.segments}: use integers, e.g. 1,2,4,8") from None
        if changes["segments"][0] < 1:  # not "does not divide the channels", as it said
            raise UserError(f"--segments {args.segments}: segment counts are positive "
                            "integers, e.g. 1,2,4,8")  # fmt: skip
    if set(changes) - {"seeds"}:  # a scale of the user's own: say so in the report
        changes["name"] = f"{scale.name}, customised"
    scale = dataclasses.replace(scale, **changes)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    out = args.out or f"experiments/{'quick' if args.quick else 'full'}"
    start = time.perf_counter()
    try:
        results = run_experiments(suites, out, scale, data=args.data,
                                  remeasure_speed=args.remeasure_speed)  # fmt: skip
    except Interrupted as err:
        print(f"xception experiment: {err}. Finished runs are kept: run the same command again "
              "to continue.", file=sys.stderr)  # fmt: skip
        return err.exit_code
    except TrainingError as err:  # a diverged run: say which, keep the finished ones
        raise UserError(f"{err}. Finished runs are kept in {out}/runs.") from None
    for suite in suites:
        res = results["suites"].get(suite)
        if res is None:
            print(f"\n{suite}: runs missing, no results yet (run without --remeasure-speed)")
            continue
        rows = [[r["label"], str(r["seeds"]),
                 f"{100 * r['val_acc_mean']:.2f} +- {100 * r['val_acc_std']:.2f}",
                 f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}", f"{r['images_per_s']:.0f}"]
                for r in res["variants"]]  # fmt: skip
        print(f"\n{suite}")
        print(_fmt_table(rows, ["variant", "seeds", "val acc (%)", "parameters", "MMAC",
                                "images/s"]))  # fmt: skip
        for claim in res["claims"]:
            print(f"  {claim['verdict'].upper()}: {claim['text']}")
    elapsed = time.perf_counter() - start
    if args.remeasure_speed:
        print(f"\nspeeds of {results['remeasured']} run(s) measured again in "
              f"{elapsed / 60:.1f} min. Report: {out}/REPORT.md")  # fmt: skip
        return 0
    print(f"\n{results['trained']} run(s) trained, {results['reused']} reused from {out}/runs, "
          f"in {elapsed / 60:.1f} min. Report: {out}/REPORT.md")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------
# export / bench (deployment and speed)
# ---------------------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUT", type=_path, help="file to write (.onnx, .pt, .pt2)")
    p.add_argument("--format", help=f"one of {', '.join(EXPORT_FORMAT_NAMES)} (default: from "
                   "OUT's suffix, else onnx)")  # fmt: skip
    p.add_argument("--model", default="xception", help="preset (default: %(default)s)")
    p.add_argument("--weights", type=_path, help="weights name, file, run folder or checkpoint "
                   "folder (default: random initialisation)")  # fmt: skip
    p.add_argument(
        "--size",
        type=int,
        default=None,
        dest="input_size",  # deploy's name for it, which its errors use
        metavar="SIZE",
        help="input height and width (default: the weights' input size, else the model's: 28 "
        "for compact presets, 299 for the others)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument(
        "--dynamic-size",
        action="store_true",
        help="a symbolic height and width too (needs --set padding=symmetric)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="ONNX only: static int8 quantisation calibrated on --calibration images",
    )
    p.add_argument(
        "--calibration",
        metavar="DIR",
        nargs="+",
        type=_path,
        help="images (files or folders) for int8 calibration and the agreement check",
    )
    p.add_argument("--calibration-count", type=int, default=200,
                   help="images used for calibration; the rest are held out (default: 200)")  # fmt: skip


def _images(paths: list[str], meta, in_chans: int = 3) -> Iterator:
    """The readable images among `paths`, prepared as `meta` says, loaded one at a time as they
    are asked for (a folder of them at once ran out of memory); others are skipped, named."""
    from .data import ImageError, load_image
    from .predict import find_images

    transform = meta.transforms()
    for path in find_images(paths):
        try:
            image = load_image(path)
            yield transform(image.convert("L") if in_chans == 1 else image)
        except ImageError as err:
            log.warning("skipping %s", err)


def _export_format(output: str, given: str | None) -> str:
    """The format named, or the one OUT's suffix names (onnx when it names none); a known
    suffix that names another format than the one given is refused."""
    from .deploy import _SUFFIXES

    by_suffix = {suffix: fmt for fmt, suffix in _SUFFIXES.items()}
    implied = by_suffix.get(Path(output).suffix.lower())
    if given is None:
        return implied or "onnx"
    given = given.lower()  # --format ONNX names onnx
    if implied is not None and given in _SUFFIXES and implied != given:
        article = "an" if implied[0] in "aeiou" else "a"
        raise UserError(f"{output} is named like {article} {implied} file, but --format is {given}: "
                        f"name it {Path(output).with_suffix(_SUFFIXES[given])}, or drop "
                        "--format")  # fmt: skip
    return given


@command("export", "export a model to ONNX, TorchScript or a torch.export program, checked "
         "against PyTorch", _export_args)  # fmt: skip
def _run_export(args: argparse.Namespace) -> int:
    import itertools

    import torch

    from . import deploy
    from .checkpoint import check_output_file
    from .predict import _in_chans
    from .weights import input_meta
    from .zoo import create_model

    args.format = _export_format(args.output, args.format)
    if args.int8 and args.format != "onnx":
        raise UserError("--int8 needs --format onnx (int8 runs on ONNX Runtime)")
    if args.int8 and not args.calibration:
        raise UserError("--int8 needs --calibration DIR: a few hundred of your own images")
    if args.calibration and not args.int8:
        raise UserError("--calibration is for --int8 (static quantisation): add --int8, or drop "
                        "--calibration for an fp32 export")  # fmt: skip
    if args.int8 and args.dynamic_size:
        raise UserError("--dynamic-size with --int8: int8 models are calibrated at one input "
                        "size; export them at a fixed --size")  # fmt: skip
    if args.calibration_count < 1:
        raise UserError(f"--calibration-count {args.calibration_count}: calibrate on at least "
                        "1 image (a few hundred is best)")  # fmt: skip
    if args.input_size is not None and args.input_size < 1:
        raise UserError(f"--size {args.input_size}: give the input size in pixels")
    overrides = _parse_overrides(args.set, {"weights": "--weights"})
    # Before the weights are loaded (or downloaded); missing folders above it are made for it.
    check_output_file(args.output, example_suffix=deploy._SUFFIXES.get(args.format, ".onnx"),
                      reads=_files_read(args.weights))  # fmt: skip
    model = create_model(args.model, weights=args.weights, **overrides)
    # Without weights metadata, what predict feeds the model: a compact model exported at 299
    # refused the 28 px images it is made for, and a grey one's calibration images failed on
    # three channels' mean and std.
    meta = input_meta(model)
    size = args.input_size or meta.input_size
    if not args.int8:
        report = deploy.export(model, args.output, args.format, input_size=size,
                               dynamic_size=args.dynamic_size)  # fmt: skip
        least = f" from {report.min_size}x{report.min_size}" if report.min_size else ""
        shape = f"any size{least}, checked at " if args.dynamic_size else ""
        print(f"wrote {report.path} ({report.format}, input {shape}{size}x{size}, dynamic batch): "
              f"max abs error vs PyTorch {report.max_abs_error:.2e} on batches "
              f"{', '.join(map(str, report.checked_batches))}")  # fmt: skip
        return 0
    # Calibration images prepared at the exported size (the weights' own size may differ).
    images = _images(args.calibration, meta.replace(input_size=size), _in_chans(model))
    first = next(images, None)
    if first is None:  # before the work of exporting
        raise UserError(f"no readable images in {', '.join(args.calibration)} (the log names "
                        "those that failed): --calibration takes image files or folders of "
                        "images like those the model will classify")  # fmt: skip
    images = itertools.chain([first], images)

    def batches(stream):  # eight images at a time, read as quantize_model asks for them
        while chunk := list(itertools.islice(stream, 8)):
            yield torch.stack(chunk)

    # One stream: the first --calibration-count images calibrate, the rest are held out.
    calibration = batches(itertools.islice(images, args.calibration_count))
    q = deploy.quantize_model(model, args.output, calibration, batches(images), input_size=size)
    if q.top1_agreement is not None:
        agreement = (f"top-1 agreement with fp32 on {q.heldout_images} held-out images: "
                     f"{q.top1_agreement:.2%}")  # fmt: skip
    elif q.heldout_images:
        agreement = "no top-1 agreement to report: the model outputs no class scores"
    else:
        agreement = ("no held-out images left for the agreement check (give more images than "
                     "--calibration-count)")  # fmt: skip
    print(f"wrote {q.path} (int8 {q.quant_format}, per-channel weights, calibrated on "
          f"{q.calibration_images} image{'s' if q.calibration_images != 1 else ''}); "
          f"{agreement}")  # fmt: skip
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=None, help="input size (default: 299; quick: 64)")
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="inference batch sizes (default: 1 8; quick: 1 2)",
    )
    p.add_argument(
        "--train-batch",
        type=int,
        default=None,
        help="training batch size, 0 for none (default: 8; quick: 2)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved rounds after warm-up (default: 5; quick: 2)",
    )
    p.add_argument("--only", nargs="+", metavar="TEXT", type=_name_part,
                   help="only candidates whose name contains one of these texts (each text "
                        "must match one)")  # fmt: skip
    p.add_argument("--device", default="cpu",
                   help="auto (CUDA when present), cpu, cuda or cuda:N (default: cpu)")  # fmt: skip
    p.add_argument(
        "--threads", type=int, help="torch, ONNX Runtime and OpenVINO threads (default: torch's)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny model at a tiny size, few repeats: a smoke test in seconds",
    )
    p.add_argument("--json", metavar="FILE", type=_path, default="bench.json",
                   help="where to write the results (default: %(default)s)")  # fmt: skip
    p.add_argument("--markdown", metavar="FILE", type=_path,
                   help="also write the table as Markdown (as benchmarks/BENCHMARKS.md quotes "
                        "it)")  # fmt: skip


def _fmt_bench(report) -> str:
    header = [*report.HEADER, ""]
    m = report.machine
    head = (f"{m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} threads), torch "
            f"{m['torch']}, onnxruntime {m['onnxruntime']}, timm {m['timm']}, openvino "
            f"{m['openvino']}, keras {m['keras']}; "
            f"{report.settings['size']}x{report.settings['size']}, medians of "
            f"{report.settings['repeats']} interleaved rounds; "
            f"{report.settings['matmul_dtype']} matmul "
            f"{report.matmul_gflop_per_s:.0f} GFLOP/s; allocator: {m['allocator']}")  # fmt: skip
    text = head + "\n" + _fmt_table(report.rows(), header)
    comparisons = report.comparison_rows()
    if comparisons:
        text += ("\n\nhow many times faster (medians' images/s; per round: the peer's step time "
                 "over ours in each interleaved round, median and range)\n")  # fmt: skip
        text += _fmt_table(comparisons, list(report.COMPARISON_HEADER))
    return text


@command("bench", "throughput of every inference and training path, side by side with peers",
         _bench_args)  # fmt: skip
def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import run_bench, save_json
    from .checkpoint import atomic_write, check_output_file

    for out, suffix in ((args.json, ".json"), (args.markdown, ".md")):  # before the minutes
        if out is not None:  # of benchmarking, not after (argparse refuses "")
            check_output_file(out, example_suffix=suffix)
    if args.markdown and os.path.realpath(args.markdown) == os.path.realpath(args.json):
        # The Markdown table was written over the JSON, which was lost.
        raise UserError(f"--json and --markdown both name {args.markdown}: give each its own "
                        "file, e.g. bench.json and bench.md")  # fmt: skip
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: use a positive number of threads")
    if args.train_batch is not None and args.train_batch < 0:
        raise UserError(f"--train-batch {args.train_batch}: use a batch size, or 0 for no training")
    if args.size is not None and args.size < 1:
        raise UserError(f"--size {args.size}: give the input size in pixels")
    if args.batch is not None and min(args.batch) < 1:  # it was refused as batches=(0,), the
        # Python API's words, with train_batch=None for the --train-batch 0 it takes here
        raise UserError(f"--batch {' '.join(map(str, args.batch))}: inference batch sizes are "
                        "at least 1 (--train-batch 0 skips training)")  # fmt: skip
    if args.repeats is not None and args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: time at least 1 round")
    from .evaluate import resolve_device

    resolve_device(args.device)  # before the threads: a refused run changes nothing
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    train_batch = args.train_batch if args.train_batch is not None else (2 if quick else 8)
    report = run_bench(
        size=args.size or (64 if quick else 299),
        batches=tuple(args.batch or ((1, 2) if quick else (1, 8))),
        train_batch=train_batch or None,
        repeats=args.repeats if args.repeats is not None else (2 if quick else 5),
        quick=quick, only=args.only, device=args.device,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )  # fmt: skip
    # The files first: a closed or full stdout must not lose the minutes of measurements (as
    # eval's --json).
    written = [save_json(report, args.json)]
    if args.markdown:
        comparisons = report.comparisons_markdown()
        atomic_write(args.markdown, report.to_markdown() + (comparisons and "\n" + comparisons))
        written.append(args.markdown)
    print(_fmt_bench(report))
    for path in written:
        print(f"wrote {path}")
    failed = sorted({r.name for r in report.results if r.error})
    if failed:  # the table has their error rows; a script's `set -e` must see it too
        print(f"{len(failed)} candidate(s) failed: {', '.join(failed)} (see their error rows)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# train / eval / demo (training)
# ---------------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe",
        type=_path,
        help="recipe name (imagenet, jft, fashion-mnist) or a YAML file (default: fashion-mnist; "
        "with --resume: the checkpoint's own settings)",
    )
    p.add_argument("--config", type=_path, help="YAML file of overrides applied on top of the "
                   "recipe (a `recipe:` key in it names that recipe)")  # fmt: skip
    p.add_argument(
        "--data",
        type=_path,
        help="dataset: a folder (train/ val/ class folders, IDX files, "
        "train.csv/val.csv) or a .csv list; default: the recipe's",
    )
    p.add_argument("--out", type=_folder, help="run folder (default: runs/RECIPE-TIMESTAMP)")
    p.add_argument("--model", help="model preset, e.g. xception-compact")
    p.add_argument(
        "--weights", type=_path, help="fine-tune from these weights (a fresh head if classes "
        "differ)"
    )  # fmt: skip
    p.add_argument(
        "--resume", type=_path, help="continue a run: a checkpoint folder, or 'auto' (newest in "
        "--out)"
    )  # fmt: skip
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (all ranks)")
    p.add_argument("--lr", type=float)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (on one GPU: replayed as CUDA graphs)")  # fmt: skip
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--seed", type=int)
    p.add_argument("--train-subset", type=int, help="train on this many images only")
    p.add_argument("--val-subset", type=int, help="validate on this many images only")
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also log to OUT/tensorboard (needs the tensorboard package)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, e.g. --set ema_decay=0.999 or "
                   "--set model_args.middle_blocks=2")  # fmt: skip


def _train_config(args: argparse.Namespace):
    """(the config, the keys the user set): a resume keeps the run's own settings for the rest."""
    import os
    import re
    import time

    from .train import _read_yaml, given_keys, make_config

    overrides: dict = {}
    recipe_arg = args.recipe
    if args.config:
        if not os.path.isfile(args.config):
            raise UserError(f"--config {args.config}: no such file (a YAML file of config keys)")
        with open(args.config) as f:
            overrides.update(_read_yaml(f.read(), args.config))
        # A `recipe:` key in it names the base its keys override (a run's config.yaml names its
        # own): it only labelled the run, which trained on the default recipe's other settings.
        base = overrides.pop("recipe", None)
        if base is not None:
            if str(base).endswith((".yaml", ".yml")):  # beside the file, as in a recipe file
                base = os.path.join(os.path.dirname(args.config), str(base))
            if recipe_arg is None:
                recipe_arg = str(base)
            elif make_config(recipe_arg).recipe != make_config(base).recipe:
                raise UserError(f"--config {args.config} starts from recipe {base}, and --recipe "
                                f"is {recipe_arg}: drop one of them")  # fmt: skip
    model_args = dict(overrides.pop("model_args", None) or {})
    for key, value in _parse_overrides(args.set).items():
        if key.startswith("model_args."):
            model_args[key.split(".", 1)[1]] = value
        else:
            overrides[key] = value
    flags = dict(data=args.data, out=args.out, model=args.model, weights=args.weights,
                 resume=args.resume, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 amp=args.amp, compile=args.compile, device=args.device, threads=args.threads,
                 seed=args.seed, train_subset=args.train_subset, val_subset=args.val_subset,
                 checkpoint_every=args.checkpoint_every, tensorboard=args.tensorboard)  # fmt: skip
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if args.no_progress:
        overrides["progress"] = False
    # `--resume auto` where no checkpoint is yet starts a new run, as plain `train` does: with
    # the default recipe, and everything given applied (job scripts pass it on every launch).
    # The run folder and resume may come from --config or --set as well as from the flags.
    resume, out = overrides.get("resume"), overrides.get("out")
    resuming = bool(resume)
    if resume == "auto" and out:
        from .checkpoint import find_latest

        resuming = find_latest(os.path.join(str(out), "checkpoints")) is not None
    if resuming:
        from .train import RESUMABLE, load_recipe

        # Settings given that differ from the run's are named by the engine, with their values.
        if recipe_arg:  # a recipe's own settings are not applied either
            applied = sorted(k for k in load_recipe(recipe_arg) if k in RESUMABLE and k != "data")
            log.warning("--resume continues the run as it was configured: recipe %s%s given "
                        "here not applied (start a new run to change them)", recipe_arg,
                        f" (only its {', '.join(applied)} applied)" if applied else "")  # fmt: skip
    recipe = recipe_arg or (None if resuming else "fashion-mnist")
    # make_config drops None overrides (unset arguments); a null from --set or --config is a
    # value the user gave (ema_decay=null turns EMA off), applied after it.
    nulls = {k: None for k, v in overrides.items() if v is None}
    given = given_keys(recipe, overrides) | set(nulls)
    if resuming and "data" not in overrides:  # a recipe's data is a default: the run's stays
        given.discard("data")
    cfg = make_config(recipe, **overrides)
    if nulls:
        cfg = cfg.replace(**nulls)
    if model_args:
        cfg = cfg.replace(model_args={**cfg.model_args, **model_args})
        given.add("model_args")
    if cfg.out is None and cfg.resume is None:
        if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ:
            raise UserError("under torchrun pass --out DIR, so that all ranks and restarts "
                            "use the same run folder")  # fmt: skip
        label = re.sub(r"[^\w.-]+", "-", cfg.recipe).strip(".-") or "custom"  # one folder
        cfg = cfg.replace(out=f"runs/{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    _refuse_replacing_results(cfg)
    return cfg, given


def _refuse_replacing_results(cfg) -> None:
    """`fit`'s own refusal of a folder holding a finished run's results but no checkpoint,
    made before anything is loaded or printed. A checkpoint of this very folder continues it."""
    from .checkpoint import find_latest
    from .train import refuse_replacing_results

    if cfg.out is None or find_latest(os.path.join(cfg.out, "checkpoints")) is not None:
        return
    if cfg.resume not in (None, "auto"):  # a fork; a checkpoint of this very folder continues it
        own = os.path.realpath(os.path.join(cfg.resume, os.pardir, os.pardir))
        if os.path.isdir(cfg.resume) and own == os.path.realpath(cfg.out):
            return
    refuse_replacing_results(cfg.out)


def _fit(cfg, given: set[str] | None = None, command: str = "train") -> tuple[int, dict | None]:
    """Run the training engine; (exit status, result). Prints the one-line outcome."""
    from .train import Interrupted, TrainingError, fit

    try:
        result = fit(cfg, given=given)
    except Interrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:  # rank 0 saved the checkpoint: it says where
            print(f"xception {command}: {stop}", file=sys.stderr)
        return stop.exit_code, None
    except TrainingError as err:
        print(f"xception {command}: error: {err}", file=sys.stderr)
        return 1, None
    return 0, result


def _print_result(result: dict) -> None:
    final, best = result["final"], result["best"]
    if final is None:
        return
    key = "val_map100" if "val_map100" in final else "val_top1"
    print(f"run folder: {result['out']} ({result['params']:,} parameters)")
    print(f"final {key}: {final[key]:.2f}% (best {best[key]:.2f}% at epoch {best['epoch']}); "
          f"{final['images_per_s']:.0f} images/s, {result['wall_s'] / 60:.1f} min")  # fmt: skip


@command("train", "train a model with a recipe (single process, or DDP under torchrun)",
         _train_args)  # fmt: skip
def _run_train(args: argparse.Namespace) -> int:
    import os

    status, result = _fit(*_train_config(args))
    if result is not None and int(os.environ.get("RANK", "0")) == 0:
        _print_result(result)
    return status


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        type=_path,
        help="run folder, checkpoint folder, weights file (.safetensors/.pth/.h5) or weights "
        "name (imagenet)",
    )
    p.add_argument(
        "--data",
        required=True,
        type=_path,
        help="dataset to evaluate on ('fashion-mnist', a "
        "folder or a .csv list); folders use val/ when present, IDX the test split, and a "
        "run's own data without a validation part the part it held out",
    )
    p.add_argument("--model", help="preset for a plain weights file (default: xception)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config field a plain weights file was trained with where the "
                        "preset's differs, e.g. --set middle_blocks=4 (run and checkpoint "
                        "folders store theirs)")  # fmt: skip
    p.add_argument("--size", type=int, dest="image_size", metavar="SIZE",
                   help="input size (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128,
                   help="images per forward pass (default: %(default)s)")  # fmt: skip
    p.add_argument("--limit", type=int, help="evaluate on N images only (a seeded sample, the "
                   "same every time)")  # fmt: skip
    p.add_argument("--raw", action="store_true", help="use the raw weights, not the EMA ones")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, "
                   "cuda:N (default: %(default)s)")  # fmt: skip
    p.add_argument("--workers", type=int, default=0,
                   help="processes decoding images beside the model (default: %(default)s, "
                        "decode in this process; ImageNet-size folders want several)")  # fmt: skip
    p.add_argument("--json", dest="json_out", type=_path,
                   help="also write the result to this file")  # fmt: skip


@command("eval", "top-1/top-5 (or MAP@100 for multi-label data) of a checkpoint, as JSON",
         _eval_args)  # fmt: skip
def _run_eval(args: argparse.Namespace) -> int:
    import json

    from . import runtime
    from .checkpoint import atomic_write, check_output_file
    from .evaluate import evaluate_file

    overrides = _model_set(args.set, "eval")
    if args.json_out:
        check_output_file(args.json_out, reads=[*_files_read(args.checkpoint),
                                                *_data_read(args.data, args.json_out)])  # fmt: skip
    # This process is ours: reuse freed memory, as training does (no page faults per batch).
    runtime.keep_freed_memory()
    result = evaluate_file(args.checkpoint, args.data, model=args.model, batch_size=args.batch_size,
                           device=args.device, image_size=args.image_size, limit=args.limit,
                           use_ema=not args.raw, workers=args.workers,
                           model_args=overrides)  # fmt: skip
    text = json.dumps(result, indent=2)
    if args.json_out:  # first: a closed or full stdout must not lose the file
        atomic_write(args.json_out, text + "\n")
    print(text)
    return 0


DEMO_EPOCHS = 3


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist", type=_path,
                   help="folder of the Fashion-MNIST IDX files (default: the Debian package's, "
                        "/usr/share/datasets/fashion-mnist)")  # fmt: skip
    p.add_argument("--out", type=_folder, help="run folder (default: runs/demo-TIMESTAMP)")
    p.add_argument(
        "--epochs",
        type=int,
        default=DEMO_EPOCHS,
        help=f"training epochs (default {DEMO_EPOCHS}; the full recipe trains longer)",
    )
    p.add_argument("--train-subset", type=int, help="train on this many images only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


@command("demo", "the main job: train a compact Xception on Fashion-MNIST, then test it",
         _demo_args)  # fmt: skip
def _run_demo(args: argparse.Namespace) -> int:
    import time

    from .checkpoint import find_latest
    from .data import resolve_data
    from .evaluate import evaluate_file
    from .train import make_config
    from .zoo import create_model

    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if find_latest(os.path.join(out, "checkpoints")) is not None:  # demo has no --resume
        raise UserError(f"{out} already holds a run: continue it with xception train --out {out} "
                        "--resume auto, or choose another --out")  # fmt: skip
    resolve_data(args.data)  # a missing dataset is one line, before anything is printed
    # So are bad flags (--epochs 0): they used to be refused after the header below.
    cfg = make_config("fashion-mnist", data=args.data, out=out, epochs=args.epochs,
                      train_subset=args.train_subset, threads=args.threads)  # fmt: skip
    _refuse_replacing_results(cfg)  # as train does: a finished run's results stay
    paper = create_model("xception")
    n = sum(p.numel() for p in paper.parameters() if p.requires_grad)
    print(f"Xception (Chollet, CVPR 2017), the paper's model: {n:,} trainable parameters")
    del paper
    full = make_config("fashion-mnist").epochs
    print(f"training {cfg.model} on Fashion-MNIST for {cfg.epochs} epoch"
          f"{'s' if cfg.epochs != 1 else ''} (recipe "
          f"fashion-mnist; the full recipe trains {full}) -> {out}", flush=True)  # fmt: skip
    start = time.perf_counter()
    status, result = _fit(cfg, command="demo")
    if result is None:
        return status
    _print_result(result)
    test = evaluate_file(out, args.data)
    print(f"Fashion-MNIST test top-1: {test['top1']:.2f}% (top-5 {test['top5']:.2f}%) on "
          f"{test['images']:,} test images; {(time.perf_counter() - start) / 60:.1f} min "
          "training and testing")  # fmt: skip
    weights, me = os.path.join(out, "model.safetensors"), _invocation()
    print(f"next: {me} predict IMAGE... --weights {weights}   (classify images)\n"
          f"      {me} export model.onnx --weights {weights}   (ONNX, checked)\n"
          f"      {me} train --recipe fashion-mnist   (the full {full} epochs)")  # fmt: skip
    return 0


def _invocation() -> str:
    """How to run this command again from this shell: `xception` where that is the one on the
    PATH, else the script's own path, as `make demo` ran it from a venv no shell has
    activated (a bare `xception` was 'command not found' there)."""
    import shutil

    me = sys.argv[0]
    if os.path.basename(me) != "xception":  # python -m, or a test runner
        return "xception"
    found = shutil.which("xception")
    if found and os.path.realpath(found) == os.path.realpath(me):
        return "xception"
    return me


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def _out_of_memory(err: BaseException) -> str | None:
    """What ran out, when `err` is a failed allocation (CPU or GPU); None otherwise."""
    import torch

    text = str(err).strip()
    markers = ("can't allocate memory", "out of memory")
    if not isinstance(err, torch.OutOfMemoryError) and not any(m in text for m in markers):
        return None
    line = text.splitlines()[0] if text else type(err).__name__
    line = re.sub(r"^\[enforce fail at [^\]]*\][^.]*\.\s*", "", line)  # torch's C++ location
    return ". ".join(line.split(". ")[:2]).rstrip(".")  # CUDA's advice on the allocator follows


def _another_rank_failed(err: BaseException) -> bool:
    """Under torchrun, an error of torch.distributed (gloo or NCCL): a peer rank went away,
    and its own error, printed above, is the one that says why."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    markers = ("gloo", "nccl", "connection closed by peer", "connection reset by peer")
    return isinstance(err, RuntimeError) and any(m in text for m in markers)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="xception",
        description="Xception (Chollet, CVPR 2017): models, weights, training, speed, experiments",
    )
    parser.add_argument("--version", action="version", version=f"xception {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # After the command too (`xception models -v` was "unrecognized arguments"); not
        # given there, the value before the command stands.
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging (also before the command)")  # fmt: skip
        add_arguments(p)
        p.set_defaults(run=run, options=_option_names(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code and "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun worker stopping on an error leaves at once, its message written: in the
        # interpreter's teardown after a refused start, gloo's threads aborted it now and then
        # (SIGABRT, "terminate called without an active exception"), and torchrun reported
        # that abort as the run's root cause instead of this rank's exit status.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


class Terminated(BaseException):
    """SIGTERM (`kill`, `timeout`, a scheduler, `docker stop`), raised as Ctrl-C raises
    KeyboardInterrupt: the default action killed the process where it stood, and temporary
    files (an export's, a JSON result's) stayed beside their outputs."""


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated for the command's life, where its handler is the default
    one (the main thread only, not under torchrun; training installs its own, to checkpoint
    first)."""
    # Not under torchrun: its agent stops the other workers with SIGTERM when one fails, and a
    # worker blocked in a collective call would wait out the agent's grace period.
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            or "TORCHELASTIC_RUN_ID" in os.environ):  # fmt: skip
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# The optional packages and the extra (pyproject.toml) that installs each.
_EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
           "tensorboard": "tensorboard", "timm": "bench", "keras": "bench", "openvino": "bench"}  # fmt: skip


def _main(argv: list[str] | None) -> int:
    if sys.stderr is None:  # `2>&-`: progress and diagnostics go nowhere, as asked
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    # torch and friends load here, for a few seconds, once the arguments parse (`import
    # xception` leaves them for later): Ctrl-C is no traceback either.
    try:
        args = build_parser().parse_args(argv)
        from .data import ImageError
        from .weights import WeightsError
    except KeyboardInterrupt:
        print("xception: interrupted", file=sys.stderr)
        return 130
    if sys.stdout is None:  # `>&-`: results printed to nowhere were a silent success
        print(f"xception {args.command}: error: stdout is closed: give the command somewhere "
              "to print, e.g. '> /dev/null' to discard what it prints", file=sys.stderr)  # fmt: skip
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with _warnings_as_typed(args), _sigterm_raises():
            return int(args.run(args) or 0)
    except Terminated:
        print(f"xception {args.command}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        try:  # and nothing to flush into the closed pipe at exit (Python's own advice)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except (UserError, ValueError, WeightsError, ImageError, OSError) as err:
        # OSError: files that cannot be read or written (permissions, a full disk, ...).
        text = str(err) if isinstance(err, (UserError, OSError)) else _as_typed(str(err), args)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            text += "" if err.filename else " while writing the output"
            text += ": free space, or choose another place"
        print(f"xception {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xception {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:  # an optional feature's package, not installed
        package = (err.name or "").split(".")[0]
        if package not in _EXTRAS:
            raise
        print(f"xception {args.command}: error: this needs {package}, which is not installed: "
              f"pip install 'xception[{_EXTRAS[package]}]' (from a checkout: pip install "
              f"'.[{_EXTRAS[package]}]')", file=sys.stderr)  # fmt: skip
        return 2
    except RuntimeError as err:
        memory = _out_of_memory(err)
        if memory is not None:
            print(f"xception {args.command}: error: out of memory ({memory}): lower the batch "
                  "size or the image size", file=sys.stderr)  # fmt: skip
            return 1
        if _another_rank_failed(err):
            # Most often a peer stopped, and its error above says why; the call's own words
            # too, for when this rank lost the others itself (gloo's "Connection refused").
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            print(f"xception {args.command}: a distributed call failed on rank "
                  f"{os.environ.get('RANK', '?')} ({first}): if another rank stopped, its "
                  "error above says why", file=sys.stderr)  # fmt: skip
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
