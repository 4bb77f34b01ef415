"""`xception experiment` and `xception predict` as a demanding user runs them: the statistics
against scipy, the result store's keys, re-measuring speeds, a diverged run's error, and
predict's CSV/JSON with awkward file and class names. Runs are written by hand (no training),
except where a run has to start to fail."""

import csv
import dataclasses
import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from test_experiments import _FAKE_DATA, _no_plots

from xception import create_model
from xception.experiments import (
    Claim,
    Scale,
    Store,
    compare,
    difference,
    judge,
    pooled_noise,
    run_config,
    run_experiments,
    run_key,
    suite_plan,
    t_coverage,
    t_quantile,
    write_outputs,
)

TINY = Scale(name="tiny", seeds=2, epochs=1, train_size=256, val_size=128, batch_size=64,
             model=dict(width=0.25, middle_blocks=1), segments=(2,), speed_batch=8,
             speed_repeats=1)  # fmt: skip
FAKE_DATA = _FAKE_DATA  # as `dataset_info` describes it, without hashing any files


_fake_plots = _no_plots  # plots written as empty files: their drawing is not under test


def _put(store, scale: Scale, suite: str, tops: dict) -> None:
    """Records by hand: tops[label] = per-seed lists of epoch accuracies (%)."""
    for v in suite_plan(suite, scale, in_chans=1, num_classes=10)[0]:
        for seed in range(scale.seeds):
            key = run_key(run_config(v, scale, seed, FAKE_DATA))
            store.put(dict(key=key, history=[dict(val_top1=t) for t in tops[v.label][seed]],
                           final_val_acc=tops[v.label][seed][-1] / 100, train_seconds=1.0,
                           params=1000, macs=20000, images_per_s=100.0))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def test_t_statistics_and_intervals_agree_with_scipy():
    """Guards the verdict arithmetic against an independent implementation: the exact t
    coverage and quantile (incl. Bonferroni levels and large df), and the pooled two-sample
    interval, which equals scipy's equal-variance t test interval for two variants."""
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 7, 10, 22, 60, 500):
        for t in (0.05, 1.0, 2.5, 8.0):
            want = stats.t.cdf(t, df) - stats.t.cdf(-t, df)
            assert t_coverage(t, df) == pytest.approx(want, abs=1e-10)
        for coverage in (0.5, 0.95, 0.99, 1 - 0.05 / 4, 1 - 0.05 / 16):
            assert t_quantile(coverage, df) == pytest.approx(
                stats.t.ppf(0.5 + coverage / 2, df), rel=1e-7)  # fmt: skip
    rng = np.random.default_rng(0)
    for na, nb in ((2, 2), (3, 2), (5, 4)):
        a, b = list(rng.normal(0.9, 0.01, na)), list(rng.normal(0.88, 0.02, nb))
        ci = stats.ttest_ind(a, b, equal_var=True).confidence_interval(0.95)
        d = difference(a, b)
        assert (d["lo"], d["hi"], d["df"]) == (pytest.approx(ci.low), pytest.approx(ci.high),
                                               na + nb - 2)  # fmt: skip
    groups = [[0.5], [0.1, 0.2], [0.3, 0.3, 0.6]]  # a one-seed group adds nothing
    var, df = pooled_noise(groups)
    assert df == 3 and var == pytest.approx(
        (np.var(groups[1], ddof=1) + 2 * np.var(groups[2], ddof=1)) / 3)  # fmt: skip


def test_t_coverage_of_a_negative_t_is_a_probability():
    """`t_coverage(t, df)` is documented as P(|T| < t); for t <= 0 that is 0, but a
    negative t returned a negative number (t_coverage(-1, 3) = -0.609), which a caller using
    the public function for a one-sided bound or a signed statistic takes as a probability."""
    for df in (1, 2, 3, 10):
        assert 0.0 <= t_coverage(-1.0, df) <= 1.0
        assert t_coverage(-1.0, df) == 0.0


def test_compare_refuses_an_unknown_claim_kind_whatever_the_seeds():
    """`compare()` raised ValueError for an unknown kind ('equivalence' for 'equivalent')
    only when it had a noise estimate; with one seed per variant it returned 'inconclusive'
    for the misspelt kind, so the mistake goes unseen until more seeds are run."""
    with pytest.raises(ValueError, match="unknown claim kind"):
        compare([0.9, 0.91], [0.8, 0.81], kind="equivalence")  # guarded already
    with pytest.raises(ValueError, match="unknown claim kind"):
        compare([0.9], [0.8], kind="equivalence")


