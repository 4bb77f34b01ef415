"""docs/EXPERIMENTS.md and docs/experiments/ as a researcher reads and reruns them: every number
and verdict the page states recomputed from the stored results with the project's own code,
the committed reports and plots, the report `xception experiment` rebuilds from a store, and
what the command does with an interrupted run, other data and runs measured on two machines.
Training runs, where a run has to start, use the tiniest settings the command accepts."""

import csv
import dataclasses
import json
import math
import os
import re
import signal
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import make_idx_dataset, write_idx
from test_experiments import _FAKE_DATA, _no_plots

import xception.experiments as experiments
from xception.experiments import (
    SCALES,
    SUITES,
    Claim,
    Scale,
    Store,
    compare,
    judge,
    pooled_noise,
    render_report,
    run_config,
    run_experiments,
    run_key,
    suite_plan,
    write_outputs,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
STORED = DOCS / "experiments"
PAGE = (DOCS / "EXPERIMENTS.md").read_text()
README = (ROOT / "README.md").read_text()


def _results(name: str) -> dict:
    return json.loads((STORED / name / "results.json").read_text())


def _variants(results: dict) -> dict:
    """Distinct variants (set of runs) of a stored report, by their run keys."""
    return {tuple(v["keys"]): v for res in results["suites"].values() for v in res["variants"]}


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def _row(results: dict, suite: str, label: str) -> dict:
    return next(v for v in results["suites"][suite]["variants"] if v["label"] == label)


# ---------------------------------------------------------------------------------------------
# the stored results against themselves and the project's code
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "quick", "full-cpu-seed0"])
def test_stored_summaries_noise_and_verdicts_recompute_from_the_per_seed_values(name):
    """Means, spreads, the pooled noise and every claim's interval and verdict, recomputed
    from the per-seed accuracies in results.json with `pooled_noise` and `judge`; results.csv
    holds the same numbers."""
    results = _results(name)
    distinct = _variants(results)
    for v in distinct.values():
        assert v["val_acc_mean"] == pytest.approx(statistics.fmean(v["final_val_accs"]), abs=1e-12)
        spread = statistics.stdev(v["final_val_accs"]) if len(v["final_val_accs"]) > 1 else 0.0
        assert v["val_acc_std"] == pytest.approx(spread, abs=1e-12)
        assert len(v["final_val_accs"]) == v["seeds"] == results["scale"]["seeds"]
    noise = {m: pooled_noise([v[f"{m}_val_accs"] for v in distinct.values()])
             for m in ("final", "curve")}  # fmt: skip
    for m, n in noise.items():
        stored = results["seed_noise"][m]
        assert (n is None) == (stored is None)
        if n is not None:
            assert (math.sqrt(n[0]), n[1]) == (pytest.approx(stored["std"]), stored["df"])
    for suite, (_, claims) in ((s, suite_plan(s, SCALES[results["scale"]["name"].split(",")[0]]))
                               for s in SUITES):  # fmt: skip
        rows = results["suites"][suite]["variants"]
        values = {r["label"]: dict(final=r["final_val_accs"], curve=r["curve_val_accs"])
                  for r in rows}  # fmt: skip
        for claim, stored in zip(claims, results["suites"][suite]["claims"], strict=True):
            again = judge(claim, values, noise[claim.metric])
            assert again["verdict"] == stored["verdict"], (name, claim.text)
            pairs = again.get("comparisons", [again])
            for got, want in zip(pairs, stored.get("comparisons", [stored]), strict=True):
                for k in ("diff", "lo", "hi", "se"):
                    assert (got[k] is None) == (want[k] is None)
                    if got[k] is not None:
                        assert got[k] == pytest.approx(want[k], abs=1e-12), (name, k)
    table = list(csv.DictReader((STORED / name / "results.csv").open()))
    expected = [(s, v["label"], f"{v['val_acc_mean']:.5f}", f"{v['val_acc_std']:.5f}",
                 str(v["params"]), str(v["macs"]), f"{v['images_per_s']:.1f}")
                for s, res in results["suites"].items() for v in res["variants"]]  # fmt: skip
    assert [(r["suite"], r["variant"], r["val_acc_mean"], r["val_acc_std"], r["params"],
             r["macs"], r["images_per_s"]) for r in table] == expected  # fmt: skip


