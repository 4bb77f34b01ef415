"""bench.py: `xception bench --quick` runs on a tiny model and writes a well-formed table and
JSON; the pieces (matmul rate, candidate filter, errors) behave."""

import dataclasses
import json
import statistics

import pytest
import torch

from xception import runtime
from xception.bench import BenchReport, Measurement, _gemms, matmul_rate, run_bench
from xception.cli import main


def test_bench_records_the_allocator_as_the_timed_rounds_found_it(monkeypatch):
    # Building an optimize() candidate raises glibc's thresholds after the run has started.
    monkeypatch.setattr(runtime, "_raised", False)
    monkeypatch.setattr(runtime, "_kept", False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    report = run_bench(quick=True, size=64, batches=(1,), train_batch=None, repeats=1,
                       only="optimize(backend='eager')")  # fmt: skip
    assert [r.name for r in report.results] == ["xception optimize(backend='eager')"]
    assert report.machine["allocator"] == runtime.allocator_state()
    if runtime.allocator_state() != "not glibc":
        assert report.machine["allocator"].endswith(", raise_malloc_thresholds()")


def test_bench_quick_cli_writes_table_and_json(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["bench", "--quick", "--json", str(out), "--markdown", str(md)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("task"))
    for column in ("batch", "candidate", "img/s", "ms/batch", "GFLOP/s", "of matmul"):
        assert column in header
    for name in ("xception eager NCHW", "xception eager channels_last",
                 "xception folded channels_last", "xception optimize(backend='eager')",
                 "xception optimize(backend='jit')",
                 "xception onnxruntime fp32",
                 "xception onnxruntime int8", "xception train channels_last"):  # fmt: skip
        assert name in text
    data = json.loads(out.read_text())
    assert data["matmul_gflop_per_s"] > 0
    assert {"cpu", "cpu_count", "torch", "onnxruntime", "allocator"} <= set(data["machine"])
    assert data["machine"]["allocator"] == runtime.allocator_state()
    assert data["settings"]["quick"] is True and data["settings"]["size"] == 64
    assert data["settings"]["matmul_dtype"] == "float32"  # the CPU's candidates are fp32
    assert "; float32 matmul " in text
    rows = data["results"]
    assert {(r["task"], r["batch"]) for r in rows} == {
        ("inference", 1),
        ("inference", 2),
        ("training", 2),
    }
    for r in rows:
        assert r["error"] is None, r
        assert r["rounds"] == 2 and len(r["round_seconds"]) == 2
        assert r["ms_per_batch"] == pytest.approx(1000 * statistics.median(r["round_seconds"]))
        assert r["images_per_s"] > 0 and r["best_images_per_s"] >= r["images_per_s"]
        assert r["ms_per_batch"] == pytest.approx(1000 * r["batch"] / r["images_per_s"])
        assert r["gflop_per_s"] == pytest.approx(r["images_per_s"] * r["gflop_per_image"])
        assert r["fraction_of_matmul"] == pytest.approx(
            r["gflop_per_s"] / data["matmul_gflop_per_s"]
        )
    # The Markdown table: a header, a rule, then one row per result with the JSON's numbers.
    # Without timm only int8 against our fastest fp32 path is compared, at each inference batch.
    comparisons = data["comparisons"]
    assert [(c["task"], c["batch"]) for c in comparisons] == [("inference", 1), ("inference", 2)]
    for c in comparisons:
        group = [r for r in rows if (r["task"], r["batch"]) == (c["task"], c["batch"])]
        fp32 = [r for r in group if "int8" not in r["name"]]
        fastest = max(fp32, key=lambda r: r["images_per_s"])
        int8 = next(r for r in group if r["name"] == "xception onnxruntime int8")
        assert (c["ours"], c["peer"]) == (int8["name"], fastest["name"])
        assert c["ratio"] == pytest.approx(int8["images_per_s"] / fastest["images_per_s"])
        expected = [p / o for o, p in zip(int8["round_seconds"], fastest["round_seconds"],
                                          strict=True)]  # fmt: skip
        assert c["round_ratios"] == pytest.approx(expected)
        assert c["target"] is None and c["met"] is None  # targets are set at batch 8 only
    assert "how many times faster" in text and "int8 vs our fastest fp32 inference" in text
    table = md.read_text().splitlines()
    assert table[0].startswith("| task | batch | candidate |") and table[1].startswith("|---")
    assert table[2 + len(rows)] == ""  # then the comparisons, one row each
    assert table[3 + len(rows)].startswith("| task | batch | comparison |")
    assert len(table) == 5 + len(rows) + len(comparisons)
    for line, r in zip(table[2 : 2 + len(rows)], rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:4] == [r["task"], str(r["batch"]), r["name"], f"{r['images_per_s']:.2f}"]
    train = next(r for r in rows if r["task"] == "training")
    infer = next(r for r in rows if r["name"] == "xception eager channels_last")
    assert train["gflop_per_image"] == pytest.approx(3 * infer["gflop_per_image"])


def _measured(name, task, batch, seconds, error=None):
    return Measurement(name, task, batch, 299, images_per_s=batch / statistics.median(seconds),
                       rounds=len(seconds), round_seconds=seconds, error=error)  # fmt: skip


def test_comparisons_pick_our_fastest_fp32_paths_and_pair_the_rounds():
    inf, tr = "inference", "training"
    results = [
        _measured("xception optimize(backend='compile')", inf, 8, [0.80, 0.90, 0.85]),
        _measured("xception onnxruntime fp32", inf, 8, [0.70, 0.75, 0.72]),
        # faster, but not fp32: never "our fastest fp32" path
        _measured("xception optimize(backend='compile', dtype=bfloat16)", inf, 8, [0.4] * 3),
        _measured("xception onnxruntime int8", inf, 8, [0.25, 0.24, 0.26]),
        # failed: left out even though its (stale) times would win
        _measured("xception eager channels_last", inf, 8, [0.1] * 3, error="RuntimeError: x"),
        _measured("timm eager channels_last", inf, 8, [1.30, 1.20, 1.40]),
        _measured("timm onnxruntime fp32 (plain session)", inf, 8, [0.74, 0.80, 0.76]),
        _measured("xception train channels_last", tr, 8, [3.0, 3.2, 3.1]),
        _measured("timm train channels_last", tr, 8, [3.1, 3.0, 3.4]),
        # CUDA only (bfloat16): on the CPU the comparison keeps the engine's default step
        _measured("xception train channels_last, compiled (CUDA graphs)", tr, 8, [1.5] * 3),
        _measured("xception eager channels_last", inf, 1, [0.2, 0.2]),  # no peer at batch 1
    ]
    report = BenchReport(machine={"device": "cpu"}, settings={}, matmul_gflop_per_s=200.0,
                         results=results)  # fmt: skip
    got = {c.what: c for c in report.comparisons()}
    assert list(got) == [
        "fastest fp32 inference vs timm in ONNX Runtime",
        "fastest PyTorch fp32 inference vs timm eager channels_last",
        "int8 vs our fastest fp32 inference",
        "training step vs timm's, channels_last",
    ]
    ort = got["fastest fp32 inference vs timm in ONNX Runtime"]
    assert (ort.ours, ort.peer) == ("xception onnxruntime fp32",
                                    "timm onnxruntime fp32 (plain session)")  # fmt: skip
    assert ort.ratio == pytest.approx(0.76 / 0.72)
    assert ort.round_ratios == pytest.approx([0.74 / 0.70, 0.80 / 0.75, 0.76 / 0.72])
    assert ort.paired_ratio == pytest.approx(0.74 / 0.70)  # the middle of the three
    assert ort.target == 1.05 and ort.met is True
    torch_path = got["fastest PyTorch fp32 inference vs timm eager channels_last"]
    assert torch_path.ours == "xception optimize(backend='compile')"
    assert torch_path.ratio == pytest.approx(1.30 / 0.85) and torch_path.met is True
    int8 = got["int8 vs our fastest fp32 inference"]
    assert (int8.ours, int8.peer) == ("xception onnxruntime int8", "xception onnxruntime fp32")
    # Training: each round ours is faster or level (paired median 1.03x), the medians 1.0x;
    # below the 1.3x target either way.
    train = got["training step vs timm's, channels_last"]
    assert train.round_ratios == pytest.approx([3.1 / 3.0, 3.0 / 3.2, 3.4 / 3.1])
    assert train.target == 1.3 and train.met is False
    # A target counts as met only when the medians' ratio reaches it too.
    assert dataclasses.replace(ort, ratio=1.04, paired_ratio=1.2).met is False
    # On CUDA the eager candidates run in bfloat16: every candidate counts, no targets.
    cuda = BenchReport(machine={"device": "cuda:0"}, settings={}, matmul_gflop_per_s=1e5,
                       results=results)  # fmt: skip
    for c in cuda.comparisons():
        assert c.target is None and c.met is None and "fp32 inference vs" not in c.what
    assert next(c for c in cuda.comparisons() if "PyTorch" in c.what).ours == (
        "xception optimize(backend='compile', dtype=bfloat16)"
    )
    cuda_train = next(c for c in cuda.comparisons() if c.task == tr)
    assert cuda_train.ours == "xception train channels_last, compiled (CUDA graphs)"
    assert cuda_train.ratio == pytest.approx(3.1 / 1.5)
    assert train.ours == "xception train channels_last"
    table = report.comparisons_markdown().splitlines()
    assert len(table) == 2 + 4 and ">= 1.30: not met" in table[-1]


def test_targets_summary_takes_the_median_of_each_runs_lower_ratio():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "targets_summary.py"
    spec = importlib.util.spec_from_file_location("targets_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(ours, peer):  # one training comparison per run, as a bench JSON report
        results = [_measured("xception train channels_last", "training", 8, ours),
                   _measured("timm train channels_last", "training", 8, peer)]  # fmt: skip
        report = BenchReport(machine={"device": "cpu"}, settings={}, matmul_gflop_per_s=1.0,
                             results=results)  # fmt: skip
        return json.loads(json.dumps(report.to_dict()))

    runs = [
        run([1.0, 1.0, 1.0], [1.4, 1.4, 1.4]),  # 1.4x both ways
        run([1.0, 1.25, 2.0], [1.5, 1.5, 3.0]),  # per round 1.5x, medians 1.2x
        run([1.0, 1.0, 1.0], [1.1, 1.1, 1.1]),
    ]  # 1.1x
    table = module.summary(runs).splitlines()
    assert table[0].startswith("| task | batch | comparison | run 1 | run 2 | run 3 |")
    assert len(table) == 3
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[3:] == ["1.400 (1.400)", "1.500 (1.200)", "1.100 (1.100)", "1.200",
                         ">= 1.30: not met"]  # fmt: skip


def test_run_bench_filters_candidates_and_skips_training():
    report = run_bench(quick=True, size=48, batches=(1,), train_batch=None, repeats=1,
                       only="channels_last")  # fmt: skip
    assert [r.name for r in report.results] == [
        "xception eager channels_last",
        "xception folded channels_last",
    ]
    assert report.find("xception eager channels_last", "inference", 1).images_per_s > 0
    assert report.find("xception eager channels_last", "training", 1) is None
    several = run_bench(quick=True, size=48, batches=(1,), train_batch=None, repeats=1,
                        only=("eager NCHW", "optimize(backend='eager')"))  # fmt: skip
    assert [r.name for r in several.results] == [
        "xception eager NCHW",
        "xception optimize(backend='eager')",
    ]


def test_run_bench_rejects_bad_settings():
    with pytest.raises(ValueError, match="too small"):
        run_bench(size=16)
    with pytest.raises(ValueError, match="repeats"):
        run_bench(quick=True, repeats=0)
    # A filter that matches nothing says what the names are, before anything is timed.
    with pytest.raises(
        ValueError,
        match=r"no candidate name contains 'zzz' or 'NCHW ': .*"
        r"xception eager NCHW, xception eager channels_last",
    ):
        run_bench(quick=True, only=("zzz", "NCHW "))


def test_every_only_text_must_name_a_candidate():
    # One stale name among several (a benchmark script's list, or a peer whose package is not
    # installed: --quick has no timm rows) used to drop its candidate, and every comparison on
    # it, while the others ran and the bench exited as if nothing was wrong.
    with pytest.raises(ValueError, match=r"no candidate name contains 'timm eager channels_last':"):
        run_bench(quick=True, size=32, batches=(1,), train_batch=None, repeats=1,
                  only=("xception eager NCHW", "timm eager channels_last"))  # fmt: skip


def test_matmul_rate_is_plausible():
    rate = matmul_rate(n=256, repeats=3)
    assert 0.1 < rate < 1e5  # GFLOP/s: a number, not a unit mistake


def test_every_gemm_the_rate_times_computes_the_product():
    a, b = torch.randn(96, 96), torch.randn(96, 96)
    gemms = _gemms(a, b)
    assert len(gemms) == 2  # MKL's sgemm and oneDNN's, on the CPU
    for gemm in gemms:
        assert torch.allclose(gemm(), a @ b, atol=1e-4, rtol=1e-4)


def test_bfloat16_training_is_timed_only_where_the_cpu_has_bfloat16(monkeypatch):
    from xception import deploy

    name = "xception train channels_last, bf16 autocast"
    settings = dict(size=75, batches=(1,), train_batch=1, repeats=1, only="bf16 autocast")
    if deploy.cpu_native_bf16():
        report = run_bench(**settings)
        assert [r.name for r in report.results] == [name]
        assert report.find(name, "training", 1).images_per_s > 0
    monkeypatch.setattr(deploy, "cpu_native_bf16", lambda text=None: False)
    with pytest.raises(ValueError, match="no candidate name contains 'bf16 autocast'") as err:
        run_bench(**settings)
    assert "bf16" not in str(err.value).split(": the candidates here are ")[1]


def test_fp32_peak_benchmark_builds_and_reports_rates(tmp_path):
    """benchmarks/fp32_peak.c (the ceilings behind BENCHMARKS.md) builds and prints a rate per
    mode and thread count, and refuses a bad thread count with its usage."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src = Path(__file__).parents[1] / "benchmarks" / "fp32_peak.c"
    exe = tmp_path / "fp32_peak"
    build = subprocess.run(
        [cc, "-O2", "-march=native", "-pthread", "-DFMA_STEPS=200000L", "-DKERNEL_CALLS=2000L",
         str(src), "-o", str(exe)],
        capture_output=True, text=True,
    )  # fmt: skip
    if build.returncode != 0 and "needs AVX2+FMA" in build.stderr:
        pytest.skip("CPU without AVX2+FMA")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe), "2"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rates = re.findall(r"^(fma|kernel) +threads (\d): ([0-9.]+) GFLOP/s$", run.stdout, re.M)
    assert [(m, t) for m, t, _ in rates] == [("fma", "1"), ("kernel", "1"), ("fma", "2"),
                                             ("kernel", "2")]  # fmt: skip
    assert all(float(r) > 0 for _, _, r in rates)
    bad = subprocess.run([str(exe), "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_compiled_candidates_survive_a_quoted_only_argument(monkeypatch):
    """`xception bench --only "optimize(backend='compile')"`: inductor wrote that argument,
    unescaped, into each module it generated, which then failed to import. The bench compiles
    its candidates without that harness (the graph cache, which would hide it, is off)."""
    import sys

    import torch._inductor.config

    from xception import bench

    def tiny_compiled(batch: int):
        torch.manual_seed(0)
        net = torch.compile(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
        return bench._inference_step(net, torch.randn(batch, 4), torch.device("cpu"))

    tiny = bench._Candidate("tiny torch.compile", "inference", tiny_compiled, 1e-6)
    monkeypatch.setattr(bench, "_candidates", lambda **kwargs: [tiny])
    monkeypatch.setattr(sys, "argv", ["xception", "bench", "--only", "optimize(backend='compile')"])
    with torch._inductor.config.patch(fx_graph_cache=False):
        report = run_bench(quick=True, batches=(2,), train_batch=None, repeats=1)
    (result,) = report.results
    assert result.error is None and result.images_per_s > 0


def test_a_batch_size_given_twice_is_measured_once(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--only", "xception eager NCHW", "--batch", "1", "1",
            "--train-batch", "0", "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    rows = json.loads(out.read_text())["results"]
    assert [(r["name"], r["batch"]) for r in rows] == [("xception eager NCHW", 1)]


def test_the_plain_onnxruntime_peer_runs_on_the_benchs_threads(monkeypatch):
    """Its default session took every core while our runner followed --threads: the ratio
    compared 1 thread against 2. (A tiny stand-in for timm's model keeps the export short.)"""
    import onnxruntime
    import timm

    from xception.zoo import create_model

    monkeypatch.setattr(timm, "create_model", lambda name, num_classes: create_model(
        "xception-compact", num_classes=num_classes, width=0.25, middle_blocks=1))  # fmt: skip
    threads, real = [], onnxruntime.InferenceSession

    def session(path, options=None, **kwargs):
        threads.append(options.intra_op_num_threads if options is not None else None)
        return real(path, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_bench(size=75, batches=(1,), train_batch=None, repeats=1,
                           only="plain session")  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert [r.name for r in report.results] == ["timm onnxruntime fp32 (plain session)"]
    assert report.results[0].error is None and threads and set(threads) == {1}


def test_a_failed_candidate_makes_the_bench_exit_1_after_its_table(tmp_path, capsys, monkeypatch):
    """A failure was only an error row: the bench exited 0, and a script's `set -e` recorded
    the run as a result."""
    from xception import bench

    def broken(batch):
        raise RuntimeError("no kernel for this shape")

    bad = bench._Candidate("xception broken", "inference", broken, 1e-6)
    real = bench._candidates
    monkeypatch.setattr(bench, "_candidates", lambda **kwargs: [*real(**kwargs), bad])
    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--only", "xception eager NCHW", "broken", "--batch", "1",
            "--train-batch", "0", "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "error: RuntimeError: no kernel for this shape" in captured.out  # the table is kept
    assert "1 candidate(s) failed: xception broken" in captured.err
    assert json.loads(out.read_text())["results"][1]["error"].startswith("RuntimeError")
