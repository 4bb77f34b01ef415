"""README and docs/ against the code: every command line they show parses, every flag they name
exists, and every Python name and call they show resolves and binds to the real signature. A
renamed flag, function or keyword breaks a test here instead of a user's first try."""

import argparse
import ast
import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest

from xception.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# Where a bare name in the docs (`optimize(...)`, `export(...)`) is looked up, in this order.
MODULES = ["xception", "xception.deploy", "xception.predict", "xception.train", "xception.data",
           "xception.weights", "xception.runtime", "xception.bench", "xception.experiments",
           "xception.evaluate", "xception.metrics", "xception.checkpoint", "xception.model"]  # fmt: skip


def _blocks(lang: str | None = None) -> list[tuple[str, str]]:
    """(file name, text) of each fenced block, of one language when given."""
    return [(doc.name, m[2]) for doc in DOCS for m in FENCE.finditer(doc.read_text())
            if lang is None or m[1] == lang]  # fmt: skip


def _prose(doc: Path) -> str:
    return FENCE.sub("", doc.read_text())


def _command_lines(text: str) -> list[str]:
    """`xception ...` and `torchrun ... -m xception.cli ...` lines, continuations joined and
    comments cut."""
    text = text.replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\s#\s.*$", "", line)
        line = re.split(r"\s[>|]\s", line)[0].strip()  # `> labels.json`, `| head`
        if line.startswith("xception "):
            lines.append(line)
        elif "-m xception.cli " in line:
            lines.append("xception " + line.split("-m xception.cli ", 1)[1])
    return lines


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_line_shown_in_a_shell_block_parses():
    parser = build_parser()
    lines = [(name, line) for name, text in _blocks("bash") for line in _command_lines(text)]
    assert len(lines) >= 15, lines  # the quick start, predict, training, export, ...
    for name, line in lines:
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{line}` does not parse (see the argparse message above)")


def test_every_flag_the_docs_name_for_a_command_exists():
    """Synopses (`xception bench [--quick] ...`), shell blocks and inline spans: each --flag
    after `xception CMD` is one of CMD's options."""
    commands = _subparsers()
    texts = [text for _, text in _blocks()]
    texts += [span for doc in DOCS for span in SPAN.findall(_prose(doc))]
    checked = 0
    for text in texts:
        # A synopsis continues on indented lines without `xception` (README's command table).
        text = re.sub(r"\n\s+(?=\[|--)", " ", text)
        for line in _command_lines(text):
            words = line.split()
            if len(words) < 2 or words[1] not in commands:
                assert words[1].startswith(("-", "[", "COMMAND")), f"unknown command: {line}"
                continue
            options = commands[words[1]]._option_string_actions
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
                assert flag in options, f"`{line}`: xception {words[1]} has no {flag}"
                checked += 1
    assert checked >= 60, checked


def test_every_flag_anywhere_in_the_docs_is_an_option_of_some_command():
    """A flag in prose (`--calibration-count`) has no command beside it: it must at least be
    one of the CLI's options. torchrun's own are the exceptions."""
    options = {o for p in _subparsers().values() for o in p._option_string_actions}
    options |= {"--nproc_per_node", "--max-restarts"}  # torchrun's
    for doc in DOCS:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", doc.read_text()):
            assert flag in options, f"{doc.name}: no command has {flag}"


def test_every_set_key_in_the_docs_is_a_config_field():
    """`--set keep_freed_memory=false`, `--set padding=symmetric`: a training or model field."""
    import dataclasses

    from xception import XceptionConfig
    from xception.train import TrainConfig

    fields = {f.name for c in (TrainConfig, XceptionConfig) for f in dataclasses.fields(c)}
    text = " ".join(doc.read_text() for doc in DOCS)
    keys = [k for k in re.findall(r"--set ([a-z_]+)[.=]", text) if k != "key"]  # key=value
    assert len(keys) >= 5
    for key in keys:
        assert key in fields, f"--set {key}: no such training or model setting"


def test_the_flags_listed_in_prose_for_train_and_eval_exist():
    """README lists more options by name ("train, for one, also takes `--config`, ...")."""
    text = " ".join(_prose(ROOT / "README.md").split())
    commands = _subparsers()
    for command, pattern in (("train", r"train, for one, also takes (.*?);"),
                             ("eval", r"eval takes (.*?)\)")):  # fmt: skip
        found = re.search(pattern, text)
        assert found, pattern
        flags = re.findall(r"--[a-z][a-z0-9-]*", found[1])
        assert len(flags) >= 3
        for flag in flags:
            assert flag in commands[command]._option_string_actions, f"{command} {flag}"


def _resolve(dotted: str):
    """The object a dotted name in the docs means, or None when it is not the package's."""
    parts = dotted.split(".")
    if parts[0] == "xception":
        obj, rest = importlib.import_module("xception"), parts[1:]
    else:
        owners = [m for m in MODULES if hasattr(importlib.import_module(m), parts[0])]
        if not owners:
            return None
        obj, rest = getattr(importlib.import_module(owners[0]), parts[0]), parts[1:]
    for i, part in enumerate(rest):
        if not hasattr(obj, part):
            where = ".".join(parts[: i + 1 + (parts[0] != "xception")])
            raise AssertionError(f"`{dotted}`: {where} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return base and f"{base}.{node.attr}"
    return None


# Names the docs use for things that are not the package's (the user's objects, torch, ...).
NOT_OURS = {"model", "fast", "torch", "np", "preprocess", "features", "tuned", "images", "x",
            "program", "self", "keras", "timm", "F", "nn", "logits", "m"}  # fmt: skip


def _check_calls(source: str, where: str) -> int:
    """Each call `f(...)` on a name of the package binds to f's signature; each attribute
    chain rooted at the package resolves. Returns how many calls were bound."""
    bound = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute | ast.Name) and isinstance(node.ctx, ast.Load):
            dotted = _dotted(node)
            if dotted and dotted.split(".")[0] in ("xception", "deploy", "runtime"):
                _resolve(dotted)
        if not isinstance(node, ast.Call):
            continue
        dotted = _dotted(node.func)
        if not dotted or dotted.split(".")[0] in NOT_OURS:
            continue
        target = _resolve(dotted)
        if target is None or not callable(target) or isinstance(target, type(ast)):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin without one
            continue
        args = [object()] * len(node.args)
        if inspect.isfunction(target) and "." in dotted:
            owner = _resolve(dotted.rsplit(".", 1)[0])
            if isinstance(owner, type):  # `BenchReport.comparisons()`: a method, self first
                args.insert(0, object())
        kwargs = {k.arg: object() for k in node.keywords if k.arg is not None}
        # Keywords alone (`optimize(dtype=torch.bfloat16)`) are prose's shorthand: those must
        # exist; a call with positional arguments must be complete.
        bind = signature.bind if node.args else signature.bind_partial
        try:
            bind(*args, **kwargs)
        except TypeError as err:
            raise AssertionError(f"{where}: `{ast.unparse(node)}` does not fit {dotted}"
                                 f"{signature}: {err}") from None  # fmt: skip
        bound += 1
    return bound


def test_python_blocks_name_real_functions_with_real_arguments():
    blocks = _blocks("python")
    assert len(blocks) >= 3
    bound = sum(_check_calls(text, name) for name, text in blocks)
    assert bound >= 8, bound


def test_python_calls_in_prose_fit_their_signatures():
    """Inline spans such as `export(model, path, format, input_size=299)`."""
    bound = 0
    for doc in DOCS:
        for span in SPAN.findall(_prose(doc)):
            if "(" not in span or span.startswith(("xception ", "-", "torchrun")):
                continue
            try:
                tree = ast.parse(span, mode="eval")
            except SyntaxError:
                continue
            if isinstance(tree.body, ast.Call) and (tree.body.args or tree.body.keywords):
                bound += _check_calls(span, doc.name)
            elif isinstance(tree.body, ast.Call):  # `optimize()`: prose naming the function
                _resolve(_dotted(tree.body.func) or "")
    assert bound >= 15, bound


def test_the_checker_catches_a_wrong_keyword_and_a_missing_name():
    """The checks above can fail."""
    with pytest.raises(AssertionError, match="does not fit"):
        _check_calls("deploy.export(model, 'm.onnx', input_sise=299)", "here")
    with pytest.raises(AssertionError, match="has no attribute 'optimise'"):
        _check_calls("xception.deploy.optimise(model)", "here")
    assert _check_calls("deploy.export(model, 'm.onnx', input_size=299)", "here") == 1
    commands = _subparsers()
    assert "--topk" in commands["predict"]._option_string_actions
    assert "--top-k" not in commands["predict"]._option_string_actions
