"""bench.py: `xception bench --quick` runs on a tiny model and writes a well-formed table and
JSON; the pieces (matmul rate, candidate filter, errors) behave."""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xception import runtime
from xception.bench import BenchReport, Measurement, _gemms, matmul_rate, run_bench, save_json
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


def test_the_machine_record_says_when_and_under_which_thread_settings(monkeypatch):
    """benchmarks/openmp.sh's runs differ only in OpenMP's variables, and nothing in their
    reports said which was which (nor when any report was measured)."""
    import calendar
    import time

    from xception.bench import machine_info

    monkeypatch.setenv("OMP_PROC_BIND", "close")
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    monkeypatch.setenv("XCEPTION_UNRELATED", "1")
    info = machine_info(torch.device("cpu"))
    assert {"OMP_PROC_BIND": "close", "OMP_WAIT_POLICY": "active"}.items() <= info[
        "environment"
    ].items()
    assert "XCEPTION_UNRELATED" not in info["environment"]
    measured = calendar.timegm(time.strptime(info["date"], "%Y-%m-%d %H:%M UTC"))
    assert 0 <= time.time() - measured < 120


def test_bench_quick_cli_writes_table_and_json(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["bench", "--quick", "--json", str(out), "--markdown", str(md)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("task"))
    for column in ("batch", "candidate", "img/s", "ms/batch", "GFLOP/s", "of matmul",
                   "page faults"):  # fmt: skip
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
        assert isinstance(r["page_faults"], int) and r["page_faults"] >= 0
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


def _ours_at_batch_8(bf16):
    """Our compiled, ONNX Runtime, bfloat16 (faster, but never "our fastest fp32" path) and
    int8 inference at batch 8."""
    inf = "inference"
    return [
        _measured("xception optimize(backend='compile')", inf, 8, [0.80, 0.90, 0.85]),
        _measured("xception onnxruntime fp32", inf, 8, [0.70, 0.75, 0.72]),
        _measured("xception optimize(backend='compile', dtype=bfloat16)", inf, 8, bf16),
        _measured("xception onnxruntime int8", inf, 8, [0.25, 0.24, 0.26]),
    ]


def test_comparisons_pick_our_fastest_fp32_paths_and_pair_the_rounds():
    inf, tr = "inference", "training"
    results = [
        *_ours_at_batch_8(bf16=[0.4] * 3),
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
        "fastest fp32 inference vs the fastest fp32 peer",
        "training step vs timm's, channels_last",
        "fastest fp32 training step vs the fastest fp32 peer",
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
    assert len(table) == 2 + 6 and ">= 1.30: not met" in table[-2]


def test_every_peer_is_compared_with_our_fastest_path_of_the_same_precision():
    """The peers the bench times besides timm eager and ONNX Runtime (compiled, OpenVINO,
    Keras): our fastest path is set against whichever is fastest, fp32 with fp32 and bf16
    with bf16; timm's graph on our runner is ours, not a peer."""
    inf, tr = "inference", "training"
    results = [
        *_ours_at_batch_8(bf16=[0.45] * 3),
        _measured("timm eager channels_last", inf, 8, [1.30, 1.20, 1.40]),
        _measured("timm torch.compile channels_last", inf, 8, [0.95, 1.0, 0.9]),
        _measured("timm onnxruntime fp32 (our runner)", inf, 8, [0.60] * 3),  # not a peer
        _measured("timm openvino fp32", inf, 8, [0.70, 0.80, 0.74]),
        _measured("timm openvino bf16", inf, 8, [0.40, 0.36, 0.38]),  # faster, not fp32
        _measured("keras Xception (torch backend)", inf, 8, [1.8, 1.7, 1.9]),
        _measured("timm openvino fp32", inf, 1, [0.2] * 2, error="RuntimeError: x"),  # failed
        _measured("xception onnxruntime fp32", inf, 1, [0.1] * 2),
        _measured("xception train channels_last", tr, 8, [3.0, 3.2, 3.1]),
        _measured("xception train NCHW", tr, 8, [4.0] * 3),
        _measured("timm train channels_last", tr, 8, [3.1, 3.0, 3.4]),
        _measured("timm train channels_last, torch.compile", tr, 8, [2.9, 3.3, 3.0]),
    ]
    report = BenchReport(machine={"device": "cpu"}, settings={}, matmul_gflop_per_s=200.0,
                         results=results)  # fmt: skip
    got = {(c.what, c.batch): c for c in report.comparisons()}
    fp32 = got["fastest fp32 inference vs the fastest fp32 peer", 8]
    assert (fp32.ours, fp32.peer) == ("xception onnxruntime fp32", "timm openvino fp32")
    assert fp32.ratio == pytest.approx(0.74 / 0.72) and fp32.target is None and fp32.met is None
    assert fp32.round_ratios == pytest.approx([0.70 / 0.70, 0.80 / 0.75, 0.74 / 0.72])
    bf16 = got["fastest bf16 inference vs the fastest bf16 peer", 8]
    assert (bf16.ours, bf16.peer) == ("xception optimize(backend='compile', dtype=bfloat16)",
                                      "timm openvino bf16")  # fmt: skip
    assert bf16.ratio == pytest.approx(0.38 / 0.45)  # a peer that is faster shows below 1
    train = got["fastest fp32 training step vs the fastest fp32 peer", 8]
    assert (train.ours, train.peer) == ("xception train channels_last",
                                        "timm train channels_last, torch.compile")  # fmt: skip
    # The targets' rows are unchanged by the new peers.
    assert got["fastest PyTorch fp32 inference vs timm eager channels_last", 8].peer == (
        "timm eager channels_last")  # fmt: skip
    # At batch 1 the only peer failed: no peer comparison there.
    assert not [c for c in got.values() if c.batch == 1 and "peer" in c.what]
    # On CUDA every candidate is bfloat16 and the fastest of all the peers is the peer.
    cuda = BenchReport(machine={"device": "cuda:0"}, settings={}, matmul_gflop_per_s=1e5,
                       results=results)  # fmt: skip
    rows = {(c.what, c.batch): c for c in cuda.comparisons()}
    assert rows["fastest inference vs the fastest peer", 8].peer == "timm openvino bf16"
    assert not [what for what, _ in rows if "bf16" in what]


def _script(name: str):
    """benchmarks/NAME.py as a module."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_targets_summary_takes_the_median_of_each_runs_lower_ratio():
    module = _script("targets_summary")

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
    assert len(table) == 4  # the target's row, then the same pair as "the fastest peer"
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[3:] == ["1.400 (1.400)", "1.500 (1.200)", "1.100 (1.100)", "1.200",
                         ">= 1.30: not met"]  # fmt: skip
    assert table[3].endswith("| 1.200 | - |")  # no target on it


def test_targets_summary_refuses_runs_of_different_machines_or_settings(tmp_path):
    """Its docstring's `targets-*.json` took the committed Zen 3 runs with the Zen 4 ones and
    gave medians of both machines' ratios (int8: 1.83x, where Zen 4's runs were all 2.97-3.11x)."""
    script = Path(__file__).parents[1] / "benchmarks" / "targets_summary.py"

    def run(name, cpu="Zen 4", size=299):
        results = [_measured("xception train channels_last", "training", 8, [1.0, 1.0]),
                   _measured("timm train channels_last", "training", 8, [1.3, 1.3])]  # fmt: skip
        report = BenchReport(machine={"device": "cpu", "cpu": cpu, "torch_threads": 2},
                             settings={"size": size, "quick": False}, matmul_gflop_per_s=1.0,
                             results=results)  # fmt: skip
        save_json(report, tmp_path / name)
        return str(tmp_path / name)

    def summarise(*paths):
        return subprocess.run([sys.executable, str(script), *paths], capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    one, two = run("a.json"), run("b.json")
    assert summarise(one, two).returncode == 0
    for other in (run("zen3.json", cpu="Zen 3"), run("small.json", size=150)):
        done = summarise(one, two, other)
        assert done.returncode == 1 and not done.stdout
        error = done.stderr.strip()
        assert (
            len(error.splitlines()) == 1 and f"{one} and {other} were not measured alike" in error
        )
        assert "'Zen 4' against 'Zen 3'" in error or "299 against 150" in error


def test_a_failed_cuda_graphs_run_leaves_the_complete_results_file_in_place(tmp_path, monkeypatch):
    """benchmarks/cuda_graphs.py wrote its JSON after each step: rerun over a complete file and
    stopped after the first (out of memory, the GPU session's time limit), it left that step's
    results in its place."""
    pytest.importorskip("timm")
    module = _script("cuda_graphs")

    def infer(res, save):  # the first step done and saved, then a failure
        res["compile_graphs_s"] = 60.0
        save()
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a GPU")
    monkeypatch.setattr(module, "infer", infer)
    out = tmp_path / "cuda-graphs.json"
    out.write_text('{"complete": true}')
    monkeypatch.setattr(sys, "argv", ["cuda_graphs.py", "infer", str(out)])
    with pytest.raises(RuntimeError, match="out of memory"):
        module.main()
    assert out.read_text() == '{"complete": true}'
    assert json.loads((tmp_path / "cuda-graphs.json.partial").read_text())["compile_graphs_s"] == 60

    def infer(res, save):  # every step done
        res["infer"] = {"8": {"timm eager CL AMP": 1000.0}}
        save()

    monkeypatch.setattr(module, "infer", infer)
    module.main()
    assert json.loads(out.read_text())["infer"] == {"8": {"timm eager CL AMP": 1000.0}}
    assert not (tmp_path / "cuda-graphs.json.partial").exists()


def test_page_faults_per_step_are_the_steps_own(monkeypatch):
    """Each result holds the median page faults of its timed steps: a step that writes into
    memory fresh from the kernel counts one per page, one that reuses its memory none, and a
    peer in another process (Keras) reports the faults it counted there."""
    import mmap

    from xception import bench

    pages = 2048

    def fresh() -> None:  # an anonymous mapping: every page faults on its first write
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
            for i in range(pages):
                m[i * mmap.PAGESIZE] = 1

    kept = torch.zeros(pages * mmap.PAGESIZE // 4)

    class Elsewhere:
        page_faults = 12345

        def __call__(self) -> None:
            fresh()  # faults here, but the step reports the other process's count

    steps = {"fresh": fresh, "reused": lambda: kept.fill_(1.0), "elsewhere": Elsewhere()}
    group = [bench._Candidate(name, "inference", lambda batch, s=step: s, 1.0)
             for name, step in steps.items()]  # fmt: skip
    results = {r.name: r for r in bench._measure(group, 1, 8, 3, 100.0, 0.0, lambda m: None)}
    if bench.page_faults() is None:
        pytest.skip("this system does not count page faults")
    assert pages <= results["fresh"].page_faults < pages + 200
    assert results["reused"].page_faults < 50
    assert results["elsewhere"].page_faults == 12345


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


def _fake_checkout(tmp_path, fails_on_run: int | None):
    """benchmarks/*.sh in a copy of the checkout's layout whose `xception bench` only writes
    "new" into its --json and --markdown files and exits 1 (a candidate's error row) on its
    `fails_on_run`-th call; `flock` runs its command (pytest may hold the real lock)."""
    from helpers import fake_bench_checkout

    return fake_bench_checkout(
        tmp_path, ("common.sh", "run_all.sh", "targets.sh", "allocator.sh"),
        f"echo call >> {tmp_path}/calls\n"
        'while (($#)); do case $1 in --json|--markdown) echo new > "$2"; shift;; esac; shift; done\n'
        "echo the table\n"
        f"[[ $(wc -l < {tmp_path}/calls) != {fails_on_run} ]]\n",
    )  # fmt: skip


@pytest.mark.parametrize(("script", "args", "files", "fails_on_run"), [
    ("run_all.sh", [], ["machine.txt", "bench-299.json", "bench-299.md", "bench-299.txt"], 1),
    ("targets.sh", ["2"], ["targets-1.json", "targets-1.md", "targets.md"], 2),
    ("allocator.sh", [], ["allocator-default.json", "allocator-tunables.json"], 2),
])  # fmt: skip
def test_a_failed_benchmark_script_leaves_the_last_good_results(tmp_path, script, args, files,
                                                                fails_on_run):  # fmt: skip
    """The scripts wrote each bench's files straight over the committed ones: a run that failed
    (or was interrupted) left a mix of two series (targets-1 new, targets-2 and targets.md
    old; run_all.sh: the new machine.txt, JSON and Markdown with the old table)."""
    root, out, env = _fake_checkout(tmp_path, fails_on_run)
    for name in files:
        (out / name).write_text("good\n")
    done = subprocess.run(["bash", str(root / "benchmarks" / script), *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert {p.name: p.read_text() for p in out.iterdir()} == dict.fromkeys(files, "good\n")
    if script == "run_all.sh":  # and once the bench succeeds, all of them are its
        root, out, env = _fake_checkout(tmp_path / "again", fails_on_run=None)
        done = subprocess.run(["bash", str(root / "benchmarks" / script)], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(files)
        assert (out / "bench-299.json").read_text() == "new\n"
        assert (out / "bench-299.txt").read_text() == "the table\n"


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


def _tiny_timm(monkeypatch):
    """timm's model replaced by a tiny stand-in (the peers' code paths, in seconds)."""
    import timm

    from xception.zoo import create_model

    def make(name, num_classes):
        return create_model("xception-compact", num_classes=num_classes, width=0.25,
                            middle_blocks=1)  # fmt: skip

    monkeypatch.setattr(timm, "create_model", make)
    torch.manual_seed(0)  # as the bench seeds each peer it builds
    return make("legacy_xception", num_classes=10).eval()


def _peer_candidates(tmp_path, size=75):
    from xception import bench

    found = bench._candidates(size=size, quick=False, device=torch.device("cpu"),
                              workdir=tmp_path, model_kwargs=dict(num_classes=10))  # fmt: skip
    return {c.name: c for c in found}


def _bench_input(batch, size=75):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def test_the_openvino_peer_runs_every_image_in_the_precision_it_names(tmp_path, monkeypatch):
    """OpenVINO's default precision on a CPU with bfloat16 units is bfloat16: the fp32 row
    must ask for f32, and one request per image must give back every image, in order."""
    pytest.importorskip("openvino")
    import openvino

    from xception import deploy

    peer = _tiny_timm(monkeypatch)
    candidates = _peer_candidates(tmp_path)
    with torch.no_grad():
        expected = peer(_bench_input(3))
    compiled = []

    class Core(openvino.Core):  # records how each model was compiled
        def compile_model(self, *args, **kwargs):
            net = super().compile_model(*args, **kwargs)
            compiled.append((net.get_property("INFERENCE_NUM_THREADS"),
                             str(net.get_property("INFERENCE_PRECISION_HINT"))))  # fmt: skip
            return net

    monkeypatch.setattr(openvino, "Core", Core)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = candidates["timm openvino fp32"].build(3)()
    finally:
        torch.set_num_threads(before)
    # On the bench's threads (--threads), as every other candidate.
    assert compiled == [(1, "<Type: 'float32'>")]
    assert got.shape == (3, 10)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)  # bf16 would be 1e-4 off here
    if deploy.cpu_native_bf16():
        low = candidates["timm openvino bf16"].build(3)()
        assert torch.allclose(low, expected, atol=2e-3, rtol=0)
        assert not torch.allclose(low, expected, atol=1e-6, rtol=0)  # it is bfloat16
    else:
        assert "timm openvino bf16" not in candidates


def test_the_compiled_peer_is_frozen_and_gives_the_peers_outputs(tmp_path, monkeypatch):
    """timm compiled as its users would on the CPU: inductor's freezing flag is on while
    Dynamo traces (the first calls), which is what makes it freeze (torch 2.14)."""
    from torch._inductor import config as inductor_config

    peer = _tiny_timm(monkeypatch)
    seen = []

    def compile_spy(model, *args, **kwargs):  # runs eager, records the flag at each call
        def call(x):
            seen.append(inductor_config.freezing)
            return model(x)

        return call

    monkeypatch.setattr(torch, "compile", compile_spy)
    step = _peer_candidates(tmp_path)["timm torch.compile channels_last"].build(2)
    assert seen == [True, True]  # both warm-up calls
    assert inductor_config.freezing is False  # and not left on for the other candidates
    with torch.no_grad():
        assert torch.allclose(step(), peer(_bench_input(2)), atol=1e-5)


def test_the_compiled_training_peer_steps_through_the_compiled_model(tmp_path, monkeypatch):
    _tiny_timm(monkeypatch)
    compiled = []

    def compile_spy(model, *args, **kwargs):
        def call(x):
            compiled.append(x.shape)
            return model(x)

        return call

    monkeypatch.setattr(torch, "compile", compile_spy)
    candidate = _peer_candidates(tmp_path)["timm train channels_last, torch.compile"]
    assert candidate.task == "training"
    step = candidate.build(2)  # one warm-up step
    step()
    assert compiled == [(2, 3, 75, 75)] * 2  # every step, through the compiled model
    # Our own compiled step is the engine's --compile, which the bench times on CUDA only
    # (on the CPU it is slower than eager: BENCHMARKS.md).
    names = [c for c in _peer_candidates(tmp_path) if c.startswith("xception train")]
    assert not [n for n in names if "compile" in n]


def test_the_keras_peer_runs_keras_xception_in_a_process_of_its_own(tmp_path):
    """Keras' Xception on the torch backend, run in a child process: in the bench's process, one
    call of it stopped timm's eager model page-faulting (1.5x faster), which would have made the
    peers' speeds depend on which others ran."""

    from xception import bench

    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported on another backend")
    candidates = _peer_candidates(tmp_path)
    # Its GFLOP count is the paper's model's (ours matches Keras layer for layer).
    assert (candidates["keras Xception (torch backend)"].gflop_per_image
            == candidates["xception eager NCHW"].gflop_per_image)  # fmt: skip
    peer = bench._KerasChild(75, 2, 10)
    process = peer._process
    assert process.poll() is None and process.pid != os.getpid()
    first, second = peer(), peer()
    assert first.shape == (2, 10) and torch.isfinite(first).all()
    assert isinstance(peer.page_faults, int) and peer.page_faults >= 0  # the child's own count
    assert torch.equal(first, second)  # the same batch every step, in inference mode
    assert torch.allclose(first.sum(dim=1), torch.ones(2), atol=1e-5)  # Keras' softmax top
    del peer
    assert process.wait(10) == 0  # it ends with its socket


def test_the_keras_peer_does_not_rerun_the_callers_script(tmp_path):
    """multiprocessing's spawn re-ran the caller's main script in the Keras child: a script
    calling the bench without an `if __name__ == "__main__":` guard ran its whole bench a
    second time in the child, which then failed on its own nested child."""
    pytest.importorskip("keras")
    log = tmp_path / "runs.txt"
    script = tmp_path / "user_script.py"
    # Keras refuses 32 pixels (it needs 71) in the child, before building anything: the child
    # is started all the same, and its error comes back in one line.
    script.write_text(
        "import os\n"
        "from xception import bench\n"
        f"open({str(log)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "try:\n"
        "    bench._KerasChild(32, 1, 10)\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    env = dict(os.environ, KERAS_BACKEND="torch")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("Keras peer: ValueError: ") and "71" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
    assert len(log.read_text().split()) == 1  # the script ran once: in its own process only


def test_ctrl_c_during_a_keras_step_leaves_no_traceback_of_the_child(tmp_path):
    """Ctrl-C reaches the terminal's whole process group: the Keras child printed a
    KeyboardInterrupt traceback under the bench's "interrupted", or, finishing its step after
    the bench had gone, a BrokenPipeError one."""
    pytest.importorskip("keras")
    script = tmp_path / "interrupted.py"
    script.write_text(
        "import os, signal\n"
        # As at a terminal: a shell's background job (CI run with &) inherits SIGINT ignored,
        # and this script then waited in pause() for a signal that never came.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from xception import bench\n"
        "peer = bench._KerasChild(75, 1, 10)\n"
        "peer._conn.send('step')\n"  # a step under way, as the user presses Ctrl-C
        "try:\n"
        "    os.killpg(0, signal.SIGINT)\n"
        "    signal.pause()\n"  # ours arrives here
        "except KeyboardInterrupt:\n"
        "    peer._conn.close()\n"  # the bench leaves without the step's logits
        "    print('child', peer._process.wait(30))\n"
    )
    env = dict(os.environ, KERAS_BACKEND="torch")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300, start_new_session=True)  # fmt: skip
    assert done.stdout == "child 0\n", done.stdout + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_keras_on_another_backend_leaves_its_peer_out_with_a_reason(monkeypatch, caplog):
    import types

    from xception import bench

    fake = types.SimpleNamespace(backend=types.SimpleNamespace(backend=lambda: "jax"))
    monkeypatch.setitem(__import__("sys").modules, "keras", fake)
    with caplog.at_level("INFO", logger="xception.bench"):
        assert bench._keras_usable() is False
    assert "set KERAS_BACKEND=torch" in caplog.text
    fake.backend.backend = lambda: "torch"
    assert bench._keras_usable() is True


def _tiny_step(fail_on_call: int | None = None, err: Exception | None = None):
    """A candidate's builder whose step fails on its `fail_on_call`-th call with `err` (no
    warm-up here: call 1 is the first timed round)."""

    def build(batch):
        calls = []

        def step():
            calls.append(1)
            if len(calls) == fail_on_call:
                raise err or RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return step

    return build


def test_a_candidate_failing_in_a_timed_round_is_an_error_row(tmp_path, capsys, monkeypatch):
    """A step that failed after its warm-up (out of memory, the Keras peer's process gone)
    sank the whole bench with a traceback: no table, no JSON, the others' rounds lost."""
    from xception import bench

    group = [bench._Candidate("xception good", "inference", _tiny_step(), 1e-6),
             bench._Candidate("xception flaky", "inference", _tiny_step(2), 1e-6),
             bench._Candidate("timm good", "inference", _tiny_step(), 1e-6)]  # fmt: skip
    monkeypatch.setattr(bench, "_candidates", lambda **kwargs: group)
    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--batch", "8", "--train-batch", "0", "--repeats", "3",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "1 candidate(s) failed: xception flaky" in captured.err
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    flaky = rows["xception flaky"]
    assert flaky["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert flaky["rounds"] == 1 and flaky["images_per_s"] is None  # no figure from one round
    for name in ("xception good", "timm good"):  # the others ran every round
        assert rows[name]["error"] is None and rows[name]["rounds"] == 3
    assert "error: RuntimeError: CUDA out of memory" in captured.out


def test_a_candidate_failing_without_a_message_is_an_error_row():
    """A bare `assert` in a library raises AssertionError(''): its row's first line was
    taken from an empty list, and the IndexError sank the bench."""
    from xception import bench

    def broken(batch):
        raise AssertionError()

    group = [bench._Candidate("xception broken", "inference", broken, 1e-6),
             bench._Candidate("xception flaky", "inference", _tiny_step(1, KeyError()), 1e-6),
             bench._Candidate("xception good", "inference", _tiny_step(), 1e-6)]  # fmt: skip
    results = {r.name: r for r in bench._measure(group, 1, 8, 2, 100.0, 0.0, lambda m: None)}
    assert results["xception broken"].error == "AssertionError"
    assert results["xception flaky"].error == "KeyError"
    assert results["xception good"].error is None and results["xception good"].rounds == 2


def test_an_only_text_naming_training_steps_needs_a_training_batch(tmp_path, capsys):
    """`--only train --train-batch 0` timed nothing, wrote an empty table and exited 0; with
    another text beside it, the training text was dropped without a word."""
    with pytest.raises(ValueError, match=r"^'train channels_last' names only training steps, "
                       r"and none is timed without a training batch"):  # fmt: skip
        run_bench(quick=True, size=32, batches=(1,), train_batch=None, repeats=1,
                  only=("xception eager NCHW", "train channels_last"))  # fmt: skip
    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--only", "train", "--train-batch", "0", "--json", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'train' names only training steps" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # The candidates a text may name are those timed: without training, none of the steps.
    with pytest.raises(ValueError, match="the candidates here are") as info:
        run_bench(quick=True, size=32, batches=(1,), train_batch=None, repeats=1, only="zzz")
    assert "train" not in str(info.value)


def test_speed_targets_are_held_only_for_the_papers_model_at_299():
    """A --quick run (a quarter-width model at 64 pixels) or another --size at batch 8 printed
    '>= 1.60: met' as if the targets, set for the paper's model at 299x299, had been met."""
    results = _ours_at_batch_8(bf16=[0.4] * 3)

    def targets(settings):
        report = BenchReport(machine={"device": "cpu"}, settings=settings,
                             matmul_gflop_per_s=200.0, results=results)  # fmt: skip
        return {c.what: c.target for c in report.comparisons()}

    assert targets(dict(size=299, quick=False))["int8 vs our fastest fp32 inference"] == 1.6
    for settings in (dict(size=64, quick=True), dict(size=299, quick=True),
                     dict(size=224, quick=False)):  # fmt: skip
        assert set(targets(settings).values()) == {None}, settings


def test_json_and_markdown_in_one_file_is_refused(tmp_path, capsys, monkeypatch):
    """The Markdown table was written over the JSON report, which was lost, with exit 0."""
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--quick", "--only", "eager NCHW", "--train-batch", "0", "--json",
            "b.out", "--markdown", str(tmp_path / "b.out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--json and --markdown both name" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.out").exists()  # refused before the benchmark


@pytest.mark.parametrize("flag", ["--json", "--markdown"])
def test_an_empty_output_name_is_refused_before_the_benchmark(tmp_path, capsys, monkeypatch, flag):
    """`--json ""` ran the whole bench, then lost it: "[Errno 16] Device or resource busy:
    '..x.tmp' -> '.'"; `--markdown ""` wrote no table and said nothing."""
    from xception import bench

    def run_bench(**kwargs):
        raise AssertionError("benchmarked")

    monkeypatch.setattr(bench, "run_bench", run_bench)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--quick", flag, ""])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: an empty path (an unset shell variable?)" in err
    assert list(tmp_path.iterdir()) == []


def test_a_quick_size_below_the_models_minimum_names_the_smallest(tmp_path, capsys):
    """`xception bench --quick --size 6` failed with the model's advice for images: 'resize the
    images, or use a compact preset', neither of which a bench can do."""
    with pytest.raises(ValueError, match=r"^size=6 is too small for the quick model: use at "
                       r"least 7$"):  # fmt: skip
        run_bench(quick=True, size=6, batches=(1,), train_batch=None, repeats=1)
    assert main(["bench", "--quick", "--size", "6", "--json", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "use at least 7" in err and "resize" not in err
    report = run_bench(quick=True, size=7, batches=(1,), train_batch=None, repeats=1,
                       only="eager NCHW")  # fmt: skip
    assert report.results[0].error is None and report.results[0].images_per_s > 0


# --- cases a mutation pass over bench.py found untested ---
class _FakeClock:
    """Stands in for bench's `time`: `perf_counter` reads a clock that only the fake steps
    and `sleep` move, so every duration the bench measures is known in advance."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_measure_reports_medians_of_interleaved_rounds_from_a_fake_clock(monkeypatch):
    from xception import bench

    clock, calls, faults = _FakeClock(), [], [0]
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "page_faults", lambda: faults[0])

    def builder(name, seconds, pages):
        def build(batch):
            clock.now += 50.0  # building and warming up: never timed
            it = iter(zip(seconds, pages, strict=True))

            def step():
                calls.append(name)
                s, p = next(it)
                clock.now += s
                faults[0] += p

            return step

        return build

    group = [bench._Candidate("a", "inference", builder("a", [3.0, 1.0, 2.0], [10, 100, 20]), 0.5),
             bench._Candidate("b", "inference", builder("b", [5.0, 4.0, 9.0], [0, 0, 0]), 2.0)]  # fmt: skip
    a, b = bench._measure(group, 4, 8, 3, 10.0, 7.0, lambda m: None)
    assert calls == ["a", "b"] * 3  # one step of each per round
    assert a.round_seconds == [3.0, 1.0, 2.0] and a.rounds == 3  # the pause is not timed
    assert a.ms_per_batch == pytest.approx(2000.0)  # median 2 s
    assert a.images_per_s == pytest.approx(4 / 2.0) and a.best_images_per_s == pytest.approx(4.0)
    assert a.gflop_per_s == pytest.approx(2.0 * 0.5) and a.fraction_of_matmul == pytest.approx(0.1)
    assert a.page_faults == 20  # the median step's, not the mean (43)
    assert b.round_seconds == [5.0, 4.0, 9.0] and b.ms_per_batch == pytest.approx(5000.0)
    # the median round, not the mean (6 s): one slow spell does not move it
    assert b.images_per_s == pytest.approx(0.8) and b.best_images_per_s == pytest.approx(1.0)
    assert b.gflop_per_s == pytest.approx(1.6) and b.fraction_of_matmul == pytest.approx(0.16)
    assert b.page_faults == 0


def test_matmul_rate_is_the_faster_gemms_median_without_its_warm_up(monkeypatch):
    from xception import bench

    clock = _FakeClock()
    monkeypatch.setattr(bench, "time", clock)

    def gemm(seconds):  # the first call is the warm-up (100 s): never timed
        it = iter(seconds)

        def product():
            clock.now += next(it)

        return product

    monkeypatch.setattr(bench, "_gemms", lambda a, b: [gemm([100.0, 0.5, 0.25, 1.0]),
                                                       gemm([100.0, 0.2, 0.4, 0.3])])  # fmt: skip
    # 2 n^3 FLOP per product; medians 0.5 s and 0.3 s: the faster library sets the rate.
    assert bench.matmul_rate(n=100, repeats=3) == pytest.approx(2 * 100**3 / 0.3 / 1e9)


def test_a_target_is_met_when_the_lower_ratio_reaches_it_exactly():
    from xception.bench import Comparison

    c = Comparison("w", "training", 8, "ours", "peer", 1.5, 1.3, [1.3], target=1.3)
    assert c.lower_ratio == 1.3 and c.met is True
    assert dataclasses.replace(c, paired_ratio=1.2999).met is False


def test_targets_are_held_at_batch_8_and_299_pixels_only():
    def targets(batch, size):
        results = [dataclasses.replace(r, batch=batch) for r in _ours_at_batch_8([0.4] * 3)]
        report = BenchReport(machine={"device": "cpu"}, settings=dict(size=size, quick=False),
                             matmul_gflop_per_s=200.0, results=results)  # fmt: skip
        return {c.what: c.target for c in report.comparisons()}

    assert targets(8, 299)["int8 vs our fastest fp32 inference"] == 1.6
    assert set(targets(16, 299).values()) == {None}
    assert set(targets(8, 320).values()) == {None}


def test_a_result_without_rounds_is_left_out_of_the_comparisons():
    inf = "inference"
    results = [*_ours_at_batch_8(bf16=[0.4] * 3),
               Measurement("xception eager channels_last", inf, 8, 299),  # no rounds, no figures
               _measured("timm eager channels_last", inf, 8, [1.30, 1.20, 1.40])]  # fmt: skip
    report = BenchReport(machine={"device": "cpu"}, settings={}, matmul_gflop_per_s=200.0,
                         results=results)  # fmt: skip
    got = {c.what: c for c in report.comparisons()}
    pytorch = got["fastest PyTorch fp32 inference vs timm eager channels_last"]
    assert pytorch.ours == "xception optimize(backend='compile')"


def test_table_rows_put_each_figure_in_its_column():
    ok = Measurement("xception a", "inference", 8, 299, images_per_s=12.345,
                     ms_per_batch=648.04, best_images_per_s=13.5, gflop_per_image=16.8,
                     gflop_per_s=207.4, fraction_of_matmul=0.514, rounds=2,
                     round_seconds=[0.6, 0.7], page_faults=1234567)  # fmt: skip
    bad = Measurement("xception b", "inference", 8, 299, error="RuntimeError: shape a|b")
    report = BenchReport(machine={"device": "cpu"}, settings={}, matmul_gflop_per_s=403.5,
                         results=[ok, bad])  # fmt: skip
    assert report.rows() == [
        ["inference", "8", "xception a", "12.35", "13.50", "648.0", "207.4", "51%", "1,234,567", ""],
        ["inference", "8", "xception b", "-", "-", "-", "-", "-", "-",
         "error: RuntimeError: shape a|b"],
    ]  # fmt: skip
    lines = report.to_markdown().splitlines()
    assert len(lines) == 4 and lines[1] == "|---" * 9 + "|"
    # The error stands in the img/s column, its "|" escaped so the row keeps its 9 cells.
    assert lines[3] == ("| inference | 8 | xception b | error: RuntimeError: shape a\\|b | - | - "
                        "| - | - | - |")  # fmt: skip


def test_comparison_rows_give_the_range_of_the_round_ratios():
    results = [_measured("xception train channels_last", "training", 8, [1.0, 1.0, 1.0]),
               _measured("timm train channels_last", "training", 8, [1.5, 1.25, 2.0])]  # fmt: skip
    report = BenchReport(machine={"device": "cpu"}, settings={"size": 299}, matmul_gflop_per_s=1.0,
                         results=results)  # fmt: skip
    row = report.comparison_rows()[0]
    assert row[2:] == ["training step vs timm's, channels_last", "xception train channels_last",
                       "timm train channels_last", "1.500", "1.500 (1.25-2.00)",
                       ">= 1.30: met"]  # fmt: skip


def test_find_tells_batch_sizes_apart():
    one = _measured("xception a", "inference", 1, [0.1])
    eight = _measured("xception a", "inference", 8, [0.5])
    report = BenchReport(machine={}, settings={}, matmul_gflop_per_s=1.0, results=[one, eight])
    assert report.find("xception a", "inference", 8) is eight
    assert report.find("xception a", "inference", 1) is one
    assert report.find("xception a", "training", 8) is None


def test_run_bench_refuses_zero_and_missing_batches():
    tiny = dict(quick=True, size=32, repeats=1, only="eager NCHW")
    with pytest.raises(ValueError, match="at least 1"):
        run_bench(batches=(0,), train_batch=None, **tiny)
    with pytest.raises(ValueError, match="at least 1"):
        run_bench(batches=(1,), train_batch=0, **tiny)
    with pytest.raises(ValueError, match="batches must not be empty"):
        run_bench(batches=(), train_batch=None, **tiny)
    with pytest.raises(ValueError, match="too small for the 299-pixel models"):
        run_bench(size=74, batches=(1,), train_batch=None, repeats=1, only="zzz")


def test_run_bench_records_its_settings_and_times_in_the_order_asked():
    report = run_bench(quick=True, size=32, batches=(2, 1), train_batch=3, repeats=1,
                       only=("eager NCHW", "train channels_last"))  # fmt: skip
    assert report.settings == dict(
        size=32, batches=[2, 1], train_batch=3, repeats=1, quick=True,
        only=("eager NCHW", "train channels_last"),
        model=dict(num_classes=1000, width=0.25, middle_blocks=1), matmul_dtype="float32",
    )  # fmt: skip
    assert [(r.name, r.task, r.batch) for r in report.results] == [
        ("xception eager NCHW", "inference", 2),
        ("xception eager NCHW", "inference", 1),
        ("xception train channels_last", "training", 3),
    ]


def test_the_machine_record_has_the_benchs_threads_and_every_kernel_variable(monkeypatch):
    from xception.bench import machine_info

    names = ["OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_DEBUG_CPU_TYPE",
             "DNNL_VERBOSE", "ONEDNN_MAX_CPU_ISA", "TORCHINDUCTOR_FREEZING"]  # fmt: skip
    for name in names:
        monkeypatch.setenv(name, "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = machine_info(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert info["torch_threads"] == 1
    assert set(names) <= set(info["environment"])


def test_an_error_row_holds_the_first_line_cut_to_200_characters():
    from xception.bench import _error_text

    assert _error_text(ValueError("first\nsecond")) == "ValueError: first"
    assert _error_text(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 200


def test_keras_not_yet_imported_runs_on_torch_unless_the_user_chose(monkeypatch):
    import importlib.abc
    import importlib.util
    import types

    from xception import bench

    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setattr(bench, "_installed", lambda package: True)
    assert bench._keras_usable() is True  # keras' own default is TensorFlow: the bench's, torch

    fake = types.ModuleType("keras")

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):  # `import keras`: the fake
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "keras" else None

        def create_module(self, spec):
            return fake

        def exec_module(self, module):
            pass

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert bench._keras() is fake and os.environ["KERAS_BACKEND"] == "jax"  # the user's choice
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.delenv("KERAS_BACKEND")
    assert bench._keras() is fake and os.environ["KERAS_BACKEND"] == "torch"


def test_gflop_counts_two_flop_per_multiply_accumulate():
    from xception.bench import _gflop

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1))
    assert _gflop(conv, 10) == pytest.approx(2 * (8 * 10 * 10) * (3 * 3 * 3) / 1e9)


def test_the_training_step_is_a_plain_fp32_sgd_step_in_training_mode():
    from xception import bench

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6),
                                   torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 5))  # fmt: skip

    x = torch.randn(4, 3, 2, 2)
    net, reference = model().eval(), model()
    dtypes = []
    net[-1].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    torch.manual_seed(5)
    target = torch.randint(0, 5, (4,))
    torch.manual_seed(5)
    step = bench._training_step(net, x, 5, torch.device("cpu"))  # one warm-up step
    step()
    assert net.training and dtypes == [torch.float32] * 2  # no autocast on the CPU by default
    opt = torch.optim.SGD(reference.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(2):  # the same two steps, by hand
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), target).backward()
        opt.step()
    for got, want in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-7, rtol=0)


def test_the_inference_step_runs_in_inference_mode():
    from xception import bench

    seen = []

    def fn(x):
        seen.append(torch.is_inference_mode_enabled())
        return x * 2

    step = bench._inference_step(fn, torch.ones(2), torch.device("cpu"))
    out = step()
    assert seen == [True] * 3 and out.is_inference()


def test_ort_ops_counts_every_flop_of_the_model_and_bounds_what_the_graph_could_win(tmp_path):
    """benchmarks/ort_ops.py (the op-by-op profile behind BENCHMARKS.md's bound on graph changes
    for ONNX Runtime) must see every kernel the session runs and rate it on its true FLOPs: its
    FLOPs add up to the model's own count, and each kind's kernels to the model's convs. The
    widths are multiples of 16, so ONNX Runtime's blocked layout pads no channel."""
    pytest.importorskip("onnxruntime")
    from xception import Xception
    from xception.deploy import export
    from xception.model import count_macs

    ort_ops = _script("ort_ops")
    model = Xception(width=0.5, middle_blocks=1, num_classes=10).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.out_channels % 16 == 0 for c in convs)
    export(model, tmp_path / "m.onnx", "onnx", input_size=71, check_batches=(1,))
    out_json, out_md = tmp_path / "ops.json", tmp_path / "ops.md"
    argv = ["--onnx", str(tmp_path / "m.onnx"), "--size", "71", "--runs", "2", "--warmup", "1"]
    assert ort_ops.main([*argv, "--json", str(out_json), "--markdown", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    summary = result["summary"]
    assert summary["gflop"] == pytest.approx(2 * count_macs(model, 71) / 1e9, rel=1e-9)
    kinds = summary["kinds"]
    depthwise = [c for c in convs if c.groups == c.in_channels > 1]
    pointwise = [c for c in convs if c.kernel_size == (1, 1)]
    assert kinds["depthwise conv"]["kernels"] == len(depthwise)
    assert kinds["pointwise conv"]["kernels"] == len(pointwise)
    assert kinds["other conv"]["kernels"] == len(convs) - len(depthwise) - len(pointwise) == 2
    assert kinds["gemm"]["kernels"] == 1
    assert summary["kernel_ms"] == pytest.approx(sum(r["ms"] for r in result["rows"]))
    # The bound: every FLOP at the reference group's rate, which is its own rate.
    ref = summary["reference"]
    same = [r for r in result["rows"] if r["op"] == ref["op"] and r["outputs"] == ref["outputs"]
            and r["inputs"][1:] == ref["inputs"][1:]]  # fmt: skip
    assert len(same) == ref["kernels"] >= 1
    rate = sum(r["gflop"] for r in same) / sum(r["ms"] for r in same) * 1000
    assert ref["gflops"] == pytest.approx(rate)
    assert summary["ideal_ms"] == pytest.approx(summary["gflop"] / rate * 1000)
    assert summary["over_ms"] == pytest.approx(summary["kernel_ms"] - summary["ideal_ms"])
    text = out_md.read_text()
    assert f"{summary['over_ms']:.1f} ms ({100 * summary['over_fraction']:.1f}%)" in text
    assert f"| depthwise conv | {len(depthwise)} |" in text
    # Bad input: one line, exit 2, and a good result is not replaced.
    assert ort_ops.main(["--onnx", str(tmp_path / "none.onnx"), "--json", str(out_json)]) == 2
    assert json.loads(out_json.read_text()) == result
    with pytest.raises(SystemExit):
        ort_ops.main([*argv, "--runs", "0"])


def test_ort_ops_rates_each_kind_of_kernel_from_its_shapes():
    """The FLOPs of a kernel come from the shapes ONNX Runtime reports, weights included: a
    depthwise conv is rated on 9 multiply-adds per output, not on its channels squared."""
    flops = _script("ort_ops").node_flops
    assert flops("Conv", [[1, 64, 8, 8], [64, 1, 3, 3]], [[1, 64, 8, 8]]) == (
        "depthwise conv", 2 * 64 * 9 * 64)  # fmt: skip
    assert flops("Conv", [[2, 32, 8, 8], [16, 32, 1, 1], [2, 16, 4, 4]], [[2, 16, 4, 4]]) == (
        "pointwise conv", 2 * 2 * 16 * 32 * 16)  # fmt: skip
    assert flops("Conv", [[1, 3, 9, 9], [8, 3, 3, 3]], [[1, 8, 4, 4]]) == (
        "other conv", 2 * 8 * 27 * 16)  # fmt: skip
    assert flops("Gemm", [[4, 2048]], [[4, 1000]]) == ("gemm", 2 * 4 * 2048 * 1000)
    assert flops("MaxPool", [[1, 8, 4, 4]], [[1, 8, 2, 2]]) == ("no flops", 0)