@pytest.mark.parametrize("name", ["full", "quick"])
def test_stored_parameters_and_macs_are_those_of_the_models_each_suite_builds(name):
    """Every variant's parameter and MAC count in the stored results is what the suite's plan
    builds today (the Inception baseline at its matched width included)."""
    from xception.model import count_macs

    results = _results(name)
    info = dict(num_classes=10, in_chans=1, size=28)
    for suite in SUITES:
        for v in suite_plan(suite, SCALES[name])[0]:
            model = experiments._build(v, info)
            row = _row(results, suite, v.label)
            assert experiments._param_count(model) == row["params"], (suite, v.label)
            assert count_macs(model, (28, 28), 1) == row["macs"], (suite, v.label)


# ---------------------------------------------------------------------------------------------
# docs/EXPERIMENTS.md and README against the stored results
# ---------------------------------------------------------------------------------------------
# The rows of the page's full-scale table, in order: (suite, label in results.json).
_TABLE_ROWS = [("residual", "with residual connections"),
               ("residual", "without residual connections"),
               ("mid-activation", "intermediate ELU"), ("mid-activation", "intermediate ReLU"),
               ("order", "pointwise first"), ("vs-inception", "Inception V3"),
               ("segments", "1 segment"), ("segments", "2 segments"), ("segments", "4 segments"),
               ("segments", "8 segments"), ("segments", "16 segments")]  # fmt: skip


