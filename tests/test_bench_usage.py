"""`xception bench` and the scripts in benchmarks/ as a user who benchmarks uses them: bad
option values, `--only` filters, outputs that must not replace inputs or each other, and the
series the scripts write. Everything runs on tiny models or stand-ins, in seconds."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fake_bench_checkout

from xception import bench
from xception.bench import BenchReport, Measurement, run_bench
from xception.cli import main

ROOT = Path(__file__).parents[1]
TINY = dict(quick=True, size=32, batches=(1,), train_batch=None, repeats=1)


def _script(name: str):
    """benchmarks/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_candidates(monkeypatch, names=("xception tiny a", "xception tiny b")):
    """The bench's candidates replaced by steps that take no time (the CLI's paths in seconds)."""

    def build(batch):
        return lambda: None

    group = [bench._Candidate(n, "inference", build, 1e-6) for n in names]
    monkeypatch.setattr(bench, "_candidates", lambda **kwargs: group)


def _no_benchmark(monkeypatch):
    def run_bench(**kwargs):
        raise AssertionError("benchmarked")

    monkeypatch.setattr(bench, "run_bench", run_bench)


# --------------------------------------------------------------------------------------------
# xception bench: bad values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "0"], "--size 0: give the input size in pixels"),
        (["--size", "-5"], "--size -5: give the input size in pixels"),
        (["--batch", "-1"], "--batch -1: inference batch sizes are at least 1"),
        (["--train-batch", "-1"], "--train-batch -1: use a batch size, or 0 for no training"),
        (["--repeats", "-3"], "--repeats -3: time at least 1 round"),
        (["--threads", "0"], "--threads 0: use a positive number of threads"),
        (["--threads", "-2"], "--threads -2: use a positive number of threads"),
    ],
)
def test_bad_numbers_are_one_line_errors_naming_the_option_before_any_work(
    tmp_path, capsys, monkeypatch, args, message
):
    _no_benchmark(monkeypatch)
    out = tmp_path / "b.json"
    before = torch.get_num_threads()
    assert main(["bench", "--quick", *args, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and torch.get_num_threads() == before


@pytest.mark.parametrize("option", ["--size", "--batch", "--train-batch", "--repeats", "--threads"])
def test_a_non_numeric_value_is_refused_by_name(tmp_path, capsys, monkeypatch, option):
    _no_benchmark(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--quick", option, "two", "--json", str(tmp_path / "b.json")])
    assert stop.value.code == 2
    assert f"argument {option}: invalid int value: 'two'" in capsys.readouterr().err


def test_a_refused_run_leaves_the_previous_results_file_alone(tmp_path, capsys):
    """An `--only` that names nothing is refused before any timing: the last good JSON and
    Markdown stay as they were, and no temporary file is left beside them."""
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    out.write_text('{"good": true}')
    md.write_text("| good |\n")
    argv = ["bench", "--quick", "--size", "32", "--only", "zzz", "--json", str(out),
            "--markdown", str(md)]  # fmt: skip
    assert main(argv) == 2
    assert "no candidate name contains 'zzz'" in capsys.readouterr().err
    assert out.read_text() == '{"good": true}' and md.read_text() == "| good |\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.md"]


def test_the_files_hold_what_the_run_measured_and_missing_folders_are_made(
    tmp_path, capsys, monkeypatch
):
    _tiny_candidates(monkeypatch)
    out, md = tmp_path / "new" / "deep" / "b.json", tmp_path / "other" / "b.md"
    argv = ["bench", "--quick", "--batch", "3", "--train-batch", "0", "--repeats", "3",
            "--json", str(out), "--markdown", str(md)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and f"wrote {md}" in text
    data = json.loads(out.read_text())
    assert data["settings"]["repeats"] == 3 and data["settings"]["batches"] == [3]
    assert [(r["name"], r["batch"], r["rounds"]) for r in data["results"]] == [
        ("xception tiny a", 3, 3),
        ("xception tiny b", 3, 3),
    ]
    lines = md.read_text().splitlines()
    assert [line.split(" | ")[2] for line in lines[2:]] == ["xception tiny a", "xception tiny b"]


# --------------------------------------------------------------------------------------------
# xception bench: --only
# --------------------------------------------------------------------------------------------
def test_an_empty_only_text_is_refused_rather_than_matching_every_candidate(
    tmp_path, capsys, monkeypatch
):
    """`--only ""` (an unset shell variable) matched every candidate and ran the whole
    bench, exit 0, instead of being refused like the other empty arguments."""
    _tiny_candidates(monkeypatch)
    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--only", "", "--batch", "1", "--train-batch", "0",
            "--repeats", "1", "--json", str(out)]  # fmt: skip
    try:
        code = main(argv)
    except SystemExit as stop:  # refused by argparse
        code = stop.code
    assert code == 2
    assert "--only" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="empty text in only"):  # and in Python
        run_bench(quick=True, size=32, batches=(1,), train_batch=None, repeats=1, only=("x", " "))


def test_an_only_text_naming_a_candidate_that_quick_leaves_out_says_so():
    """`--quick --only timm` said only "no candidate name contains 'timm'", not that
    --quick leaves the peers (and the compiled candidates) out."""
    with pytest.raises(ValueError, match="no candidate") as err:
        run_bench(**TINY, only="timm")
    assert "quick" in str(err.value)


def test_an_only_text_naming_a_peer_that_is_not_installed_says_so(monkeypatch):
    """With timm not installed, `--only "timm eager channels_last"` said only that no
    candidate name contains it, not that timm is missing (the fix: pip install timm)."""
    real = bench._version
    monkeypatch.setattr(bench, "_version", lambda m: None if m == "timm" else real(m))
    with pytest.raises(ValueError, match="timm eager channels_last") as err:
        run_bench(size=75, batches=(8,), train_batch=None, repeats=1,
                  only="timm eager channels_last")  # fmt: skip
    assert "install" in str(err.value).lower()


# --------------------------------------------------------------------------------------------
# run_bench: values of the wrong type
# --------------------------------------------------------------------------------------------
def test_a_fractional_batch_size_is_refused_before_any_candidate_is_built():
    """run_bench(batches=(2.5,)) built every candidate and failed each with
    "RuntimeError: manual_seed expected a long, but got float" as its error row, instead of a
    ValueError naming the batch size."""
    with pytest.raises((ValueError, TypeError), match="batch"):
        run_bench(**{**TINY, "batches": (2.5,)}, only="eager NCHW")


def test_a_fractional_repeats_is_refused_before_any_candidate_is_built(monkeypatch):
    """run_bench(repeats=1.5) built the candidates and timed the matrix multiply, then
    failed with "TypeError: 'float' object cannot be interpreted as an integer" instead of a
    ValueError naming repeats up front."""
    built = []
    real = bench._candidates
    monkeypatch.setattr(bench, "_candidates", lambda **kw: built.append(1) or real(**kw))
    with pytest.raises(ValueError, match="repeats"):
        run_bench(**{**TINY, "repeats": 1.5}, only="eager NCHW")
    assert built == []


# --------------------------------------------------------------------------------------------
# the report: figures and comparisons
# --------------------------------------------------------------------------------------------
def test_a_candidate_that_failed_to_build_is_kept_apart_from_the_comparisons(monkeypatch):
    """A peer that fails to build has an error row with no figures and no rounds; the other
    candidates' rounds and the comparisons on them are unaffected, and the JSON is strict."""
    names = ["xception a", "timm onnxruntime fp32 (plain session)", "xception onnxruntime int8"]

    def build(name):
        def make(batch):
            if name.startswith("timm"):
                raise ImportError("No module named 'onnxruntime'")
            return lambda: None

        return make

    group = [bench._Candidate(n, "inference", build(n), 1.0) for n in names]
    monkeypatch.setattr(bench, "_candidates", lambda **kwargs: group)
    report = run_bench(quick=True, size=32, batches=(8,), train_batch=None, repeats=3)
    peer = report.find(names[1], "inference", 8)
    assert peer.error == "ImportError: No module named 'onnxruntime'"
    assert peer.rounds == 0 and peer.images_per_s is None and peer.round_seconds == []
    assert [c.peer for c in report.comparisons()] == ["xception a"]  # int8 vs our fp32 only
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [r["rounds"] for r in data["results"]] == [3, 0, 3]


# --------------------------------------------------------------------------------------------
# benchmarks/targets_summary.py
# --------------------------------------------------------------------------------------------
def _run(ours, peer, *, with_training=True):
    def measured(name, task, seconds):
        med = sorted(seconds)[len(seconds) // 2]
        return Measurement(name, task, 8, 299, images_per_s=8 / med, rounds=len(seconds),
                           round_seconds=list(seconds))  # fmt: skip

    results = [measured("xception onnxruntime int8", "inference", [0.5, 0.5, 0.5]),
               measured("xception eager channels_last", "inference", [1.0, 1.0, 1.0])]  # fmt: skip
    if with_training:
        results += [measured("xception train channels_last", "training", ours),
                    measured("timm train channels_last", "training", peer)]  # fmt: skip
    report = BenchReport(machine={"device": "cpu"}, settings={"size": 299, "quick": False},
                         matmul_gflop_per_s=1.0, results=results)  # fmt: skip
    return json.loads(json.dumps(report.to_dict()))


def test_targets_summary_over_an_even_number_of_runs_and_a_comparison_one_run_lacks():
    """The median of two runs' lower ratios is their mean; a comparison a run lacks is "-" in
    that run's cell and left out of the median, not counted as 0."""
    summary = _script("targets_summary").summary
    runs = [_run([1.0, 1.0, 1.0], [1.25, 1.25, 1.25]), _run([1.0, 1.0, 1.0], [1.5, 1.4, 1.45]),
            _run([], [], with_training=False)]  # fmt: skip
    rows = {cells[2]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in summary(runs).splitlines()[2:])}  # fmt: skip
    training = rows["training step vs timm's, channels_last"]
    assert training[3:] == ["1.250 (1.250)", "1.450 (1.450)", "-", "1.350", ">= 1.30: met"]
    int8 = rows["int8 vs our fastest fp32 inference"]
    assert int8[3:] == ["2.000 (2.000)"] * 3 + ["2.000", ">= 1.60: met"]


# --------------------------------------------------------------------------------------------
# the shell scripts
# --------------------------------------------------------------------------------------------
def _checkout(tmp_path):
    """benchmarks/ in a copy of the checkout's layout whose `xception bench` writes a small but
    valid report to --json (and a line to --markdown); `flock` runs its command, and
    .venv/bin/python is the real one."""
    report = json.dumps(_run([1.0, 1.0, 1.0], [1.2, 1.2, 1.2]))
    (tmp_path / "report.json").write_text(report)
    return fake_bench_checkout(
        tmp_path, ("common.sh", "targets.sh", "pytorch_path.sh", "targets_summary.py"),
        "while (($#)); do case $1 in\n"
        f'  --json) cp {tmp_path}/report.json "$2"; shift;;\n'
        '  --markdown) echo new > "$2"; shift;;\n'
        "esac; shift; done\n",
        python=True,
    )  # fmt: skip


@pytest.mark.parametrize("script", ["targets.sh", "pytorch_path.sh"])
@pytest.mark.parametrize("runs", ["0", "-1", "two", "1.5", "05"])
def test_a_bad_number_of_runs_is_refused_and_writes_nothing(tmp_path, script, runs):
    root, out, env = _checkout(tmp_path)
    done = subprocess.run(["bash", str(root / "benchmarks" / script), runs], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert f"{script}: RUNS is a number of runs (1 or more), not '{runs}'" in done.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("script", ["targets.sh", "pytorch_path.sh"])
def test_an_empty_number_of_runs_is_refused_rather_than_taken_as_the_default(tmp_path, script):
    """`targets.sh ""` (an unset shell variable: `targets.sh "$RUNS"`) ran the default
    series (5 runs, about 25 minutes; pytorch_path.sh: 3) instead of refusing the empty RUNS."""
    root, out, env = _checkout(tmp_path)
    done = subprocess.run(["bash", str(root / "benchmarks" / script), ""], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert f"{script}: RUNS is a number of runs (1 or more), not ''" in done.stderr
    assert list(out.iterdir()) == []


def test_a_shorter_targets_series_leaves_no_runs_of_the_previous_one(tmp_path):
    """`targets.sh 2` over a 5-run series left the old targets-3..5.json/.md beside the
    new targets-1..2, and targets_summary.py's documented glob `targets-[0-9]*.json` then takes
    the two series as one."""
    root, out, env = _checkout(tmp_path)
    old = json.dumps(_run([1.0, 1.0, 1.0], [1.5, 1.5, 1.5]))
    for i in range(1, 6):
        (out / f"targets-{i}.json").write_text(old)
        (out / f"targets-{i}.md").write_text("old\n")
    done = subprocess.run(["bash", str(root / "benchmarks" / "targets.sh"), "2"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "run 2 |" in (out / "targets.md").read_text()
    assert "run 3 |" not in (out / "targets.md").read_text()
    series = sorted(p.name for p in out.glob("targets-[0-9]*.json"))
    assert series == ["targets-1.json", "targets-2.json"]


# --------------------------------------------------------------------------------------------
# benchmarks/int8_agreement.py and benchmarks/ort_ops.py: outputs must not replace inputs
# --------------------------------------------------------------------------------------------
def test_int8_agreement_refuses_a_json_that_would_replace_a_file_of_the_run(tmp_path, monkeypatch):
    """`int8_agreement.py RUN --json RUN/model.json` ran the whole check and then
    wrote the result over the run's model.json (eval's --json refuses a run's files)."""
    module = _script("int8_agreement")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "model.json").write_text('{"model": "meta"}')
    checked = []
    monkeypatch.setattr(module, "check", lambda args: checked.append(args) or 0)
    monkeypatch.setattr(sys, "argv", ["int8_agreement.py", str(run), "--json",
                                      str(run / "model.json")])  # fmt: skip
    assert module.main() == 2
    assert checked == []  # refused before the minutes of work
    assert (run / "model.json").read_text() == '{"model": "meta"}'


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from xception import Xception
    from xception.deploy import export

    torch.manual_seed(0)
    model = Xception(width=0.25, middle_blocks=1, num_classes=10).eval()
    path = tmp_path_factory.mktemp("ort") / "m.onnx"
    export(model, path, "onnx", input_size=71, check_batches=(1,))
    return path


QUICK_PROFILE = ["--runs", "1", "--warmup", "0"]


def test_ort_ops_profiles_a_tiny_model_at_its_size(tiny_onnx, tmp_path, capsys):
    ort_ops = _script("ort_ops")
    out = tmp_path / "ops.json"
    argv = ["--onnx", str(tiny_onnx), "--size", "71", *QUICK_PROFILE, "--json", str(out)]
    assert ort_ops.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["size"] == [71, 71] and result["runs"] == 1 and result["threads"] == 1
    assert capsys.readouterr().out.startswith("ONNX Runtime ")


def test_ort_ops_on_a_fixed_size_model_without_its_size_is_no_traceback(tiny_onnx, capsys):
    """`ort_ops.py --onnx m.onnx` of a model exported at 71x71 (no --size, so 299) died
    with onnxruntime's InvalidArgument traceback instead of exit 2 with one line (or profiling
    at the model's own size)."""
    ort_ops = _script("ort_ops")
    code = ort_ops.main(["--onnx", str(tiny_onnx), *QUICK_PROFILE])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1 and "71" in err)


def test_ort_ops_refuses_a_json_that_would_replace_the_onnx_it_profiles(tiny_onnx, tmp_path):
    """`ort_ops.py --onnx m.onnx --json m.onnx` profiled the model and then wrote the
    JSON over it: the ONNX file is lost."""
    ort_ops = _script("ort_ops")
    model = tmp_path / "m.onnx"
    shutil.copy(tiny_onnx, model)
    argv = ["--onnx", str(model), "--size", "71", *QUICK_PROFILE, "--json", str(model)]
    assert ort_ops.main(argv) == 2
    assert model.read_bytes() == tiny_onnx.read_bytes()


def test_ort_ops_refuses_json_and_markdown_in_one_file(tiny_onnx, tmp_path):
    """`ort_ops.py --json o.txt --markdown o.txt` wrote the Markdown over the JSON and
    exited 0 (`xception bench` refuses the same pair)."""
    ort_ops = _script("ort_ops")
    out = tmp_path / "o.txt"
    argv = ["--onnx", str(tiny_onnx), "--size", "71", *QUICK_PROFILE, "--json", str(out),
            "--markdown", str(out)]  # fmt: skip
    assert ort_ops.main(argv) == 2
    assert not out.exists()


def test_an_empty_output_name_is_named_as_empty_not_as_the_current_folder(tiny_onnx, capsys):
    """`ort_ops.py --json "$UNSET"` was refused with ". is a folder", a fault the user had
    not made; every output check now names an empty name as such."""
    from xception.checkpoint import check_output_file

    ort_ops = _script("ort_ops")
    assert ort_ops.main(["--onnx", str(tiny_onnx), *QUICK_PROFILE, "--json", ""]) == 2
    err = capsys.readouterr().err
    assert "empty output file name" in err and "is a folder" not in err, err
    with pytest.raises(ValueError, match=r"empty output file name .* e\.g\. result\.md"):
        check_output_file(" ", example_suffix=".md")