# ---------------------------------------------------------------------------------------------
# the store and the report
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", [dict(width=1), dict(drop_rate=0)])
def test_a_model_setting_spelt_as_an_integer_is_the_same_run(setting):
    """`--set width=1` (YAML reads an int) or `--set drop_rate=0` names the very model the
    preset is (width 1.0, drop_rate 0.0), but the run key hashes model_config with the value
    as spelt (1 vs 1.0 in the JSON), so every finished run of the folder is trained again
    (hours at full scale) and stored twice. run_config's own docstring promises canonical
    overrides ("segments='depthwise' spelt out is the same run as the preset itself")."""
    plain = Scale(name="t", seeds=1, epochs=1, train_size=256, val_size=128, batch_size=64)
    spelt = dataclasses.replace(plain, model=setting)
    for suite in ("residual", "order"):
        for a, b in zip(suite_plan(suite, plain)[0], suite_plan(suite, spelt)[0], strict=True):
            assert run_key(run_config(a, plain, 0, FAKE_DATA)) == run_key(
                run_config(b, spelt, 0, FAKE_DATA)), (suite, a.label)  # fmt: skip
    # a float spelling already is the same run
    floats = dataclasses.replace(plain, model={k: float(v) for k, v in setting.items()})
    a, b = suite_plan("residual", plain)[0][0], suite_plan("residual", floats)[0][0]
    assert run_key(run_config(a, plain, 0, FAKE_DATA)) == run_key(
        run_config(b, floats, 0, FAKE_DATA))  # fmt: skip


def test_remeasuring_at_a_scale_the_runs_do_not_complete_keeps_the_report(tmp_path, monkeypatch):
    """Runs trained with --seeds 2, speeds re-measured without it (3 seeds by default):
    the 4 finished runs are re-measured, then the complete report is replaced by "No suite has
    all of its runs finished yet", the suite's plot is deleted and the command exits 0 telling
    the user to run without --remeasure-speed (which would train a third seed). README: where
    --remeasure-speed finds no usable runs "it says so, and writes nothing"; so it does now
    when the runs it finds do not complete a suite at the scale given, before any change."""
    import xception.experiments as experiments

    _fake_plots(monkeypatch)
    monkeypatch.setattr(experiments, "dataset_info", lambda data: dict(FAKE_DATA))
    monkeypatch.setattr(experiments, "_speed", lambda *a: dict(
        images_per_s=321.0, speed_machine=dict(cpu="here", threads=3, batch=8)))  # fmt: skip
    store = Store(tmp_path)
    _put(store, TINY, "residual", {"with residual connections": [[80], [82]],
                                   "without residual connections": [[70], [71]]})  # fmt: skip
    write_outputs(tmp_path, TINY, FAKE_DATA, store)
    assert "## residual" in (tmp_path / "REPORT.md").read_text()
    assert (tmp_path / "residual.png").exists()

    three = dataclasses.replace(TINY, seeds=3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()}
    with pytest.raises(ValueError, match=r"2 of the 6 runs of the residual suite at this scale "
                       r"\(3 seeds\) are not finished"):  # fmt: skip
        run_experiments(["residual"], tmp_path, three, remeasure_speed=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()} == before
    assert "## residual" in (tmp_path / "REPORT.md").read_text()
    assert (tmp_path / "residual.png").exists()
    assert "residual" in json.loads((tmp_path / "results.json").read_text())["suites"]


def test_the_report_states_the_noise_each_claim_was_judged_with(tmp_path, monkeypatch):
    """The convergence claim ("curve": mean accuracy over the epochs) is judged with the
    pooled noise of the curve values, but REPORT.md states only the final accuracies' noise
    ("standard deviation 1.41 pp, 2 degrees of freedom") as *the* seed noise of every verdict;
    the curve claim's interval cannot be reproduced from anything the report says (here its
    noise is 3.61 pp, its interval 2.5 times wider than the stated noise gives)."""
    _fake_plots(monkeypatch)
    store = Store(tmp_path)
    # finals 80, 82 and 70, 72 (var 2e-4 each); curves 75, 71 and 60, 66 (var 8e-4, 1.8e-3)
    tops = {
        "with residual connections": [[70, 80], [60, 82]],
        "without residual connections": [[50, 70], [60, 72]],
    }
    _put(store, TINY, "residual", tops)
    results = write_outputs(tmp_path, TINY, FAKE_DATA, store)
    final_sd = results["seed_noise"]["final"]["std"]
    curve_sd = results["seed_noise"]["curve"]["std"]
    assert final_sd == pytest.approx(math.sqrt(2e-4))
    assert curve_sd == pytest.approx(math.sqrt(1.3e-3))
    claims = results["suites"]["residual"]["claims"]
    assert claims[1]["metric"] == "curve"
    assert claims[1]["se"] == pytest.approx(curve_sd)  # judged with the curve noise: right
    report = (tmp_path / "REPORT.md").read_text()
    assert f"{100 * final_sd:.2f} pp" in report
    assert f"{100 * curve_sd:.2f} pp" in report  # the noise behind the convergence verdict


