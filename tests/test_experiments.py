import csv
import gzip
import io
import json
import math
import re
import statistics
import time

import numpy as np
import pytest
import torch

from xception import create_model
from xception.experiments import (
    SCALES,
    Claim,
    Scale,
    compare,
    difference,
    judge,
    pooled_noise,
    run_experiments,
    suite_plan,
    t_coverage,
    t_quantile,
)
from xception.inception import InceptionV3Compact


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# the compact Inception V3 baseline
# ---------------------------------------------------------------------------------------------
def test_inception_compact_matches_compact_xception_size():
    for in_chans in (1, 3):
        inc = create_model("inception-v3-compact", num_classes=10, in_chans=in_chans)
        xc = create_model("xception-compact", num_classes=10, in_chans=in_chans)
        assert isinstance(inc, InceptionV3Compact)
        assert abs(_params(inc) - _params(xc)) / _params(xc) < 0.10


def test_inception_compact_shapes_and_api():
    model = create_model("inception-v3-compact", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)
        feats = model.forward_features(torch.randn(1, 1, 28, 28))
        # Three halvings (stem pool, two reductions each halving): 28 -> 14 -> 7 -> 4 -> 2.
        assert feats.shape == (1, model.num_features, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
    model.reset_classifier(3)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    # The paper's Inception modules are all there: factorised 1xn/nx1 convs and 3x3 pairs.
    kernels = {m.kernel_size for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert {(1, 1), (3, 3), (1, 7), (7, 1), (1, 3), (3, 1)} <= kernels
    with pytest.raises(ValueError, match="expected a batch of shape"):
        model(torch.randn(1, 3, 28, 28))


def test_inception_compact_rejects_bad_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) residual for inception-v3-compact"):
        create_model("inception-v3-compact", residual=False)
    with pytest.raises(ValueError, match="n=4 is not valid"):
        create_model("inception-v3-compact", n=4)


def test_inception_compact_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    from xception.weights import WeightsError

    model = create_model("inception-v3-compact", num_classes=10, in_chans=1)
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = create_model("inception-v3-compact", num_classes=10, in_chans=1, weights=path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(WeightsError, match="not inception-v3-compact weights"):
        create_model("inception-v3-compact", num_classes=10, in_chans=1, width=0.5, weights=path)


def test_inception_full_width_is_inception_v3_sized():
    # width 1.0 is the paper's channel plan: about Inception V3's 23.6M parameters.
    model = create_model("inception-v3-compact", num_classes=1000, width=1.0)
    assert 22e6 < _params(model) < 25e6


def test_vs_inception_suite_matches_parameters_at_each_scale():
    for scale in SCALES.values():
        variants, _ = suite_plan("vs-inception", scale)
        sizes = [_params(create_model(v.model, num_classes=10, in_chans=1, **v.overrides))
                 for v in variants]  # fmt: skip
        assert abs(sizes[1] - sizes[0]) / sizes[0] < 0.10


# ---------------------------------------------------------------------------------------------
# verdicts
# ---------------------------------------------------------------------------------------------
def test_difference_by_hand():
    a, b = [0.90, 0.92, 0.94], [0.80, 0.81, 0.85]
    s = difference(a, b)  # sample variances 4e-4 and 7e-4, 2 degrees of freedom each
    assert s["diff"] == pytest.approx(0.92 - 0.82)
    assert s["df"] == 4
    assert s["se"] == pytest.approx(math.sqrt((0.0004 + 0.0007) / 2 * (1 / 3 + 1 / 3)))
    assert s["t"] == pytest.approx(2.776, abs=1e-3)  # Student's t, 97.5% quantile, 4 df
    assert s["lo"] == pytest.approx(s["diff"] - s["t"] * s["se"])
    # Noise pooled over a whole suite: a third variant adds its degrees of freedom.
    noise = pooled_noise([a, b, [0.5, 0.5, 0.5]])
    assert noise == (pytest.approx((0.0008 + 0.0014) / 6), 6)
    assert difference(a, b, noise)["t"] == pytest.approx(2.447, abs=1e-3)


@pytest.mark.parametrize(("coverage", "df", "t"), [
    (0.95, 1, 12.706), (0.95, 2, 4.303), (0.95, 3, 3.182), (0.95, 10, 2.228), (0.95, 22, 2.074),
    (0.95, 120, 1.980), (0.99, 1, 63.657), (0.99, 4, 4.604), (0.99, 22, 2.819),
    (0.998, 22, 3.505), (0.90, 7, 1.895),
])  # fmt: skip
def test_t_quantile_matches_printed_tables(coverage, df, t):
    assert t_quantile(coverage, df) == pytest.approx(t, abs=1e-3)
    assert t_coverage(t_quantile(coverage, df), df) == pytest.approx(coverage, abs=1e-9)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="between 0 and 1"):
        t_quantile(1.0, 5)
    with pytest.raises(ValueError, match="at least 1"):
        t_coverage(2.0, 0)


def test_verdict_clear_win_clear_loss_and_noise():
    win, lose = [0.91, 0.915, 0.92], [0.85, 0.86, 0.855]
    assert compare(win, lose)[0] == "holds"
    assert compare(lose, win)[0] == "does not hold"
    # Means differ by 0.5 pp but the seeds scatter by several points: within the noise.
    noisy_a, noisy_b = [0.88, 0.92, 0.85], [0.86, 0.91, 0.865]
    assert compare(noisy_a, noisy_b)[0] == "inconclusive"
    assert compare(noisy_b, noisy_a)[0] == "inconclusive"
    # One seed: no estimate of the noise, so no verdict however large the gap.
    assert compare([0.99], [0.10])[0] == "inconclusive"


def test_verdict_equivalence():
    same = compare([0.900, 0.902, 0.901], [0.901, 0.899, 0.902], "equivalent")
    assert same[0] == "holds"
    apart = compare([0.90, 0.905, 0.91], [0.85, 0.855, 0.86], "equivalent")
    assert apart[0] == "does not hold"
    vague = compare([0.88, 0.92, 0.85], [0.86, 0.91, 0.865], "equivalent")
    assert vague[0] == "inconclusive"


def test_judge_any_better_over_a_spectrum():
    final = {"1": [0.80, 0.81, 0.80], "4": [0.95, 0.951, 0.949], "dw": [0.90, 0.901, 0.899]}
    values = {label: {"final": accs} for label, accs in final.items()}
    claim = Claim("an intermediate point beats depthwise", ("1", "4"), "dw", kind="any_better")
    assert judge(claim, values)["verdict"] == "holds"
    values["4"]["final"] = [0.85, 0.851, 0.849]
    assert judge(claim, values)["verdict"] == "does not hold"
    values["4"]["final"] = [0.85, 0.95, 0.90]
    assert judge(claim, values)["verdict"] == "inconclusive"


def test_any_better_corrects_for_the_number_of_chances():
    """A gap that clears a 95% interval on its own (d/se = 2.5 at 22 df, t = 2.074) does not
    clear the 99% one (t = 2.819) that five chances to win call for."""
    noise = (1.5e-4, 22)  # se of a difference of two 3-seed means: 0.01
    values = {"dw": {"final": [0.90, 0.90, 0.90]}, "a": {"final": [0.925, 0.925, 0.925]}}
    values |= {k: {"final": [0.90, 0.90, 0.90]} for k in "bcde"}
    alone = judge(Claim("a beats dw", ("a",), "dw", kind="any_better"), values, noise)
    assert alone["verdict"] == "holds"
    five = judge(Claim("one beats dw", tuple("abcde"), "dw", kind="any_better"), values, noise)
    assert five["verdict"] == "inconclusive"
    assert five["comparisons"][0]["coverage"] == pytest.approx(0.99)
    assert five["comparisons"][0]["t"] == pytest.approx(2.819, abs=1e-3)


def test_judge_uses_the_claims_metric():
    values = {"a": {"final": [0.90, 0.901, 0.899], "curve": [0.80, 0.81, 0.80]},
              "b": {"final": [0.90, 0.899, 0.901], "curve": [0.70, 0.71, 0.70]}}  # fmt: skip
    assert judge(Claim("final", "a", "b"), values)["verdict"] == "inconclusive"
    assert judge(Claim("faster", "a", "b", metric="curve"), values)["verdict"] == "holds"


# ---------------------------------------------------------------------------------------------
# a tiny suite end to end, with the real training engine
# ---------------------------------------------------------------------------------------------
TINY = Scale(name="tiny", seeds=2, epochs=1, train_size=256, val_size=128, batch_size=64,
             model=dict(width=0.25, middle_blocks=1), segments=(2,), speed_batch=8,
             speed_repeats=1)  # fmt: skip


def test_tiny_suites_end_to_end_then_reused(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    first = run_experiments(["residual", "segments"], out, TINY)
    # residual: with/without; segments: 2 segments and depthwise (= "with residual"): 3 x 2 seeds.
    assert (first["trained"], first["reused"]) == (6, 0)
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 6
    for name in ["results.csv", "results.json", "REPORT.md", "residual.png", "segments.png",
                 "segments-spectrum.png"]:  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(runs[0].read_text())
    assert len(record["history"]) == 1 and 0.0 <= record["final_val_acc"] <= 1.0
    # The engine's own clock (it spans a resume, where this process's would not).
    assert record["train_seconds"] == record["history"][-1]["wall_s"] > 0
    assert not list((out / "work").glob("*/checkpoints"))  # gone once stored
    assert record["params"] > 0 and record["macs"] > 0 and record["images_per_s"] > 0

    results = json.loads((out / "results.json").read_text())
    residual = results["suites"]["residual"]
    assert [v["label"] for v in residual["variants"]] == [
        "with residual connections", "without residual connections"]  # fmt: skip
    assert all(v["seeds"] == 2 for v in residual["variants"])
    assert residual["claims"][0]["verdict"] in ("holds", "does not hold", "inconclusive")
    # Seed noise pooled over the 3 distinct variants (the baseline is in both suites), 1 df each.
    assert results["seed_noise"]["final"]["df"] == 3
    spectrum = results["suites"]["segments"]["variants"]
    assert [v["overrides"]["segments"] for v in spectrum] == [2, "depthwise"]
    assert spectrum[0]["params"] > spectrum[1]["params"]  # 2 groups cost more than depthwise
    assert spectrum[0]["macs"] > spectrum[1]["macs"]
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [(r["suite"], r["seeds"]) for r in rows] == [("residual", "2")] * 2 + [
        ("segments", "2")] * 2  # fmt: skip
    report = (out / "REPORT.md").read_text()
    assert "## residual" in report and "## segments" in report
    assert "![segment spectrum](segments-spectrum.png)" in report
    assert "residual connections improve final accuracy" in report

    # A second invocation trains nothing: every run comes from the store.
    import xception.train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(xception.train, "fit", no_training)
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    second = run_experiments(["residual", "segments"], out, TINY)
    assert (second["trained"], second["reused"]) == (0, 6)
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    assert second["suites"] == results["suites"] | second["suites"]  # same aggregate
    assert "## Machines" in report and "Trained on: " in report

    # Speeds measured again here (runs trained on another machine): nothing is trained, every
    # run gets a new speed and the machine it was measured on, and the report follows.
    import xception.experiments as experiments

    calls = []

    def fake_speed(model, data, scale):
        calls.append((model.config.residual, str(model.config.segments)))
        return dict(images_per_s=1234.5, speed_machine=dict(cpu="test CPU", threads=7, batch=8))

    monkeypatch.setattr(experiments, "_speed", fake_speed)
    third = run_experiments(["residual", "segments"], out, TINY, remeasure_speed=True)
    assert (third["trained"], third["remeasured"]) == (0, 6)
    # once per distinct variant: with and without residuals, and 2 segments
    assert sorted(calls) == [(False, "depthwise"), (True, "2"), (True, "depthwise")]
    for p in runs:
        record = json.loads(p.read_text())
        assert record["images_per_s"] == 1234.5 and record["speed_machine"]["cpu"] == "test CPU"
        assert record["machine"]["device"] in ("cpu", "cuda")  # the training machine stays
    assert "measured on: test CPU, 7 threads" in (out / "REPORT.md").read_text()
    monkeypatch.undo()

    # An interrupted suite (one run missing) continues with just that run.
    nonresidual = [p for p in runs if not json.loads(p.read_text())["config"]["model_config"][
        "residual"]]  # fmt: skip
    nonresidual[0].unlink()  # a run of the residual suite alone
    fourth = run_experiments(["residual"], out, TINY)
    assert (fourth["trained"], fourth["reused"]) == (1, 3)

    # A suite no longer complete drops out of the report, and so do its plots, which showed
    # runs no report refers to any more (they stayed, looking current).
    two = [p for p in out.glob("runs/*.json")
           if json.loads(p.read_text())["config"]["model_config"]["segments"] == 2]  # fmt: skip
    two[0].unlink()
    fifth = run_experiments(["residual"], out, TINY)
    assert fifth["trained"] == 0 and sorted(fifth["suites"]) == ["residual"]
    assert sorted(p.name for p in out.glob("*.png")) == ["residual.png"]
    assert "segments" not in (out / "REPORT.md").read_text()


def test_cli_experiment_rejects_bad_values(capsys, tmp_path):
    from xception.cli import main

    assert main(["experiment", "residual", "--seeds", "0"]) == 2
    assert "--seeds 0: use a positive number" in capsys.readouterr().err
    # A huge count planned silently for minutes; /proc gave a bare errno.
    assert main(["experiment", "residual", "--seeds", "1000000", "--out", str(tmp_path)]) == 2
    assert "--seeds 1000000: each seed trains every variant once; use at most 1000" in (
        capsys.readouterr().err)  # fmt: skip
    assert main(["experiment", "residual", "--quick", "--out", "/proc/exp"]) == 2
    err = capsys.readouterr().err
    assert "folder /proc is not writable" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "file").write_text("kept")
    assert main(["experiment", "residual", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "is a file: pass a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "kept"
    # More images than the data holds: the engine took all 60,000 and the report claimed more.
    big = ["experiment", "residual", "--quick", "--out", str(tmp_path / "big")]
    assert main([*big, "--train-size", "10000000"]) == 2
    assert "10,000,000 training images asked for" in capsys.readouterr().err
    assert main([*big, "--val-size", "10001"]) == 2
    assert "has 10,000: ask for at most 10,000" in capsys.readouterr().err
    assert not (tmp_path / "big" / "runs").exists()
    with pytest.raises(SystemExit):
        main(["experiment", "residuals"])
    capsys.readouterr()
    # Settings a suite would lose its meaning under, caught before any training.
    for argv, message in (
        (
            ["residual", "--set", "residual=false"],
            "the residual suite compares models by residual",
        ),  # fmt: skip
        (["all", "--set", "order=pointwise_first"], "the order suite compares models by order"),
        (["residual", "--set", "in_chans=3"], "in_chans: fixed by the data"),
        (["residual", "--train-size", "10"], "10 training images are fewer than one batch of 64"),
        (
            ["residual", "--segments", "1,2"],
            "--segments applies to the segments suite, not residual",
        ),  # fmt: skip
    ):
        assert main(["experiment", *argv, "--quick", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x" / "runs").exists()


def test_cli_experiment_segments_once_each_in_order(monkeypatch, tmp_path):
    import xception.experiments as experiments
    from xception.cli import main

    seen = {}

    def capture(suites, out, scale, **kwargs):
        seen["scale"] = scale
        raise ValueError("stop here")

    monkeypatch.setattr(experiments, "run_experiments", capture)
    assert main(["experiment", "segments", "--segments", "4,2,4,1", "--out", str(tmp_path)]) == 2
    assert seen["scale"].segments == (1, 2, 4)


def test_the_data_content_is_part_of_a_runs_key(tmp_path):
    from test_data import make_idx_dataset, write_idx

    from xception.experiments import dataset_info, run_config, run_key, suite_plan

    a = make_idx_dataset(tmp_path / "a", n_train=200, n_test=100, size=28)
    b = make_idx_dataset(tmp_path / "b", n_train=200, n_test=100, size=28)  # same seed: equal
    for f in b.glob("*.gz"):  # the same bytes compressed at another time: other gzip headers
        f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes()), mtime=12345))
    variant = suite_plan("residual", TINY, in_chans=1, num_classes=10)[0][0]

    def key(root):
        return run_key(run_config(variant, TINY, 0, dataset_info(root)))

    assert dataset_info(a)["sha256"] == dataset_info(b)["sha256"]
    # Unpacked files that kept their '.gz' names (a browser's doing), read as the data loader
    # reads them: the same data, the same key. They failed with BadGzipFile; a damaged gzip
    # gave a zlib traceback.
    c = make_idx_dataset(tmp_path / "c", n_train=200, n_test=100, size=28)
    for f in c.glob("*.gz"):
        f.write_bytes(gzip.decompress(f.read_bytes()))
    assert dataset_info(c)["sha256"] == dataset_info(a)["sha256"]
    labels = b / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:10] + b"\xff" * 40)
    with pytest.raises(ValueError, match=f"{labels}: damaged gzip file.*download it again"):
        dataset_info(b)
    before = key(a)
    write_idx(a / "t10k-labels-idx1-ubyte.gz", np.zeros(100))  # other labels, same path
    assert key(a) != before
    assert dataset_info(a)["title"] == "a" and dataset_info("fashion-mnist")["title"] == (
        "Fashion-MNIST"
    )


