"""Packaging, as a user who installs the wheel (`pip install xception`) instead of working in the
checkout: the wheel is built once from a copy of the sources, installed with `pip --target`, and
run with PYTHONPATH pointing at that copy from a folder outside the checkout (each test checks
that the imported xception is the installed one, not the .venv's editable checkout)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "xception"
NETWORK = re.compile(r"connection|network|resolve|temporary failure|no matching distribution|"
                     r"could not find a version|proxy|timed out", re.I)  # fmt: skip
ONNX_EXTRA = ("onnx", "onnxscript", "onnxruntime")


class Installed:
    def __init__(self, wheel: Path, site: Path, cwd: Path):
        self.wheel, self.site, self.cwd = wheel, site, cwd
        self.script = site / "bin" / "xception"

    def env(self, *before: Path, path: Path | None = None) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(map(str, (*before, path or self.site)))
        env.pop("PYTHONSTARTUP", None)
        env["OMP_NUM_THREADS"] = "1"
        return env

    def python(self, code: str, *before: Path, path: Path | None = None, timeout=180):
        return subprocess.run([sys.executable, "-c", code], cwd=self.cwd, capture_output=True,
                              text=True, env=self.env(*before, path=path), timeout=timeout)  # fmt: skip

    def cli(self, *args: str, before: tuple[Path, ...] = (), timeout=240):
        return subprocess.run([str(self.script), *args], cwd=self.cwd, capture_output=True,
                              text=True, env=self.env(*before), timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """The wheel built from a copy of the checkout's sources (so that the build writes nothing
    into the checkout), installed into a folder of its own."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src_copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pyc"))  # fmt: skip
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", str(src), "-w", str(base / "dist")],
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    if build.returncode != 0:
        if NETWORK.search(build.stdout + build.stderr):
            pytest.skip("building the wheel needs the network here: " + build.stderr[-300:])
        pytest.fail("pip wheel failed:\n" + build.stdout[-2000:] + build.stderr[-2000:])
    (wheel,) = (base / "dist").glob("xception-*.whl")
    site = base / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert inst.returncode == 0, inst.stdout + inst.stderr
    cwd = base / "elsewhere"
    cwd.mkdir()
    return Installed(wheel, site, cwd)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` but Python's own bytecode caches: (size, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip


def _stub_modules(folder: Path, names) -> Path:
    """A folder that, first on PYTHONPATH, makes `names` look uninstalled."""
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n"
        )
    return folder


TINY = ("--model", "xception-compact", "--size", "32", "--set", "width=0.25", "--set",
        "middle_blocks=1")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# what the wheel holds, and that the installed copy is the one that runs
# ---------------------------------------------------------------------------------------------
def test_wheel_holds_every_file_the_package_reads_at_run_time(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    shipped = {p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}  # fmt: skip
    assert shipped - names == set(), "files of src/xception left out of the wheel"
    assert {"xception/imagenet_wnids.txt", "xception/recipes/fashion-mnist.yaml",
            "xception/recipes/imagenet.yaml", "xception/recipes/jft.yaml"} <= names  # fmt: skip
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]
    entry = (
        zipfile.ZipFile(installed.wheel)
        .read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    assert re.search(r"^xception\s*=\s*xception\.cli:main$", entry, re.M), entry


def test_console_script_runs_the_installed_copy_outside_the_checkout(installed):
    run = installed.python(
        "import xception, xception.cli, xception.train as t; "
        "print(xception.__file__); print(t.__file__); print(xception.__version__)"
    )
    assert run.returncode == 0, run.stderr
    first, second, version = run.stdout.split()
    assert first.startswith(str(installed.site)) and second.startswith(str(installed.site))
    assert version == md.version("xception") == "0.1.0"
    out = installed.cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == "xception 0.1.0", out.stderr
    models = installed.cli("models")
    assert models.returncode == 0, models.stderr
    assert "xception-compact" in models.stdout and "inception-v3" in models.stdout
    helped = installed.cli("train", "--help")
    assert helped.returncode == 0 and "--recipe" in helped.stdout, helped.stderr


def test_builtin_recipes_and_wnids_come_from_the_installed_copy(installed):
    code = (
        "import xception.train as t, xception.data as d\n"
        "print(t.__file__)\n"
        "print(','.join(t.list_recipes()))\n"
        "print(t.make_config('imagenet').lr, t.make_config('jft').loss, "
        "t.make_config('fashion-mnist').model)\n"
        "w = d.imagenet_wnids(); print(len(w), w[0])\n"
    )
    run = installed.python(code)
    assert run.returncode == 0, run.stderr
    where, recipes, config, wnids = run.stdout.strip().splitlines()
    assert where.startswith(str(installed.site))
    assert recipes == "fashion-mnist,imagenet,jft"
    assert config.split() == ["0.045", "sigmoid", "xception-compact"]
    assert wnids == "1000 n01440764"
    bad = installed.cli("train", "--recipe", "fashion-mnst", "--out", str(installed.cwd / "r"))
    assert bad.returncode == 2 and "did you mean fashion-mnist?" in bad.stderr
    assert not (installed.cwd / "r").exists()


def test_train_and_eval_from_the_wheel_write_nothing_into_the_installed_package(installed):
    from test_data import make_idx_dataset

    data = make_idx_dataset(installed.cwd.parent / "idx", n_train=48, n_test=16, size=16)
    before = _snapshot(installed.site)
    out = installed.cwd.parent / "run"
    run = installed.cli("train", "--recipe", "fashion-mnist", "--data", str(data), "--out",
                        str(out), "--epochs", "1", "--batch-size", "16", "--threads", "1",
                        "--no-progress", "--set", "image_size=16", "--set",
                        "model_args.width=0.25", "--set", "model_args.middle_blocks=1")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "curves.png").is_file()
    scored = installed.cli("eval", "--checkpoint", str(out), "--data", str(data))
    assert scored.returncode == 0 and '"top1"' in scored.stdout, scored.stderr[-2000:]
    assert _snapshot(installed.site) == before
    assert list(installed.cwd.iterdir()) == []  # nothing left in the working folder either


# ---------------------------------------------------------------------------------------------
# importing has no side effects; the declared dependencies cover what runs
# ---------------------------------------------------------------------------------------------
PROBE = """
import os, sys, logging, warnings, json
import torch, torchvision.models._meta  # their own side effects are the baseline
HEAVY = {"keras", "timm", "onnx", "onnxruntime", "onnxscript", "pytest", "matplotlib",
         "tensorboard", "openvino", "tensorflow", "sklearn", "skimage"}
def state():
    root = logging.getLogger()
    return dict(threads=torch.get_num_threads(), interop=torch.get_num_interop_threads(),
                handlers=[type(h).__name__ for h in root.handlers], level=root.level,
                filters=[repr(f) for f in warnings.filters], env=dict(os.environ),
                cwd=os.getcwd(), dtype=str(torch.get_default_dtype()),
                grad=torch.is_grad_enabled(), det=torch.are_deterministic_algorithms_enabled(),
                mm=torch.get_float32_matmul_precision(), seed=torch.initial_seed())
before = state()
import xception
files = [xception.__file__]
for name in ("model", "zoo", "cli", "layers", "inception", "runtime", "checkpoint", "metrics",
             "weights", "data", "evaluate", "predict", "deploy", "train", "bench", "experiments"):
    __import__("xception." + name)
    files.append(sys.modules["xception." + name].__file__)
after = state()
changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
if "env" in changed:
    changed["env"] = sorted(set(before["env"].items()) ^ set(after["env"].items()))
own = [type(h).__name__ for h in logging.getLogger("xception").handlers]
print(json.dumps(dict(files=files, changed=changed, handlers=own,
                      heavy=sorted(HEAVY & {m.split(".")[0] for m in sys.modules}))))
"""


def test_importing_every_module_changes_no_process_state_nor_loads_optional_peers(installed):
    import json

    run = installed.python(PROBE)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(f.startswith(str(installed.site)) for f in got["files"]), got["files"]
    assert got["changed"] == {}
    assert set(got["handlers"]) <= {"NullHandler"}
    assert got["heavy"] == []


def _requirement_names(reqs) -> tuple[set[str], set[str]]:
    """(required, optional) distribution names of Requires-Dist lines."""
    required, optional = set(), set()
    for req in reqs or ():
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
        (optional if "extra ==" in req else required).add(_norm(name))
    return required, optional


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names: set[str]) -> set[str]:
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += _requirement_names(md.requires(name))[0]
        except md.PackageNotFoundError:
            pass
    return seen


def test_declared_dependencies_cover_every_third_party_import(installed):
    (dist,) = md.distributions(path=[str(installed.site)])
    required, optional = _requirement_names(dist.requires)
    assert {"torch", "torchvision", "numpy", "h5py", "safetensors", "pillow", "pyyaml"} <= required
    needed = _closure(required)
    owners = {k: {_norm(d) for d in v} for k, v in md.packages_distributions().items()}
    top_level, lazy = set(), set()
    for path in (installed.site / "xception").rglob("*.py"):
        tree = ast.parse(path.read_text())
        module_scope = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top == "xception":
                    continue
                (top_level if id(node) in module_scope else lazy).add(top)
    for top in sorted(top_level | lazy):
        dists = owners.get(top, {_norm(top)})
        where = needed if top in top_level else needed | optional
        assert dists & where, f"{top} ({dists}) is imported but not declared"
    assert {"onnx", "onnxruntime", "timm", "keras", "openvino"} <= lazy
    assert {"onnx", "onnxruntime", "onnxscript", "tensorboard", "timm", "keras"} <= optional


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------
def test_python_dash_m_xception_runs_the_command_line(installed):
    """`python -m xception ...` (the usual way to reach an installed tool whose script is not
    on PATH) failed with "No module named xception.__main__". It now runs the same CLI as the
    `xception` script."""
    run = subprocess.run([sys.executable, "-m", "xception", "--version"], cwd=installed.cwd,
                         capture_output=True, text=True, env=installed.env(), timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "xception 0.1.0"


def test_export_onnx_without_the_onnx_extra_is_a_one_line_error(installed, tmp_path):
    """`xception export model.onnx` where onnx/onnxscript/onnxruntime are not installed (they
    are the `onnx` extra, not base dependencies) ended in a ModuleNotFoundError traceback. It
    is now exit status 2 and one line saying to `pip install 'xception[onnx]'`."""
    stub = _stub_modules(tmp_path / "stub", ONNX_EXTRA)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"OLD")
    run = installed.cli("export", str(out), *TINY, before=(stub,))
    assert out.read_bytes() == b"OLD"  # a good file is kept (this part holds)
    assert "Traceback" not in run.stderr, run.stderr[-1500:]
    assert run.returncode == 2
    line = run.stderr.strip()
    assert len(line.splitlines()) == 1 and "pip install" in line and "onnx" in line, line


def test_predict_onnxruntime_backend_without_the_onnx_extra_is_a_one_line_error(
    installed, tmp_path
):
    """`xception predict IMAGES --backend onnxruntime` without the `onnx` extra ended in a
    ModuleNotFoundError traceback (from torch.onnx's exporter). It is now exit status 2 and one
    line naming the extra to install (`pip install 'xception[onnx]'`)."""
    from helpers import tiny_model_and_images

    root = tiny_model_and_images(tmp_path)
    stub = _stub_modules(tmp_path / "stub", ONNX_EXTRA)
    run = installed.cli("predict", str(root / "data"), "--weights", str(root / "w.safetensors"),
                        "--backend", "onnxruntime", before=(stub,))  # fmt: skip
    assert "Traceback" not in run.stderr, run.stderr[-1500:]
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]
    assert "pip install" in line and "onnx" in line, line


def test_bench_only_onnx_names_the_missing_onnxruntime(monkeypatch, capsys, tmp_path):
    """`xception bench --only onnx` (the candidates are named "... onnxruntime fp32") without
    onnxruntime installed said only "no candidate name contains 'onnx'": the note that
    onnxruntime is not installed appeared for `--only onnxruntime` but not for a shorter text
    that matches those candidates. The error now says onnxruntime is not installed."""
    from xception.cli import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.chdir(tmp_path)
    code = main(["bench", "--quick", "--only", "onnx", "--json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert code == 2 and "no candidate name contains 'onnx'" in err
    assert "onnxruntime is not installed" in err, err


def test_missing_fashion_mnist_advice_works_for_a_pip_install(monkeypatch, tmp_path):
    """Without the Debian package, `xception demo` / `train --data fashion-mnist` told the
    user "make setup does, as root" and "make demo DATA=DIR": Makefile targets of the
    checkout, which a `pip install xception` user does not have. The advice now works for the
    installed command (`xception demo --data DIR`)."""
    import xception.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(data.DataError) as err:
        data.resolve_data("fashion-mnist")
    text = str(err.value)
    assert "--data DIR" in text and "dataset-fashion-mnist" in text
    assert not re.search(r"\bmake\b", text), text


def test_fit_leaves_the_callers_matplotlib_backend_alone(installed):
    """`xception.train.fit(...)` (the Python API) called `matplotlib.use("Agg")` to draw
    curves.png, switching the caller's backend for the rest of the process (a notebook's inline
    backend, a script's window: later `plt.show()` showed nothing); xception.experiments did
    the same. Both now draw on a matplotlib.figure.Figure, leaving the backend as it was."""
    from test_data import make_idx_dataset

    data = make_idx_dataset(installed.cwd.parent / "idx_mpl", n_train=32, n_test=16, size=16)
    out = installed.cwd.parent / "run_mpl"
    code = (
        "import matplotlib\nmatplotlib.use('svg')\nimport matplotlib.pyplot as plt\n"
        f"import xception.train as t\nassert t.__file__.startswith({str(installed.site)!r})\n"
        f"t.fit('fashion-mnist', data={str(data)!r}, out={str(out)!r}, epochs=1, batch_size=16, "
        "threads=1, image_size=16, progress=False, model_args={'width': 0.25, 'middle_blocks': 1})\n"
        "print('backend', matplotlib.get_backend())\n"
    )
    run = installed.python(code)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "curves.png").is_file()
    assert run.stdout.strip().splitlines()[-1] == "backend svg"


def test_package_data_is_read_zip_safely(installed):
    """data.imagenet_wnids() opened `Path(__file__).with_name("imagenet_wnids.txt")`, so the
    package imported from a zip (a zipapp, a PEX, the pure-Python wheel itself on sys.path)
    failed with NotADirectoryError, while train.load_recipe reads its recipes through
    importlib.resources and works there. Both now go through importlib.resources."""
    code = (
        "import xception.train as t, xception.data as d\n"
        "print(t.__file__)\nprint(','.join(t.list_recipes()))\nprint(len(d.imagenet_wnids()))\n"
    )
    run = installed.python(code, path=installed.wheel)
    lines = run.stdout.strip().splitlines()
    assert lines[:2] == [f"{installed.wheel}/xception/train.py", "fashion-mnist,imagenet,jft"]
    assert run.returncode == 0, run.stderr[-800:]
    assert lines[2] == "1000"