def test_judge_of_any_better_names_each_comparison_at_the_bonferroni_level():
    """Guards the spectrum claim: k intermediate counts, each compared at 1 - 0.05/k with the
    t quantile of that level (scipy-independent check through t_coverage)."""
    values = {"2": {"final": [0.85, 0.86]}, "4": {"final": [0.90, 0.91]},
              "8": {"final": [0.80, 0.82]}, "dw": {"final": [0.80, 0.81]}}  # fmt: skip
    verdict = judge(Claim("x", ("2", "4", "8"), "dw", kind="any_better"), values)
    assert [p["coverage"] for p in verdict["comparisons"]] == [pytest.approx(1 - 0.05 / 3)] * 3
    for p in verdict["comparisons"]:
        assert t_coverage(p["t"], p["df"]) == pytest.approx(1 - 0.05 / 3, abs=1e-9)
    assert verdict["verdict"] == "holds"


def test_a_diverged_run_is_named_with_a_fix_the_command_offers(tmp_path, monkeypatch, capsys):
    """A run of `xception experiment` whose loss goes non-finite ends with the training
    engine's advice "Lower lr, set grad_clip, or check the data", but the experiment command
    has no way to set lr or grad_clip (`--set lr=...` is refused: "unknown option(s) lr for
    xception-compact"), and the one-line error does not say which variant and seed diverged
    (the CLI's own comment: "a diverged run: say which"). Rerunning diverges at the same run
    again, so the suite can never finish."""
    import torch.nn.functional as F

    from xception.cli import main

    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "exp"
    status = main(["experiment", "order", "--epochs", "1", "--train-size", "128", "--val-size",
                   "64", "--seeds", "1", "--set", "width=0.25", "--set", "middle_blocks=1",
                   "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and "non-finite loss" in err
    assert "depthwise first" in err and "seed 0" in err  # which run diverged
    assert "grad_clip" not in err and "Lower lr" not in err  # not settable here


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------
ODD_CLASSES = ("cat, big", 'dog "x"', "bird\nsong", "fish")


@pytest.fixture(scope="module")
def odd_weights(tmp_path_factory):
    from xception.weights import Weights, save_safetensors

    model = create_model("xception-compact", num_classes=4, width=0.25, middle_blocks=1).eval()
    meta = Weights(name="odd", format="xception", num_classes=4, categories=ODD_CLASSES,
                   input_size=32)  # fmt: skip
    path = tmp_path_factory.mktemp("w") / "odd.safetensors"
    save_safetensors(model, path, meta)
    return path


def test_predict_csv_and_json_round_trip_odd_names_and_topk_beyond_the_classes(
    odd_weights, tmp_path, capsys
):
    """Guards well-formed output: file and class names with commas, quotes and newlines come
    back intact through csv and json readers, --topk 10 of 4 classes gives 4 ranked columns
    (probabilities summing to 1), and a missing file is its own row."""
    from xception.cli import main

    names = ["plain.png", 'odd, "name".png', "new\nline.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (200, 40 * i, 10)).save(tmp_path / name)
    argv = ["predict", str(tmp_path), str(tmp_path / "missing.png"), "--weights",
            str(odd_weights), "--topk", "10", "--no-progress"]  # fmt: skip
    assert main([*argv, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in rows) == sorted([*names, "missing.png"])
    assert "label_4" in rows[0] and "label_5" not in rows[0]
    for r in rows:
        if r["path"].endswith("missing.png"):
            assert r["error"] and r["label_1"] == ""
            continue
        assert sorted(r[f"label_{i}"] for i in range(1, 5)) == sorted(ODD_CLASSES)
        assert sum(float(r[f"probability_{i}"]) for i in range(1, 5)) == pytest.approx(1, abs=1e-5)
    assert main([*argv, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 4
    for row in data:
        if row["error"] is None:
            assert len(row["predictions"]) == 4
            assert {p["label"] for p in row["predictions"]} == set(ODD_CLASSES)
            assert all(p["label"] == ODD_CLASSES[p["index"]] for p in row["predictions"])