def test_a_suite_not_asked_for_may_have_no_plan_at_this_scale(tmp_path):
    """Full-scale segment counts (up to 16) do not divide a half-width model's channels: the
    residual suite is still aggregated, where the report failed after training every run."""
    import dataclasses

    from xception.experiments import SCALES, Store, aggregate, dataset_info

    scale = dataclasses.replace(SCALES["full"], model={"width": 0.5})
    results = aggregate(Store(tmp_path), scale, dataset_info("fashion-mnist"))
    assert results["suites"] == {}


@pytest.mark.parametrize("text", [b"[1, 2]", b"null", b"\xff\xfe{", b'"key"'])
def test_a_run_file_that_is_no_record_is_trained_again(tmp_path, caplog, text):
    """Valid JSON that is not an object (or bytes that are not UTF-8) was an AttributeError or
    UnicodeDecodeError that ended the whole experiment; it is a damaged file like any other."""
    from xception.experiments import Store

    store = Store(tmp_path)
    store.dir.mkdir()
    store.path("abc").write_bytes(text)
    assert store.get("abc") is None
    assert "unreadable" in caplog.text and "trained again" in caplog.text
    store.put(_record("abc"))
    assert store.get("abc") == _record("abc")


def test_parallel_processes_share_runs_through_claims(tmp_path):
    """A run claimed by another process is skipped, waited for at the end, and trained here when
    that process lets go of it without finishing it."""
    import threading

    import filelock

    from xception.experiments import dataset_info, run_config, run_key, suite_plan

    out = tmp_path / "exp"
    info = dataset_info("fashion-mnist")
    variants, _ = suite_plan("residual", TINY, in_chans=1, num_classes=10)
    keys = [run_key(run_config(v, TINY, seed, info)) for seed in range(2) for v in variants]
    (out / "work").mkdir(parents=True)
    other = filelock.FileLock(str(out / "work" / f"{keys[0]}.lock"))
    other.acquire()  # "another process" holds the first run
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(run_experiments(["residual"], out, TINY))
    )
    worker.start()
    deadline = time.monotonic() + 300
    while len(list((out / "runs").glob("*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    # The other three runs are done; the held one is neither trained nor given up on.
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(keys[1:])
    assert worker.is_alive()
    other.release()  # the other process died without finishing its run
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert (result["trained"], result["reused"]) == (4, 0)
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(keys)
    record = json.loads((out / "runs" / f"{keys[0]}.json").read_text())
    assert record["machine"]["device"] in ("cpu", "cuda") and record["machine"]["threads"] >= 1


def test_cli_remeasure_speed_with_no_runs_says_there_is_nothing_to_remeasure(tmp_path, capsys):
    """It said "speeds of 0 run(s) measured again" and exit 0, and wrote a report of no results:
    into a folder it made, or over the folder's report of runs trained at another scale."""
    from xception.cli import main
    from xception.experiments import Store, dataset_info

    out = tmp_path / "exp"
    assert main(["experiment", "segments", "--quick", "--remeasure-speed", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert (f"no finished runs of the segments suite in {out}: nothing to re-measure (train them "
            "first: the same command without --remeasure-speed)") in captured.err  # fmt: skip
    assert not out.exists()
    # Runs trained with --quick, measured again without it: no run of this scale to measure.
    keys = _store_runs(Store(out), "segments", SCALES["quick"], dataset_info("fashion-mnist"))
    (out / "REPORT.md").write_text("the quick runs' report")
    assert main(["experiment", "segments", "--remeasure-speed", "--out", str(out)]) == 2
    assert (f"{out / 'runs'} holds {len(keys)} finished run(s), none of the segments suite at "
            "full scale: nothing to re-measure (give the --out and the scale they were trained "
            "with: --quick") in capsys.readouterr().err  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["REPORT.md", "runs"]
    assert (out / "REPORT.md").read_text() == "the quick runs' report"


def test_the_same_data_under_another_path_is_the_same_run(tmp_path):
    """The key holds the data's content: a copy elsewhere, or the same folder spelt another way,
    reuses the stored runs instead of training them all again."""
    from test_data import make_idx_dataset

    from xception.experiments import dataset_info, run_config, run_key, suite_plan

    a = make_idx_dataset(tmp_path / "a", n_train=200, n_test=100, size=28)
    b = make_idx_dataset(tmp_path / "b", n_train=200, n_test=100, size=28)  # same seed: equal
    for f in b.glob("*.gz"):  # the same bytes compressed at another time: other gzip headers
        f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes()), mtime=12345))
    variant = suite_plan("residual", TINY, in_chans=1, num_classes=10)[0][0]
    keys = {run_key(run_config(variant, TINY, 0, dataset_info(root)))
            for root in (a, b, f"{a}/", str(a))}  # fmt: skip
    assert len(keys) == 1


def test_segments_claim_compares_every_count_above_one():
    """A spectrum without 1 segment (--segments 2,4) still compares its lowest count; 1 segment
    (a regular conv) is never one of the points in between."""
    import dataclasses

    for counts, between in (((2, 4), ("2 segments", "4 segments")),
                            ((1, 2, 4), ("2 segments", "4 segments")), ((1,), ())):  # fmt: skip
        scale = dataclasses.replace(TINY, segments=counts)
        _, claims = suite_plan("segments", scale, in_chans=1, num_classes=10)
        assert claims[0].a == between, counts


def test_equivalence_does_not_hold_only_beyond_the_margin():
    """'Within 1 pp' is refuted only by an interval that lies wholly beyond 1 pp: one that
    merely excludes 0 (-4.29 .. -0.01, as the quick scale's order suite had) still allows a gap
    of half a point, which the claim calls equivalent."""
    noise = (0.0096**2, 10)
    verdict, stats = compare([0.770, 0.775], [0.7915, 0.7965], "equivalent", noise)
    assert stats["lo"] < -0.01 < stats["hi"] < 0
    assert verdict == "inconclusive"
    verdict, stats = compare([0.770, 0.775], [0.8115, 0.8165], "equivalent", noise)
    assert stats["hi"] < -0.01 and verdict == "does not hold"


def test_vs_inception_refuses_a_size_no_inception_matches():
    """Below about 60,000 parameters no width of the compact Inception comes within 10%: the
    claim 'at a matched parameter count' would be false, so the suite is refused before
    training (it compared 11,722 against 59,106 parameters)."""
    import dataclasses

    scale = dataclasses.replace(SCALES["quick"], model={"width": 0.1})
    with pytest.raises(ValueError, match=r"no width of inception-v3-compact matches the 11,722 "
                       r"parameters .* within 10% \(closest: 59,106 at width 0.05\)"):  # fmt: skip
        suite_plan("vs-inception", scale)
    scale = dataclasses.replace(SCALES["quick"], model={"width": 0.5})
    variants, _ = suite_plan("vs-inception", scale)  # 237,714 against 218,050: matched
    assert variants[1].overrides == {"width": 0.1}


def test_vs_inception_baseline_gets_the_settings_both_models_have():
    """--set drop_rate=0.5 trained Xception with dropout against an Inception without: the
    comparison mixed two training settings, not just two architectures."""
    import dataclasses

    scale = dataclasses.replace(SCALES["quick"], model={"width": 0.75, "drop_rate": 0.5,
                                                        "bn_eps": 1e-5, "middle_blocks": 4})  # fmt: skip
    xception, inception = suite_plan("vs-inception", scale)[0]
    assert xception.overrides == scale.model
    # width is matched to the parameters instead; middle_blocks is Xception's own
    assert inception.overrides == {"drop_rate": 0.5, "bn_eps": 1e-5, "width": 0.16}
    assert create_model(inception.model, num_classes=10, in_chans=1,
                        **inception.overrides).config.drop_rate == 0.5  # fmt: skip


def test_a_suite_dropped_from_the_report_is_named(tmp_path, caplog):
    """The report covers the suites complete at the run's scale: a second run at another scale
    rewrote it without the others, and said nothing."""
    from xception.experiments import _dropped_suites

    path = tmp_path / "results.json"
    before = dict(scale=dict(name="quick", seeds=2, epochs=1, train_size=64),
                  suites=dict(residual={}, order={}, segments={}))  # fmt: skip
    path.write_text(json.dumps(before))
    with caplog.at_level("WARNING"):
        stale = _dropped_suites(path, dict(suites=dict(residual={})))
    assert ("the report now leaves out order, segments, reported there before (name quick, "
            "seeds 2, epochs 1, train_size 64) but not complete at this run's scale; their plots "
            "are removed and their runs kept") in caplog.text  # fmt: skip
    assert sorted(stale) == ["order.png", "segments-spectrum.png", "segments.png"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _dropped_suites(path, dict(suites=dict(residual={}, order={}, segments={}))) == []
        assert _dropped_suites(tmp_path / "none.json", dict(suites={})) == []  # no report
    assert caplog.text == ""


def test_speeds_are_measured_with_glibc_keeping_freed_memory(monkeypatch):
    """Speeds measured after CPU training ran with it, speeds measured again did not: the
    two were compared in one report."""
    import xception.experiments as experiments
    from xception import runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(experiments, "measure_speed", lambda *a, **k: 12.5)
    speed = experiments._speed(torch.nn.Identity(), dict(size=8, in_chans=1), TINY)
    assert speed["images_per_s"] == 12.5 and calls == [1]


def test_a_bad_model_setting_is_not_blamed_on_the_segment_counts(tmp_path, capsys):
    """`xception experiment segments --set foo=1` (or width=-1) said 'segments=1 does not divide
    the channels': the first segment count took the blame for the setting's own error."""
    import dataclasses

    from xception.cli import main

    for model, message in ((dict(foo=1), r"unknown option\(s\) foo for xception-compact"),
                           (dict(width=-1), r"width=-1 is not valid")):  # fmt: skip
        scale = dataclasses.replace(TINY, model=model)
        with pytest.raises(ValueError, match=message):
            suite_plan("segments", scale, in_chans=1, num_classes=10)
    argv = ["experiment", "segments", "--quick", "--set", "foo=1", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) foo" in err and "does not divide" not in err
    assert not (tmp_path / "x" / "runs").exists()


def test_segment_counts_that_do_not_fit_name_the_counts_that_do():
    """`xception experiment all --set width=0.5` failed on the full scale's own count 16 with
    'use powers of two up to the narrowest layer': the counts were never the user's, and the
    message did not say which fit or how to give them."""
    import dataclasses

    scale = dataclasses.replace(SCALES["full"], model={"width": 0.5})
    with pytest.raises(ValueError, match=r"^segments=16 does not divide .* e\.g\. --segments "
                       r"1,2,4,8$"):  # fmt: skip
        suite_plan("segments", scale, in_chans=1, num_classes=10)
    none_fit = dataclasses.replace(SCALES["quick"], segments=(3, 5))  # then the powers that do
    with pytest.raises(ValueError, match=r"^segments=3 .* e\.g\. --segments 1,2,4,8$"):
        suite_plan("segments", none_fit, in_chans=1, num_classes=10)
    assert [v.overrides["segments"] for v in suite_plan("segments", SCALES["full"])[0]] == [
        1, 2, 4, 8, 16, "depthwise"]  # fmt: skip


@pytest.mark.parametrize("field", ["seeds", "speed_repeats"])
def test_a_scale_with_a_count_below_one_is_refused_before_any_work(tmp_path, field):
    """seeds=0 hashed the data, then failed with 'min() arg is an empty sequence';
    speed_repeats=0 failed only after training the first run."""
    import dataclasses

    scale = dataclasses.replace(TINY, **{field: 0})
    with pytest.raises(ValueError, match=rf"^scale 'tiny': {field}=0: use a positive integer$"):
        run_experiments(["order"], tmp_path / "exp", scale)
    assert not (tmp_path / "exp").exists()


# ---------------------------------------------------------------------------------------------
# damaged, interrupted and shared output folders
# ---------------------------------------------------------------------------------------------
def _record(key: str, acc: float = 0.5) -> dict:
    """A finished run's record as `Store.put` stores it, with what the report reads."""
    return dict(key=key, history=[dict(val_top1=100 * acc - 5), dict(val_top1=100 * acc)],
                final_val_acc=acc, train_seconds=1.5, params=1000, macs=20000,
                images_per_s=100.0)  # fmt: skip


def _store_runs(store, suite: str, scale: Scale, info: dict, *, leave_out: int = 0) -> list[str]:
    """Records for the runs of `suite` (all but the last `leave_out`), no training; their keys."""
    from xception.experiments import run_config, run_key

    variants, _ = suite_plan(suite, scale, in_chans=1, num_classes=10)
    keys = [run_key(run_config(v, scale, seed, info)) for seed in range(scale.seeds)
            for v in variants]  # fmt: skip
    for i, key in enumerate(keys[: len(keys) - leave_out]):
        store.put(_record(key, 0.5 + i / 100))
    return keys


@pytest.mark.parametrize("damage", ["no final_val_acc", "empty history", "history of nulls",
                                    "params a string"])  # fmt: skip
def test_a_run_record_missing_what_the_report_reads_is_trained_again(tmp_path, caplog, damage):
    """A record cut down by hand was reused, then ended the report with a KeyError traceback
    (no final_val_acc) or 'fmean requires at least one data point' (no history)."""
    from xception.experiments import Store, aggregate, dataset_info

    store = Store(tmp_path)
    info = dataset_info("fashion-mnist")
    keys = _store_runs(store, "order", TINY, info)
    record = _record(keys[0])
    if damage == "no final_val_acc":
        del record["final_val_acc"]
    elif damage == "empty history":
        record["history"] = []
    elif damage == "history of nulls":
        record["history"] = [None]
    else:
        record["params"] = "1000"
    store.path(keys[0]).write_text(json.dumps(record))
    assert store.get(keys[0]) is None
    assert f"{store.path(keys[0])} is unreadable" in caplog.text and "trained again" in caplog.text
    assert aggregate(store, TINY, info)["suites"] == {}  # the suite waits for that run
    store.put(_record(keys[0]))
    assert list(aggregate(store, TINY, info)["suites"]) == ["order"]


def test_a_run_trained_again_replaces_its_own_old_results(tmp_path):
    """A run whose stored record was damaged trains again in its work folder, where its
    results of the first time stay (its checkpoints were removed once it was stored): the
    engine refuses such a folder to anyone else."""
    from xception.experiments import dataset_info, run_config, train_run

    variant = suite_plan("order", TINY, in_chans=1, num_classes=10)[0][0]
    work = tmp_path / "work" / "key"
    work.mkdir(parents=True)
    (work / "model.safetensors").write_bytes(b"the first time's weights")
    (work / "metrics.csv").write_text("epoch\n9\n")
    result = train_run(run_config(variant, TINY, 0, dataset_info("fashion-mnist")), work)
    assert [row["epoch"] for row in result["history"]] == [1]
    assert (work / "metrics.csv").read_text().splitlines()[1].startswith("1,")
    assert (work / "model.safetensors").read_bytes() != b"the first time's weights"


def test_a_damaged_resume_checkpoint_names_the_fix_this_command_has(tmp_path):
    """An interrupted run whose newest checkpoint was cut short advised `--resume <the one
    before>`, an option `xception experiment` does not have: nothing the user could type."""
    from xception.checkpoint import CheckpointError
    from xception.experiments import dataset_info, run_config, run_key

    out = tmp_path / "exp"
    variant = suite_plan("order", TINY, in_chans=1, num_classes=10)[0][0]
    key = run_key(run_config(variant, TINY, 0, dataset_info("fashion-mnist")))  # the first run
    checkpoints = out / "work" / key / "checkpoints"
    for step in (2, 4):
        (checkpoints / f"step-{step:09d}").mkdir(parents=True)
        (checkpoints / f"step-{step:09d}" / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError) as caught:
        run_experiments(["order"], out, TINY)
    message = str(caught.value)
    assert "step-000000004/state.pt: damaged or incomplete checkpoint" in message
    assert "--resume" not in message
    assert (f"delete {checkpoints / 'step-000000004'} to resume from the checkpoint before it, "
            f"or {out / 'work' / key} to train the run again from the start") in message  # fmt: skip
    assert not (out / "runs").exists()


@pytest.mark.parametrize(("name", "kind", "message"), [
    ("runs", "file", "is a file, where the experiments keep their runs (a folder)"),
    ("work", "file", "is a file, where the experiments keep their work (a folder)"),
    ("results.csv", "folder", "is a folder, where the experiments write their results.csv"),
    ("segments-spectrum.png", "folder", "is a folder, where the experiments write their "
     "segments-spectrum.png"),
])  # fmt: skip
def test_an_output_in_the_way_is_refused_before_any_training(tmp_path, monkeypatch, name, kind,
                                                             message):  # fmt: skip
    """A file named `runs` in --out failed only when the first run had trained ('[Errno 17]
    File exists'); a folder named results.csv or after a plot, once every run had trained, with
    results.json already rewritten and REPORT.md not."""
    import xception.train

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the outputs were checked")

    monkeypatch.setattr(xception.train, "fit", no_training)
    out = tmp_path / "exp"
    out.mkdir()
    (out / name).mkdir() if kind == "folder" else (out / name).write_text("kept")
    with pytest.raises(ValueError, match=f"^{out / name} {re.escape(message)}: move it away, or "
                       "choose another --out$"):  # fmt: skip
        run_experiments(["order"], out, TINY)
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_one_seed_says_so_for_the_spectrum_claim_too(tmp_path):
    """With --seeds 1 the spectrum's claim read '95% interval n/a .. n/a, Bonferroni for 1
    comparisons' where the other claims say there is no noise estimate."""
    import dataclasses

    from xception.experiments import Store, dataset_info, write_outputs

    scale = dataclasses.replace(TINY, seeds=1)
    info = dataset_info("fashion-mnist")
    store = Store(tmp_path)
    _store_runs(store, "segments", scale, info)
    write_outputs(tmp_path, scale, info, store)
    report = (tmp_path / "REPORT.md").read_text()
    assert ("best intermediate: 2 segments, -1.00 pp against depthwise, too few seeds to "
            "estimate the noise.") in report  # fmt: skip
    assert "n/a" not in report


def test_reports_of_processes_sharing_an_out_folder_are_written_one_at_a_time(tmp_path,
                                                                              monkeypatch):  # fmt: skip
    """`xception experiment residual` and `... order` run side by side into one --out: the
    first to finish read the store before the other's last run was stored and wrote after the
    other's report, which lost the order suite (its plot deleted, 'not complete' warned)."""
    import threading

    import xception.experiments as experiments
    from xception.experiments import Store, dataset_info, write_outputs

    # Plots drawn as empty files: the test is about which report is written last.
    monkeypatch.setattr(experiments, "_plot_curves", lambda path, *a: path.write_bytes(b""))
    monkeypatch.setattr(experiments, "_plot_spectrum", lambda path, *a: path.write_bytes(b""))
    info = dataset_info("fashion-mnist")
    store = Store(tmp_path)
    _store_runs(store, "residual", TINY, info)
    order = _store_runs(store, "order", TINY, info, leave_out=1)
    read, go = threading.Event(), threading.Event()
    aggregate = experiments.aggregate

    def slow_first(*args):  # the first process reads the store, then is slow to write
        results = aggregate(*args)
        if not read.is_set():
            read.set()
            go.wait(timeout=60)
        return results

    monkeypatch.setattr(experiments, "aggregate", slow_first)
    first = threading.Thread(target=write_outputs, args=(tmp_path, TINY, info, store))
    first.start()
    assert read.wait(timeout=60)
    store.put(_record(order[-1]))  # the other process stores its last run, then reports
    second = threading.Thread(target=write_outputs, args=(tmp_path, TINY, info, store))
    second.start()
    second.join(timeout=3)
    go.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert not first.is_alive() and not second.is_alive()
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results["suites"]) == ["order", "residual"]
    assert (tmp_path / "order.png").exists() and "## order" in (tmp_path / "REPORT.md").read_text()


# --- cases a mutation pass over experiments.py found untested ---
# Data as `dataset_info` describes it, without hashing any files: the report and the keys read
# only these fields.
_FAKE_DATA = dict(name="fake-data", title="Fake", sha256="0" * 64, in_chans=1, num_classes=10,
                  size=28, train_images=60000, test_images=10000)  # fmt: skip


def _no_plots(monkeypatch):
    import xception.experiments as experiments

    monkeypatch.setattr(experiments, "_plot_curves", lambda path, *a: path.write_bytes(b""))
    monkeypatch.setattr(experiments, "_plot_spectrum", lambda path, *a: path.write_bytes(b""))


def _put_runs(store, scale: Scale, suite: str, runs: dict) -> None:
    """Records written by hand: runs[label] = (per-seed epoch accuracies in %, per-seed
    images/s, per-seed train seconds, params, macs, machine)."""
    from xception.experiments import run_config, run_key

    for v in suite_plan(suite, scale, in_chans=1, num_classes=10)[0]:
        if v.label not in runs:
            continue
        tops, ips, seconds, params, macs, machine = runs[v.label]
        for seed in range(scale.seeds):
            where = machine[seed] if isinstance(machine, list) else machine
            key = run_key(run_config(v, scale, seed, _FAKE_DATA))
            store.put(dict(key=key, history=[dict(val_top1=t) for t in tops[seed]],
                           final_val_acc=tops[seed][-1] / 100, train_seconds=seconds[seed],
                           params=params, macs=macs, images_per_s=ips[seed],
                           machine=where))  # fmt: skip


def test_difference_with_unequal_seed_counts_by_hand():
    a, b = [0.90, 0.92, 0.94], [0.80, 0.82]
    s = difference(a, b)  # variances 4e-4 (2 df) and 2e-4 (1 df): pooled 1e-3 / 3 at 3 df
    assert s["diff"] == pytest.approx(0.92 - 0.81)
    assert (s["df"], s["n_a"], s["n_b"]) == (3, 3, 2)
    assert s["se"] == pytest.approx(math.sqrt(1e-3 / 3 * (1 / 3 + 1 / 2)))
    assert s["t"] == pytest.approx(3.182, abs=1e-3)
    # A single degree of freedom is an estimate too (t = 12.706)
    one = difference([0.90, 0.92], [0.80])
    assert one["df"] == 1 and one["se"] == pytest.approx(math.sqrt(2e-4 * (1 / 2 + 1)))
    assert one["t"] == pytest.approx(12.706, abs=1e-3)


def test_judge_pools_the_noise_over_every_variant_given():
    """Without an explicit noise, the noise is pooled over every variant in `values`, not just
    the two compared: a noisy third variant widens the interval."""
    values = {"a": {"final": [0.90, 0.92]}, "b": {"final": [0.80, 0.82]},
              "c": {"final": [0.50, 0.70]}}  # fmt: skip
    # variances 2e-4, 2e-4 and 2e-2, 1 df each: pooled 0.0204 / 3 = 0.0068 at 3 df
    s = judge(Claim("a beats b", "a", "b"), values)
    assert s["df"] == 3 and s["se"] == pytest.approx(math.sqrt(0.0068 * (1 / 2 + 1 / 2)))
    assert s["verdict"] == "inconclusive"  # t = 3.182: 0.10 - 3.182 * 0.0825 < 0
    # a and b alone: 2e-4 at 2 df, se 0.0141, t = 4.303, lo = +0.039: holds
    assert compare([0.90, 0.92], [0.80, 0.82])[0] == "holds"


def test_any_better_with_no_variant_in_between_is_inconclusive():
    values = {"dw": {"final": [0.90, 0.91]}, "1": {"final": [0.50, 0.51]}}
    verdict = judge(Claim("none between", (), "dw", kind="any_better"), values)
    assert verdict["verdict"] == "inconclusive" and verdict["comparisons"] == []


def test_measure_speed_is_the_median_of_timed_batches_after_a_warm_up(monkeypatch):
    """images/s = batch / median time of `repeats` batches, the warm-up batch untimed; eval
    mode, inference mode and channels_last inputs (as the engine runs on a CPU)."""
    import types

    import xception.experiments as experiments
    from xception.experiments import measure_speed

    clock = [0.0]
    monkeypatch.setattr(experiments, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Timed(torch.nn.Module):
        def __init__(self, durations):
            super().__init__()
            self.durations, self.seen = list(durations), []

        def forward(self, x):
            self.seen.append((self.training, torch.is_inference_mode_enabled(), x.shape,
                              x.is_contiguous(memory_format=torch.channels_last),
                              x.is_contiguous()))  # fmt: skip
            clock[0] += self.durations.pop(0)
            return x

    model = Timed([100.0, 1.0, 4.0, 2.0]).train()  # warm-up, then three timed batches
    assert measure_speed(model, 4, 3, batch=8, repeats=3) == pytest.approx(8 / 2.0)
    assert len(model.seen) == 4
    assert all(s[:4] == (False, True, (8, 3, 4, 4), True) for s in model.seen)
    model = Timed([100.0, 5.0])
    assert measure_speed(model, 4, 3, batch=10, repeats=1, channels_last=False) == 2.0
    assert [s[3:] for s in model.seen] == [(False, True)] * 2


def test_a_runs_key_changes_with_every_setting_that_changes_what_it_computes():
    import dataclasses

    from xception.experiments import run_config, run_key

    base, other = suite_plan("residual", TINY, in_chans=1, num_classes=10)[0]

    def key(variant=base, seed=0, data=_FAKE_DATA, **changes):
        return run_key(run_config(variant, dataclasses.replace(TINY, **changes), seed, data))

    keys = [key(), key(other), key(seed=1), key(epochs=2), key(train_size=320),
            key(val_size=64), key(batch_size=32), key(data=dict(_FAKE_DATA, sha256="1" * 64))]  # fmt: skip
    assert len(set(keys)) == len(keys)
    # Speed settings and the scale's name change nothing the run computes
    assert key(speed_batch=4, speed_repeats=9, name="other") == keys[0]
    assert key(data=dict(_FAKE_DATA, name="elsewhere")) == keys[0]


@pytest.mark.parametrize("change", [dict(key="another run"), dict(final_val_acc=float("nan")),
                                    dict(train_seconds=float("inf")), dict(params=True),
                                    dict(images_per_s=None),
                                    dict(history=[dict(val_top1=50.0), dict(train_top1=60.0)])])  # fmt: skip
def test_a_record_of_another_run_or_with_an_unusable_number_is_not_reused(tmp_path, change):
    from xception.experiments import Store

    store = Store(tmp_path)
    store.dir.mkdir()
    store.path("abc").write_text(json.dumps({**_record("abc"), **change}))
    assert store.get("abc") is None


def test_the_size_checks_allow_exactly_one_batch_and_every_image(tmp_path, monkeypatch):
    import dataclasses

    import xception.experiments as experiments

    class Planned(Exception):
        pass

    def planned(*args, **kwargs):
        raise Planned

    monkeypatch.setattr(experiments, "dataset_info",
                        lambda data: dict(_FAKE_DATA, train_images=64, test_images=100))  # fmt: skip
    monkeypatch.setattr(experiments, "suite_plan", planned)
    scale = dataclasses.replace(TINY, train_size=64, batch_size=64, val_size=100)
    with pytest.raises(Planned):  # every check passed
        run_experiments(["order"], tmp_path / "exp", scale)
    for changes, message in ((dict(train_size=63), "63 training images are fewer than one batch"),
                             (dict(train_size=65), "65 training images asked for"),
                             (dict(val_size=101), "101 test images asked for")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            run_experiments(["order"], tmp_path / "exp", dataclasses.replace(scale, **changes))


def test_runs_train_seed_by_seed_and_store_their_last_epoch(tmp_path, monkeypatch):
    """Seed-major order (an interrupted suite leaves every variant with about as many seeds);
    a run's accuracy is its last epoch's, its time the engine's clock at the last epoch."""
    import xception.experiments as experiments

    _no_plots(monkeypatch)
    monkeypatch.setattr(experiments, "dataset_info", lambda data: dict(_FAKE_DATA))
    monkeypatch.setattr(experiments, "_variant_stats", lambda *a: dict(
        params=1000, macs=2000, images_per_s=50.0,
        speed_machine=dict(cpu="c", threads=1, batch=8)))  # fmt: skip
    trained = []

    def fake_train(config, workdir):
        seed, residual = config["train"]["seed"], config["model_config"]["residual"]
        trained.append((seed, residual))
        last = 60.0 + seed + (5 if residual else 0)
        return dict(history=[dict(val_top1=40.0, wall_s=3.0), dict(val_top1=last, wall_s=7.5)])

    monkeypatch.setattr(experiments, "train_run", fake_train)
    result = run_experiments(["residual"], tmp_path, TINY)
    assert trained == [(0, True), (0, False), (1, True), (1, False)]
    assert (result["trained"], result["reused"]) == (4, 0)
    rows = result["suites"]["residual"]["variants"]
    assert rows[0]["final_val_accs"] == pytest.approx([0.65, 0.66])
    assert rows[1]["final_val_accs"] == pytest.approx([0.60, 0.61])
    assert rows[0]["curve_mean"] == pytest.approx([0.40, 0.655])
    for path in (tmp_path / "runs").glob("*.json"):
        assert json.loads(path.read_text())["train_seconds"] == 7.5


def test_each_suite_compares_the_variants_its_claims_name():
    expected = {
        "residual": ([("with residual connections", {}),
                      ("without residual connections", {"residual": False})],
                     [("with residual connections", "without residual connections", "better",
                       "final"),
                      ("with residual connections", "without residual connections", "better",
                       "curve")]),
        "mid-activation": ([("no intermediate activation", {}),
                            ("intermediate ELU", {"mid_activation": "elu"}),
                            ("intermediate ReLU", {"mid_activation": "relu"})],
                           [("no intermediate activation", "intermediate ELU", "better", "final"),
                            ("no intermediate activation", "intermediate ReLU", "better",
                             "final")]),
        "order": ([("depthwise first", {}), ("pointwise first", {"order": "pointwise_first"})],
                  [("depthwise first", "pointwise first", "equivalent", "final")]),
    }  # fmt: skip
    for suite, (variants, claims) in expected.items():
        planned, said = suite_plan(suite, TINY, in_chans=1, num_classes=10)
        assert [(v.label, {k: x for k, x in v.overrides.items() if k not in TINY.model})
                for v in planned] == variants, suite  # fmt: skip
        assert all(v.model == "xception-compact" for v in planned)
        assert [(c.a, c.b, c.kind, c.metric) for c in said] == claims, suite


def test_report_numbers_from_runs_written_by_hand(tmp_path, monkeypatch):
    """Three seeds of three variants (the baseline shared by the residual and order suites),
    every number of results.json, results.csv and REPORT.md worked out by hand."""
    import dataclasses

    from xception.experiments import Store, write_outputs

    _no_plots(monkeypatch)
    scale = dataclasses.replace(TINY, seeds=3)
    store = Store(tmp_path)
    gpu = dict(device="cuda", gpu="Test GPU", cpu="Test CPU", threads=2)
    cpu = dict(device="cpu", gpu=None, cpu="Test CPU", threads=2)
    runs = {
        # finals 80, 82, 84 (sd 2); curves (mean of epochs) 75, 77, 79
        "with residual connections": ([(70, 80), (72, 82), (74, 84)], [100, 200, 900],
                                      [10, 20, 60], 1000, 2_000_000, gpu),
        # finals 70, 71, 75 (sd sqrt(7e-4)); curves 60, 61, 65
        "without residual connections": ([(50, 70), (51, 71), (55, 75)], [50, 60, 70],
                                         [6, 6, 6], 900, 1_500_000, cpu),
        # finals 81, 82, 83 (sd 1); curves 78.5, 79.5, 80.5
        "pointwise first": ([(76, 81), (77, 82), (78, 83)], [10, 10, 10], [12, 12, 12], 1100,
                            2_500_000, cpu),
    }  # fmt: skip
    _put_runs(store, scale, "residual", runs)
    _put_runs(store, scale, "order", runs)
    assert len(list(store.dir.glob("*.json"))) == 9  # "depthwise first" is the baseline's runs
    results = write_outputs(tmp_path, scale, _FAKE_DATA, store)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["suites"] == json.loads(json.dumps(results["suites"]))
    assert saved["seed_noise"] == results["seed_noise"]
    assert list(results["suites"]) == ["residual", "order"]
    # pooled over the 3 distinct variants: (8e-4 + 1.4e-3 + 2e-4) / 6 = 4e-4, both metrics
    for metric in ("final", "curve"):
        assert results["seed_noise"][metric] == dict(std=pytest.approx(0.02), df=6)
    with_, without = results["suites"]["residual"]["variants"]
    assert with_ == dict(with_, seeds=3, val_acc_mean=pytest.approx(0.82),
                         val_acc_std=pytest.approx(0.02), params=1000, macs=2_000_000,
                         final_val_accs=pytest.approx([0.80, 0.82, 0.84]),
                         curve_val_accs=pytest.approx([0.75, 0.77, 0.79]),
                         curve_mean=pytest.approx([0.72, 0.82]),
                         curve_std=pytest.approx([0.02, 0.02]),
                         images_per_s=200, train_seconds=pytest.approx(30),
                         machines=["Test GPU (cuda)"])  # fmt: skip
    sd = math.sqrt(7e-4)
    assert without == dict(without, val_acc_mean=pytest.approx(0.72), val_acc_std=pytest.approx(sd),
                           curve_val_accs=pytest.approx([0.60, 0.61, 0.65]),
                           curve_mean=pytest.approx([0.52, 0.72]),
                           curve_std=pytest.approx([sd, sd]), images_per_s=60,
                           train_seconds=pytest.approx(6), machines=["Test CPU (cpu)"])  # fmt: skip
    final, curve = results["suites"]["residual"]["claims"]
    se = math.sqrt(4e-4 * (1 / 3 + 1 / 3))  # t = 2.447 at 6 df
    assert final == dict(final, verdict="holds", diff=pytest.approx(0.10), df=6,
                         se=pytest.approx(se), lo=pytest.approx(0.10 - 2.4469 * se, abs=1e-4),
                         hi=pytest.approx(0.10 + 2.4469 * se, abs=1e-4))  # fmt: skip
    assert curve == dict(curve, metric="curve", verdict="holds", diff=pytest.approx(0.15), df=6)
    (order,) = results["suites"]["order"]["claims"]
    assert order == dict(order, a="depthwise first", b="pointwise first", kind="equivalent",
                         diff=pytest.approx(0.0, abs=1e-12), df=6, verdict="inconclusive")  # fmt: skip

    rows = list(csv.reader(io.StringIO((tmp_path / "results.csv").read_text())))
    overrides = json.dumps(TINY.model, sort_keys=True)
    assert rows[0] == ["suite", "variant", "model", "overrides", "seeds", "val_acc_mean",
                       "val_acc_std", "params", "macs", "images_per_s", "train_seconds"]  # fmt: skip
    assert rows[1] == ["residual", "with residual connections", "xception-compact", overrides,
                       "3", "0.82000", "0.02000", "1000", "2000000", "200.0", "30.0"]  # fmt: skip
    assert rows[2][4:] == ["3", "0.72000", "0.02646", "900", "1500000", "60.0", "6.0"]
    assert [r[:2] for r in rows[3:]] == [["order", "depthwise first"], ["order", "pointwise first"]]

    report = (tmp_path / "REPORT.md").read_text()
    for line in (
        "| with residual connections | 3 | 82.00 +- 2.00 | 1,000 | 2.0 | 200 |",
        "| without residual connections | 3 | 72.00 +- 2.65 | 900 | 1.5 | 60 |",
        "| pointwise first | 3 | 82.00 +- 1.00 | 1,100 | 2.5 | 10 |",
        "(final accuracy: standard deviation 2.00 pp, 6 degrees of freedom; for the "
        "convergence claims",
        "with residual connections minus without residual connections: +10.00 pp, 95% interval "
        "+6.00 .. +14.00 pp (t at 6 df)",
        "without residual connections: +15.00 pp, 95% interval +11.00 .. +19.00 pp (t at 6 df)",
        # 90 + 18 + 36 seconds, the baseline's runs counted once though in two suites
        "Trained on: Test CPU (cpu); Test GPU (cuda); 2.4 min of training in all",
        "measured on: Test CPU, 2 threads.",
    ):
        assert line in report, line


def test_spectrum_report_and_plots_from_runs_written_by_hand(tmp_path, monkeypatch):
    """The best intermediate count with its Bonferroni interval in the report; the curves and
    the spectrum drawn from the runs' numbers (captured, not rendered to PNG)."""
    import dataclasses

    import xception.experiments as experiments
    from xception.experiments import Store, write_outputs

    figures = {}
    monkeypatch.setattr(
        experiments, "_save_figure", lambda fig, path: figures.update({path.name: fig})
    )
    scale = dataclasses.replace(TINY, segments=(2, 4))
    store = Store(tmp_path)
    gpu = dict(device="cuda", gpu="Test GPU", cpu="Test CPU", threads=2)
    cpu = dict(device="cpu", gpu=None, cpu="Test CPU", threads=2)
    runs = {"2 segments": ([(80, 84), (80, 86)], [1, 1], [1, 1], 3000, 9_000_000, [gpu, cpu]),
            "4 segments": ([(85, 89), (85, 91)], [1, 1], [1, 1], 2000, 8_000_000, gpu),
            "depthwise": ([(75, 79), (75, 81)], [1, 1], [1, 1], 1000, 7_000_000, gpu)}  # fmt: skip
    _put_runs(store, scale, "segments", runs)
    results = write_outputs(tmp_path, scale, _FAKE_DATA, store)
    rows = results["suites"]["segments"]["variants"]
    assert rows[0]["machines"] == ["Test CPU (cpu)", "Test GPU (cuda)"]
    (claim,) = results["suites"]["segments"]["claims"]
    # pooled 2e-4 at 3 df, se 0.01414; 2 comparisons: 97.5% intervals, t = 4.1765
    assert [(c["a"], c["verdict"]) for c in claim["comparisons"]] == [
        ("2 segments", "inconclusive"), ("4 segments", "holds")]  # fmt: skip
    assert claim["verdict"] == "holds"
    assert ("**holds**: a model between a regular conv and depthwise beats depthwise (the "
            "question the paper leaves open). best intermediate: 4 segments, +10.00 pp against "
            "depthwise (97.5% interval +4.09 .. +15.91, Bonferroni for 2 comparisons).") in (
        (tmp_path / "REPORT.md").read_text())  # fmt: skip

    assert sorted(figures) == ["segments-spectrum.png", "segments.png"]
    curves = figures["segments.png"].axes[0].get_lines()
    assert [list(line.get_xdata()) for line in curves] == [[1, 2]] * 3
    assert [list(line.get_ydata()) for line in curves] == [
        pytest.approx([80, 85]), pytest.approx([85, 90]), pytest.approx([75, 80])]  # fmt: skip
    ax, ax2 = figures["segments-spectrum.png"].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "depthwise"]
    bars = ax.containers[0]
    assert list(bars.lines[0].get_ydata()) == pytest.approx([85, 90, 80])
    sd = 100 * math.sqrt(2e-4)  # each count's two seeds: 1.41 pp
    assert [(seg[0][1], seg[1][1]) for seg in bars.lines[2][0].get_segments()] == [
        pytest.approx((y - sd, y + sd)) for y in (85, 90, 80)]  # fmt: skip
    params, macs = ax2.get_lines()
    assert list(params.get_ydata()) == pytest.approx([0.003, 0.002, 0.001])
    assert list(macs.get_ydata()) == pytest.approx([9, 8, 7])


def test_remeasuring_skips_unfinished_runs_and_updates_the_others(tmp_path, monkeypatch):
    import xception.experiments as experiments
    from xception.experiments import Store, run_config, run_key

    _no_plots(monkeypatch)
    monkeypatch.setattr(experiments, "dataset_info", lambda data: dict(_FAKE_DATA))
    monkeypatch.setattr(experiments, "_speed", lambda *a: dict(
        images_per_s=321.0, speed_machine=dict(cpu="here", threads=3, batch=8)))  # fmt: skip
    store = Store(tmp_path)
    variants, _ = suite_plan("residual", TINY, in_chans=1, num_classes=10)
    keys = [run_key(run_config(v, TINY, seed, _FAKE_DATA)) for seed in range(2) for v in variants]
    for key in keys[1:]:  # the first run of the plan is not finished
        store.put(_record(key))
    result = run_experiments(["residual"], tmp_path, TINY, remeasure_speed=True)
    assert (result["remeasured"], result["trained"]) == (3, 0)
    assert store.get(keys[0]) is None
    for key in keys[1:]:
        assert store.get(key) == dict(_record(key), images_per_s=321.0,
                                      speed_machine=dict(cpu="here", threads=3, batch=8))  # fmt: skip


def test_remeasuring_times_each_model_once_whatever_suites_and_seeds_share_it(
    tmp_path, monkeypatch
):
    """The paper's Xception is in every suite, under a label of each suite's own ("Xception",
    "with residual connections", ...): one measurement, the same number in all its runs."""
    import json

    import xception.experiments as experiments
    from xception.experiments import Store, run_config, run_key

    _no_plots(monkeypatch)
    monkeypatch.setattr(experiments, "dataset_info", lambda data: dict(_FAKE_DATA))
    built, speeds = [], iter(range(100, 200))
    monkeypatch.setattr(experiments, "_build", lambda variant, info: built.append(variant))
    monkeypatch.setattr(experiments, "_speed", lambda *a: dict(images_per_s=float(next(speeds))))
    store, configs = Store(tmp_path), {}
    for suite in ("residual", "mid-activation", "order"):
        for v in suite_plan(suite, TINY, in_chans=1, num_classes=10)[0]:
            config = json.dumps([v.model, v.overrides], sort_keys=True)
            for seed in range(TINY.seeds):
                key = run_key(run_config(v, TINY, seed, _FAKE_DATA))
                configs.setdefault(config, set()).add(key)
                store.put(_record(key))
    run_experiments(["residual", "mid-activation", "order"], tmp_path, TINY, remeasure_speed=True)
    assert len(built) == len(configs) == 5  # the base model, and 1, 2 and 1 changes of it
    for keys in configs.values():
        assert len({store.get(k)["images_per_s"] for k in keys}) == 1


def test_the_mean_curve_covers_the_epochs_every_seed_reached():
    """A seed whose history is shorter than the first seed's: the curve is averaged over the
    epochs all seeds have, not read past the end of one."""
    from xception.experiments import Variant, _summarise

    long = dict(_record("a", 0.6), history=[dict(val_top1=v) for v in (40.0, 50.0, 60.0)])
    short = dict(_record("b", 0.5), history=[dict(val_top1=v) for v in (30.0, 50.0)])
    summary = _summarise(Variant("X", "xception-compact", {}), [long, short])
    assert summary["curve_mean"] == pytest.approx([0.35, 0.5])
    assert summary["curve_std"] == pytest.approx([statistics.stdev([0.4, 0.3]), 0.0])
    assert summary["curve_val_accs"] == pytest.approx([0.5, 0.4])  # each seed's own mean


def test_a_run_the_engine_returns_without_validation_accuracy_is_an_error(tmp_path, monkeypatch):
    import xception.experiments as experiments

    monkeypatch.setattr(experiments, "dataset_info", lambda data: dict(_FAKE_DATA))
    monkeypatch.setattr(experiments, "train_run",
                        lambda config, workdir: dict(history=[dict(train_loss=1.0, wall_s=2.0)]))  # fmt: skip
    with pytest.raises(RuntimeError, match="the training engine returned no validation history"):
        run_experiments(["order"], tmp_path, TINY)
    assert not (tmp_path / "runs").exists()


def test_the_equivalence_margin_is_one_percentage_point():
    noise = (1e-5, 10)  # se of a difference of single values: sqrt(2e-5); t = 2.228: +-0.996 pp
    verdict, stats = compare([0.905], [0.90], "equivalent", noise)  # -0.50 .. +1.50 pp
    assert stats["hi"] == pytest.approx(0.005 + 2.228 * math.sqrt(2e-5), abs=1e-4)
    assert verdict == "inconclusive"
    assert compare([0.90], [0.90], "equivalent", noise)[0] == "holds"  # -1.00 .. +1.00, just
    assert compare([0.925], [0.90], "equivalent", noise)[0] == "does not hold"  # +1.50 .. +3.50
    assert compare([0.875], [0.90], "equivalent", noise)[0] == "does not hold"  # -3.50 .. -1.50


def test_results_and_report_are_written_atomically(tmp_path, monkeypatch):
    """Every output goes through `atomic_write`: an interrupted report never leaves a
    results.json cut short for the next run's `_dropped_suites` to misread."""
    import dataclasses

    import xception.experiments as experiments
    from xception.experiments import Store, write_outputs

    _no_plots(monkeypatch)
    written = []

    def recording(path, data):
        written.append(path.name)
        return atomic_write(path, data)

    atomic_write = experiments.atomic_write
    monkeypatch.setattr(experiments, "atomic_write", recording)
    scale = dataclasses.replace(TINY, seeds=1)
    store = Store(tmp_path)
    _put_runs(store, scale, "order", {"depthwise first": ([(50, 60)], [1], [1], 1, 1, None),
                                      "pointwise first": ([(50, 61)], [1], [1], 1, 1, None)})  # fmt: skip
    assert len(written) == 2  # the run records
    write_outputs(tmp_path, scale, _FAKE_DATA, store)
    assert written[2:] == ["results.json", "results.csv", "REPORT.md"]
