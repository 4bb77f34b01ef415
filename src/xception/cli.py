"""The `xception` command line: argument parsing, human output, and one-line errors.

Each subcommand is a pair registered with `@command`: a function that adds its arguments and a
function that runs it and returns the exit status. Errors a user can cause surface as one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib import resources

__all__ = ["main"]

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


def _parse_overrides(pairs: list[str]) -> dict:
    """`--set key=value` pairs, values parsed as YAML scalars/lists (e.g. fc_layers=[64,64])."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected key=value, e.g. --set residual=false")
        out[key.strip()] = yaml.safe_load(value)
    return out


# ---------------------------------------------------------------------------------------------
# models / info / demo (foundation)
# ---------------------------------------------------------------------------------------------
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("filter", nargs="?", help="only names containing this text")


@command("models", "list the model presets", _models_args)
def _run_models(args: argparse.Namespace) -> int:
    from .zoo import PRESETS, list_models

    rows = [[name, PRESETS[name][0]] for name in list_models(args.filter)]
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
    p.add_argument("model", nargs="?", default="xception")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--size", type=int, default=299, help="input height and width")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set segments=4")  # fmt: skip


@command("info", "show a model's blocks, parameter count and compute", _info_args)
def _run_info(args: argparse.Namespace) -> int:
    from .zoo import create_model

    if args.model == "inception-v3":
        raise UserError("info describes Xception presets; inception-v3 is torchvision's model")
    overrides = _parse_overrides(args.set)
    model = create_model(args.model, num_classes=args.num_classes, **overrides)
    print(f"{args.model}: {model.config}")
    _print_summary(model, args.size)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="weights file (Keras .h5, .safetensors, .pth)")
    p.add_argument("--image", help="image to classify (default: the bundled sample photo)")


@command("demo", "the main job: build the paper's model and classify a sample photo", _demo_args)
def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from .data import keras_transform, load_image
    from .zoo import create_model

    model = create_model("xception", weights=args.weights).eval()
    print("Xception (Chollet, CVPR 2017), as in keras.applications.Xception")
    _print_summary(model, 299)
    path = args.image or resources.files("xception") / "assets" / "chelsea.jpg"
    with torch.no_grad():
        x = keras_transform(299)(load_image(path)).unsqueeze(0)
        probs = model(x).softmax(-1)[0]
    from torchvision.models._meta import _IMAGENET_CATEGORIES as categories

    print(f"\n{path}: top-5 ({'random weights' if args.weights is None else args.weights})")
    top = probs.topk(5)
    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        print(f"  {p:7.2%}  {categories[i]}")
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
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
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from .data import ImageError
    from .weights import WeightsError

    try:
        return int(args.run(args) or 0)
    except (UserError, ValueError, WeightsError, ImageError, FileNotFoundError) as err:
        print(f"xception {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xception {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