def test_the_pages_full_scale_table_is_the_stored_results():
    full = _results("full")
    lines = [ln for ln in PAGE.splitlines() if re.match(r"^\| (all|residual|mid-activation|"
                                                       r"order|vs-inception|segments) \|", ln)
             and "+-" in ln]  # fmt: skip
    assert len(lines) == len(_TABLE_ROWS)
    for line, (suite, label) in zip(lines, _TABLE_ROWS, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        v = _row(full, suite, label)
        assert cells[2] == f"{100 * v['val_acc_mean']:.2f} +- {100 * v['val_acc_std']:.2f}", line
        assert cells[3] == f"{v['params']:,}", line
        assert cells[4] == f"{v['macs'] / 1e6:.1f}", line
        assert cells[5] == f"{v['images_per_s']:.0f}", line
    assert "Seed noise pooled over the 11 variants: standard deviation 0.69 points, 22 degrees" in (
        PAGE)  # fmt: skip
    assert f"{100 * full['seed_noise']['final']['std']:.2f}" == "0.69"
    assert full["seed_noise"]["final"]["df"] == 22 and len(_variants(full)) == 11
    quick = _results("quick")
    assert f"{100 * quick['seed_noise']['final']['std']:.2f}" == "0.96"
    assert quick["seed_noise"]["final"]["df"] == 10 and len(_variants(quick)) == 10
    # 33 and 20 training runs: distinct variants x seeds
    assert len(_variants(full)) * full["scale"]["seeds"] == 33
    assert len(_variants(quick)) * quick["scale"]["seeds"] == 20


def _claim_numbers(results: dict, suite: str, i: int = 0) -> tuple[str, str, str, str]:
    c = results["suites"][suite]["claims"][i]
    if c["kind"] == "any_better":
        c = max(c["comparisons"], key=lambda p: p["diff"]) | {"verdict": c["verdict"]}
    return c["verdict"], _pp(c["diff"]), _pp(c["lo"]), _pp(c["hi"])


def test_the_verdict_tables_of_the_page_and_readme_are_the_stored_claims():
    for name, table_head in (("full", "| claim of the paper |"), ("quick", "| claim | verdict at")):
        results = _results(name)
        start = PAGE.index(table_head)
        rows = [ln for ln in PAGE[start:].splitlines()[2:9]]
        claims = [("residual", 0), ("residual", 1), ("mid-activation", 0), ("mid-activation", 1),
                  ("order", 0), ("vs-inception", 0), ("segments", 0)]  # fmt: skip
        for line, (suite, i) in zip(rows, claims, strict=True):
            verdict, diff, lo, hi = _claim_numbers(results, suite, i)
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[1].strip("*") == verdict, line
            assert f"{diff} pp" in cells[2] and f"({lo} .. {hi})" in cells[2].replace(
                "98.75%: ", "").replace("98.33%: ", ""), line  # fmt: skip
    # README's summary of the full scale
    full = _results("full")
    for suite, i, said in (("residual", 0, "+2.27"), ("residual", 1, "+4.10"),
                           ("mid-activation", 1, "+1.81"), ("mid-activation", 0, "-0.20"),
                           ("order", 0, "-0.95"), ("vs-inception", 0, "+8.29"),
                           ("segments", 0, "+1.40")):  # fmt: skip
        assert _claim_numbers(full, suite, i)[1] == said
        assert said in README
    two = _row(full, "segments", "2 segments")
    base = _row(full, "segments", "depthwise")
    assert f"{two['params'] / base['params']:.1f}x the parameters" in README


def test_the_pages_prose_numbers_recompute_from_the_stored_results():
    full, cpu = _results("full"), _results("full-cpu-seed0")
    base = _row(full, "segments", "depthwise")
    # the best intermediate's plain 95% interval and its Bonferroni one
    two = _row(full, "segments", "2 segments")
    d = experiments.difference(two["final_val_accs"], base["final_val_accs"],
                               (full["seed_noise"]["final"]["std"] ** 2, 22))  # fmt: skip
    assert f"({_pp(d['lo'])} .. {_pp(d['hi'])})" == "(+0.23 .. +2.57)"
    assert "clears a 95% interval on its own (+0.23 ..\n  +2.57)" in PAGE
    # "ahead of depthwise on the means, by 0.8 to 1.4 points"
    gains = [100 * (_row(full, "segments", f"{k} segment{'s' * (k > 1)}")["val_acc_mean"]
                    - base["val_acc_mean"]) for k in (1, 2, 4, 8, 16)]  # fmt: skip
    assert (f"{min(gains):.1f}", f"{max(gains):.1f}") == ("0.8", "1.4")
    # cost of 2 segments, Inception's speed
    assert f"{two['params'] / base['params']:.1f}" == "4.3"
    assert f"{two['macs'] / base['macs']:.1f}" == "3.9"
    assert f"{two['images_per_s'] / base['images_per_s']:.2f}" == "0.78"
    inc = _row(full, "vs-inception", "Inception V3")
    assert f"{inc['images_per_s'] / base['images_per_s']:.1f}" == "2.2"
    assert (f"{inc['params'] / 1e6:.2f}", f"{base['params'] / 1e6:.2f}") == ("0.92", "0.91")
    quick = _results("quick")
    q_inc, q_base = _row(quick, "vs-inception", "Inception V3"), _row(quick, "vs-inception",
                                                                       "Xception")  # fmt: skip
    assert (f"{q_inc['params'] / 1e6:.2f}", f"{q_base['params'] / 1e6:.2f}") == ("0.51", "0.52")
    # "about 77% where the full scale reaches 89%"
    assert abs(100 * q_base["val_acc_mean"] - 77) < 1 and abs(100 * base["val_acc_mean"] - 89) < 1
    # Figure 9's shape: epoch 1 and epoch 4 of the two residual variants
    with_, without = full["suites"]["residual"]["variants"]
    assert [f"{100 * x:.1f}" for x in (without["curve_mean"][0], with_["curve_mean"][0],
                                       without["curve_mean"][-1], with_["curve_mean"][-1])] == [
        "75.8", "82.8", "86.4", "88.7"]  # fmt: skip
    # the 2-core seed-0 runs: the same keys as the GPU seed 0, and the cross-check numbers
    gpu0 = {v["keys"][0]: v["final_val_accs"][0] for v in _variants(full).values()}
    cpu0 = {v["keys"][0]: v["final_val_accs"][0] for v in _variants(cpu).values()}
    assert gpu0.keys() == cpu0.keys() and len(gpu0) == 11
    diffs = [100 * (cpu0[k] - gpu0[k]) for k in gpu0]
    assert (f"{statistics.fmean(diffs):+.2f}", f"{statistics.stdev(diffs):.2f}",
            f"{max(map(abs, diffs)):.2f}") == ("+0.01", "0.56", "1.06")  # fmt: skip
    # GPU time summed and per-run CPU minutes
    seconds = sum(v["train_seconds"] * v["seeds"] for v in _variants(full).values())
    assert f"{seconds / 60:.1f}" == "10.6"
    minutes = {v["label"]: v["train_seconds"] / 60 for v in _variants(cpu).values()}
    assert f"{minutes['Inception V3']:.1f}" == "1.9"
    segs = [m for k, m in minutes.items() if "segment" in k]
    dws = [m for k, m in minutes.items() if "segment" not in k and k != "Inception V3"]
    assert (f"{min(dws):.1f}", f"{max(dws):.1f}") == ("2.7", "4.0")
    assert (f"{min(segs):.1f}", f"{max(segs):.1f}") == ("4.8", "9.0")


def test_the_scales_and_suites_the_page_describes_are_the_codes():
    """The scale table and the claim definitions: the paper's four ablations (residual, none /
    ELU / ReLU between depthwise and pointwise, order, segments) and the Inception baseline."""
    quick, full = SCALES["quick"], SCALES["full"]
    assert (
        quick.model,
        quick.train_size,
        quick.val_size,
        quick.epochs,
        quick.batch_size,
        quick.seeds,
        quick.segments,
    ) == ({"width": 0.75}, 4000, 2000, 2, 64, 2, (1, 2, 4, 8))
    assert (
        full.model,
        full.train_size,
        full.val_size,
        full.epochs,
        full.batch_size,
        full.seeds,
        full.segments,
    ) == ({}, 15000, 5000, 4, 128, 3, (1, 2, 4, 8, 16))
    assert (quick.speed_batch, quick.speed_repeats, full.speed_repeats) == (64, 3, 5)
    for name in ("full", "quick"):
        assert _results(name)["scale"] == json.loads(json.dumps(dataclasses.asdict(SCALES[name])))
    overrides = {s: [{k: v for k, v in var.overrides.items() if k not in full.model}
                     for var in suite_plan(s, full)[0]] for s in SUITES}  # fmt: skip
    assert overrides["residual"] == [{}, {"residual": False}]
    assert overrides["mid-activation"] == [{}, {"mid_activation": "elu"},
                                           {"mid_activation": "relu"}]  # fmt: skip
    assert overrides["order"] == [{}, {"order": "pointwise_first"}]
    assert overrides["segments"] == [{"segments": k} for k in (1, 2, 4, 8, 16, "depthwise")]
    spectrum = suite_plan("segments", full)[1][0]
    assert spectrum.kind == "any_better" and len(spectrum.a) == 4  # 2, 4, 8, 16: 98.75% each
    assert suite_plan("order", full)[1][0].kind == "equivalent"


# ---------------------------------------------------------------------------------------------
# the committed reports and plots
# ---------------------------------------------------------------------------------------------
def _valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.size


def test_every_plot_the_page_shows_exists_and_is_an_image():
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", PAGE)
    assert len(shown) == 4
    for rel in shown:
        w, h = _valid_png(DOCS / rel)
        assert w > 300 and h > 200, rel
    for rel in re.findall(r"\]\((experiments/[^)]+)\)", PAGE):
        assert (DOCS / rel).exists(), rel


@pytest.mark.parametrize("name", ["full", "quick"])
def test_every_plot_a_full_or_quick_report_shows_exists_and_is_an_image(name):
    report = (STORED / name / "REPORT.md").read_text()
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(shown) == sorted(f"{p}.png" for p in [*SUITES, "segments-spectrum"])
    for rel in shown:
        _valid_png(STORED / name / rel)


def test_the_cpu_seed0_report_shows_plots_that_are_there():
    """docs/experiments/full-cpu-seed0/REPORT.md (linked from EXPERIMENTS.md as "the
    2-core runs") embedded six plots its folder did not hold: every image it shows is there."""
    report = (STORED / "full-cpu-seed0" / "REPORT.md").read_text()
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    missing = [rel for rel in shown if not (STORED / "full-cpu-seed0" / rel).is_file()]
    assert missing == []


def _rendered(name: str) -> str:
    results = _results(name)
    plots = {s: f"{s}.png" for s in results["suites"]}
    plots["spectrum"] = "segments-spectrum.png"
    return render_report({**results, "plots": plots})


@pytest.mark.parametrize("name", ["full", "quick", "full-cpu-seed0"])
def test_the_committed_reports_are_what_the_code_renders_from_their_results(name):
    """The committed REPORT.md files were stale against their own results.json: the
    verdict-rule line of the full and quick reports gave the final accuracy's seed noise as the
    noise of every verdict, where the convergence claims used the curve noise (0.77 pp; quick
    2.56 pp), and the 2-core report's spectrum claim read "95% interval n/a .. n/a". Each is
    now exactly what `render_report` makes of its results."""
    committed = (STORED / name / "REPORT.md").read_text()
    rendered = _rendered(name)
    assert committed == rendered


# ---------------------------------------------------------------------------------------------
# `xception experiment` rebuilding the full report from a store of the same numbers
# ---------------------------------------------------------------------------------------------
FULL_DATA = dict(_FAKE_DATA, name="fashion-mnist", title="Fashion-MNIST")


def _store_full_scale_runs(out: Path) -> int:
    """Records for every run of the full scale with the stored per-seed numbers (the 4-epoch
    histories made up so that each seed's final and mean-over-epochs accuracies are the stored
    ones), as trained on the H100 and measured on the 2-core machine."""
    stored = _results("full")
    scale = SCALES["full"]
    store = Store(out)
    keys = set()
    for suite in SUITES:
        for v in suite_plan(suite, scale)[0]:
            row = _row(stored, suite, v.label)
            for seed, (final, curve) in enumerate(
                zip(row["final_val_accs"], row["curve_val_accs"], strict=True)
            ):
                early = (4 * curve - final) / 3
                history = [dict(epoch=e + 1, val_top1=100 * early) for e in range(3)]
                history.append(dict(epoch=4, val_top1=100 * final))
                key = run_key(run_config(v, scale, seed, FULL_DATA))
                keys.add(key)
                store.put(
                    dict(
                        key=key,
                        config={},
                        history=history,
                        final_val_acc=final,
                        train_seconds=row["train_seconds"],
                        params=row["params"],
                        macs=row["macs"],
                        images_per_s=row["images_per_s"],
                        machine=dict(
                            device="cuda", gpu="NVIDIA H100 80GB HBM3", cpu="AMD EPYC", threads=16
                        ),
                        speed_machine=dict(cpu="AMD EPYC", threads=2, batch=64),
                    )
                )
    return len(keys)


def test_the_command_rebuilds_the_full_report_from_a_store_of_its_numbers(tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    """`xception experiment all --out DIR` on a store holding the full scale's 33 runs trains
    nothing and writes the committed REPORT.md, line for line, and a results.json with the
    same claims."""
    import xception.train
    from xception.cli import main

    _no_plots(monkeypatch)
    monkeypatch.setattr(experiments, "dataset_info", lambda data: dict(FULL_DATA))

    def no_training(*args, **kwargs):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(xception.train, "fit", no_training)
    out = tmp_path / "full"
    assert _store_full_scale_runs(out) == 33
    assert main(["experiment", "all", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "0 run(s) trained, 33 reused" in said
    assert "HOLDS: Xception beats Inception V3 at a matched parameter count" in said
    rebuilt = (out / "REPORT.md").read_text().splitlines()
    committed = (STORED / "full" / "REPORT.md").read_text().splitlines()
    assert rebuilt == committed
    stored, again = _results("full"), json.loads((out / "results.json").read_text())
    for suite in SUITES:
        for a, b in zip(again["suites"][suite]["claims"], stored["suites"][suite]["claims"],
                        strict=True):  # fmt: skip
            assert a["verdict"] == b["verdict"]
            for p, q in zip(a.get("comparisons", [a]), b.get("comparisons", [b]), strict=True):
                assert (p["diff"], p["lo"], p["hi"]) == (
                    pytest.approx(q["diff"], abs=1e-9),
                    pytest.approx(q["lo"], abs=1e-9),
                    pytest.approx(q["hi"], abs=1e-9),
                )


# ---------------------------------------------------------------------------------------------
# the verdict rule at its boundaries
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "lo", "hi", "verdict"), [
    ("better", 0.0, 0.02, "inconclusive"),       # touching 0 is not "above 0"
    ("better", 1e-12, 0.02, "holds"),
    ("better", -0.02, 0.0, "inconclusive"),
    ("better", -0.02, -1e-12, "does not hold"),
    ("equivalent", -0.01, 0.005, "inconclusive"),  # touching the margin is not "within" it
    ("equivalent", -0.0099, 0.0099, "holds"),
    ("equivalent", 0.01, 0.03, "inconclusive"),    # nor "wholly outside" it
    ("equivalent", 0.0101, 0.03, "does not hold"),
    ("equivalent", -0.03, -0.0101, "does not hold"),
    ("equivalent", -0.005, 0.02, "inconclusive"),
])  # fmt: skip
def test_the_verdict_at_the_edges_of_the_interval(monkeypatch, kind, lo, hi, verdict):
    def interval(a, b, noise=None, coverage=0.95):
        return dict(diff=(lo + hi) / 2, se=1.0, df=4, t=2.0, lo=lo, hi=hi, n_a=3, n_b=3,
                    coverage=coverage)  # fmt: skip

    monkeypatch.setattr(experiments, "difference", interval)
    assert compare([0.5], [0.5], kind)[0] == verdict


def test_the_spectrum_claim_does_not_hold_only_when_depthwise_beats_every_count():
    noise = (0.005**2, 20)
    values = {"2": {"final": [0.80] * 3}, "4": {"final": [0.81] * 3},
              "dw": {"final": [0.90] * 3}}  # fmt: skip
    claim = Claim("x", ("2", "4"), "dw", kind="any_better")
    assert judge(claim, values, noise)["verdict"] == "does not hold"
    values["4"] = {"final": [0.895] * 3}  # one count within the noise of depthwise
    assert judge(claim, values, noise)["verdict"] == "inconclusive"
    values["4"] = {"final": [0.93] * 3}
    assert judge(claim, values, noise)["verdict"] == "holds"


# ---------------------------------------------------------------------------------------------
# reruns: an interrupted run, other data, two machines
# ---------------------------------------------------------------------------------------------
def _tiny_args(data: Path, out: Path, seeds: int) -> list[str]:
    return ["experiment", "residual", "--seeds", str(seeds), "--epochs", "1", "--train-size",
            "128", "--val-size", "64", "--set", "width=0.25", "--set", "middle_blocks=1",
            "--data", str(data), "--out", str(out)]  # fmt: skip


def test_an_interrupted_rerun_keeps_the_report_and_finished_runs_and_continues(tmp_path,
                                                                             monkeypatch,
                                                                             capsys):  # fmt: skip
    """SIGTERM in the first run of a second seed: exit 143 with the checkpoint named, the two
    finished runs and the one-seed report untouched, no record of the cut run; the same command
    again resumes that run from its checkpoint and trains only what is missing."""
    import xception.train as train
    from xception.cli import main

    monkeypatch.setattr(experiments, "_speed", lambda *a: dict(  # speed is not under test
        images_per_s=100.0, speed_machine=dict(cpu="here", threads=2, batch=64)))  # fmt: skip
    data = make_idx_dataset(tmp_path / "toy", n_train=256, n_test=64, size=16, classes=4)
    out = tmp_path / "exp"
    assert main(_tiny_args(data, out, 1)) == 0
    runs = {p.name: p.read_bytes() for p in (out / "runs").iterdir()}
    report = (out / "REPORT.md").read_bytes()
    results = (out / "results.json").read_bytes()
    assert len(runs) == 2
    capsys.readouterr()

    real = train._Run._step

    def step_then_signal(self, x, y, meter):
        ok = real(self, x, y, meter)
        os.kill(os.getpid(), signal.SIGTERM)
        return ok

    with monkeypatch.context() as m:
        m.setattr(train._Run, "_step", step_then_signal)
        assert main(_tiny_args(data, out, 2)) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM; checkpoint saved to" in err and "run the same command" in err
    assert {p.name: p.read_bytes() for p in (out / "runs").iterdir()} == runs
    assert (out / "REPORT.md").read_bytes() == report
    assert (out / "results.json").read_bytes() == results
    assert len(list((out / "work").glob("*/checkpoints/step-*"))) == 1

    assert main(_tiny_args(data, out, 2)) == 0
    assert "2 run(s) trained, 2 reused" in capsys.readouterr().out
    assert len(list((out / "runs").glob("*.json"))) == 4
    assert not list((out / "work").glob("*/checkpoints"))
    assert json.loads((out / "results.json").read_text())["scale"]["seeds"] == 2


def test_idx_data_with_more_classes_is_reported_with_the_classes_it_trained(tmp_path):
    """`--data DIR` with IDX files of 26 classes (EMNIST letters' layout, which the
    training engine reads as 26 classes) trained 26-class models, but `dataset_info` had
    num_classes=10 written in: each run's stored model_config said 10 classes, and its
    parameter count (and the Inception baseline's matched width, and the run key) were those of
    a 10-class model the run never trained. The class count now comes from the labels."""
    rng = np.random.default_rng(0)
    data = tmp_path / "letters"
    data.mkdir()
    for split, n in (("train", 128), ("t10k", 64)):
        labels = np.arange(n) % 26
        write_idx(data / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 16, 16)))
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels)
    scale = Scale(name="tiny", seeds=1, epochs=1, train_size=64, val_size=32, batch_size=32,
                  model=dict(width=0.25, middle_blocks=1), segments=(2,), speed_batch=4,
                  speed_repeats=1)  # fmt: skip
    out = tmp_path / "exp"
    run_experiments(["order"], out, scale, data=str(data))
    for path in (out / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        trained = json.loads((out / "work" / record["key"] / "model.json").read_text())
        assert trained["model_config"]["num_classes"] == 26  # what the engine trained
        assert record["config"]["model_config"]["num_classes"] == 26
        from xception import create_model

        model = create_model("xception-compact", **{
            k: v for k, v in trained["model_config"].items()})  # fmt: skip
        assert record["params"] == sum(p.numel() for p in model.parameters())


def test_speeds_measured_on_two_machines_are_reported_as_two(tmp_path, monkeypatch):
    """Seeds 0 and 1 stored on machine A, seed 2 added on machine B (`--seeds 3` rerun
    there): each variant's images/s is the median over its runs, here B's own 1100, but
    REPORT.md said every speed was "measured on: A-CPU, 2 threads" (`_summarise` kept only
    the first run's speed machine). Both machines are now named, and the mix flagged with
    `--remeasure-speed` as the fix."""
    _no_plots(monkeypatch)
    scale = Scale(name="tiny", seeds=3, epochs=1, train_size=256, val_size=128, batch_size=64,
                  model=dict(width=0.25, middle_blocks=1), segments=(2,), speed_batch=8,
                  speed_repeats=1)  # fmt: skip
    store = Store(tmp_path)
    where = [dict(cpu="A-CPU", threads=2, batch=8), dict(cpu="A-CPU", threads=2, batch=8),
             dict(cpu="B-CPU", threads=2, batch=8)]  # fmt: skip
    for v in suite_plan("order", scale)[0]:
        for seed, ips in enumerate((1000.0, 1200.0, 1100.0)):
            key = run_key(run_config(v, scale, seed, _FAKE_DATA))
            store.put(
                dict(
                    key=key,
                    history=[dict(val_top1=80 + seed)],
                    final_val_acc=(80 + seed) / 100,
                    train_seconds=1.0,
                    params=1000,
                    macs=20000,
                    images_per_s=ips,
                    speed_machine=where[seed],
                    machine=dict(device="cpu", cpu=where[seed]["cpu"], threads=2),
                )
            )
    write_outputs(tmp_path, scale, _FAKE_DATA, store)
    report = (tmp_path / "REPORT.md").read_text()
    assert "| depthwise first | 3 | 81.00 +- 1.00 | 1,000 | 0.0 | 1100 |" in report
    assert "Trained on: A-CPU (cpu); B-CPU (cpu)" in report  # training machines: all named
    speed_line = next(ln for ln in report.splitlines() if ln.startswith("Inference speed"))
    assert "B-CPU" in speed_line, speed_line
    assert "measured on: A-CPU, 2 threads; B-CPU, 2 threads." in speed_line, speed_line
    assert "medians over runs measured on more than one machine: `--remeasure-speed`" in report
