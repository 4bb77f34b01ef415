"""A demanding researcher's pass over the numbers that get quoted: top-1/top-5, MAP@100, losses,
for single- and multi-label data, from xception.metrics, evaluate_model, `xception eval` and the
training loop's validation, checked against scikit-learn and plain numpy references."""

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
from test_data import _image_folder, make_idx_dataset, write_idx
from test_train import tiny_recipe

from xception.cli import main
from xception.evaluate import evaluate_file, evaluate_model
from xception.metrics import average_precision_at_k, map_at_k, topk_correct

NAN = float("nan")


class _Passthrough(torch.nn.Module):
    """A "model" whose logits are its input: the metrics see exactly the scores given."""

    def forward(self, x):
        return x.flatten(1)


class _Scores(torch.utils.data.Dataset):
    """Fake images (C, 1, 1) holding their own scores, with single-label or multi-hot targets."""

    def __init__(self, scores, targets, multilabel=False):
        self.scores, self.targets, self.multilabel = scores, targets, multilabel

    def __len__(self):
        return len(self.scores)

    def __getitem__(self, i):
        return self.scores[i].view(-1, 1, 1), self.targets[i]

    collate = staticmethod(torch.utils.data.default_collate)


def _ap_at_k_numpy(scores, relevant, k):
    """AP@k of one row (no ties), straight from the definition: precision@i at every relevant
    rank i <= k, divided by min(k, number of relevant labels); a row with none scores 0."""
    hits, total = 0, 0.0
    for place, c in enumerate(np.argsort(-np.asarray(scores), kind="stable")[:k]):
        if relevant[c]:
            hits += 1
            total += hits / (place + 1)
    n = int(np.sum(relevant))
    return total / min(k, n) if n else 0.0


def _tied_scores(gen, n, k):
    """Scores drawn from 3 values (many ties), with some NaN and +-inf."""
    s = torch.randint(0, 3, (n, k), generator=gen).double()
    s[torch.rand(n, k, generator=gen) < 0.1] = NAN
    s[torch.rand(n, k, generator=gen) < 0.05] = float("inf")
    s[torch.rand(n, k, generator=gen) < 0.05] = float("-inf")
    return s


# ---------------------------------------------------------------------------------------------
# Agreement with independent computations
# ---------------------------------------------------------------------------------------------


def test_topk_equals_sklearns_top_k_accuracy_also_when_k_exceeds_the_class_count():
    """Without ties, topk_correct counts what sklearn's top_k_accuracy_score does, for k below,
    at and above the class count (top-5 of 3 classes: every image, as sklearn and timm say)."""
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(0)
    for classes in (3, 4, 7, 20):
        s = rng.normal(size=(37, classes))
        y = rng.integers(0, classes, 37)
        y[:classes] = np.arange(classes)  # every class present, as sklearn wants
        ours = topk_correct(torch.tensor(s), torch.tensor(y), (1, 2, 3, 5))
        for k in (1, 2, 3, 5):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn warns for k >= classes
                ref = top_k_accuracy_score(y, s, k=k, labels=range(classes), normalize=False)
            assert ours[k] == pytest.approx(ref), (classes, k)
    out = evaluate_model(_Passthrough(), _Scores(torch.randn(9, 3), torch.arange(9) % 3))
    assert out["top5"] == 100.0 and out["n"] == 9


def test_map_at_full_depth_equals_sklearns_label_ranking_and_per_sample_average_precision():
    """With k >= the class count and no ties, AP@k is the ordinary per-sample average precision:
    sklearn's label_ranking_average_precision_score and average_precision_score row by row."""
    from sklearn.metrics import average_precision_score, label_ranking_average_precision_score

    rng = np.random.default_rng(1)
    for classes in (2, 5, 17, 60):
        s = rng.normal(size=(25, classes))
        t = (rng.random((25, classes)) < 0.3).astype(int)
        t[t.sum(1) == 0, rng.integers(0, classes)] = 1  # sklearn's convention differs on empties
        ap = average_precision_at_k(torch.tensor(s), torch.tensor(t), 100).double().numpy()
        per_row = [average_precision_score(t[i], s[i]) for i in range(25)]
        assert ap == pytest.approx(per_row, abs=1e-6)
        assert map_at_k(torch.tensor(s), torch.tensor(t), 100) == pytest.approx(
            label_ranking_average_precision_score(t, s), abs=1e-6)  # fmt: skip


def test_map_at_100_matches_a_numpy_reference_with_unlabelled_rows_and_absent_classes():
    """MAP@100 over 150 classes against the definition in numpy: rows with no label score 0
    (documented: they count as misses), classes no row holds change nothing, and the cutoff at
    rank 100 and the divisor min(100, labels) hold."""
    rng = np.random.default_rng(2)
    s = rng.normal(size=(30, 150))
    t = (rng.random((30, 150)) < rng.random((30, 1)) * 0.9).astype(int)
    t[:3] = 0  # images without any positive label
    t[:, 140:] = 0  # classes absent from the evaluation set
    ref = np.mean([_ap_at_k_numpy(s[i], t[i], 100) for i in range(30)])
    assert ref > 0 and t.sum(1).max() > 100
    assert map_at_k(torch.tensor(s), torch.tensor(t), 100) == pytest.approx(ref, abs=1e-6)
    ap = average_precision_at_k(torch.tensor(s), torch.tensor(t), 100)
    assert ap[:3].tolist() == [0.0, 0.0, 0.0]


def test_multilabel_precision_at_1_on_one_hot_targets_is_single_label_top1_with_ties_and_nan():
    """The same rule everywhere: for one-hot targets, AP@1 (multi-label 'top1') equals
    topk_correct's top-1 sample by sample, ties and NaN included; so a dataset scored as
    multi-label or as single-label gets the same top-1."""
    gen = torch.Generator().manual_seed(3)
    s = _tied_scores(gen, 200, 6)
    y = torch.randint(0, 6, (200,), generator=gen)
    onehot = torch.nn.functional.one_hot(y, 6)
    ap1 = average_precision_at_k(s, onehot, 1)
    per_sample = [topk_correct(s[i : i + 1], y[i : i + 1], (1,))[1] for i in range(200)]
    assert ap1.tolist() == pytest.approx(per_sample, abs=1e-6)
    assert 0 < ap1.sum() < 200 and (ap1 % 1 != 0).any()  # ties give fractions


# ---------------------------------------------------------------------------------------------
# Streaming (batches, shards, ranks) against one pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multilabel", [False, True])
def test_any_batch_size_and_shard_split_gives_the_one_pass_numbers(multilabel):
    """Ties, NaN and +-inf scores, uneven last batches, shards of a 3-rank split (one rank gets
    fewer images): the per-image means combined by image count equal one pass over everything,
    and one pass equals the metric functions on the whole matrix."""
    gen = torch.Generator().manual_seed(4)
    n, k = 13, 7
    s = _tied_scores(gen, n, k).clamp(-30, 30).float()  # a finite loss to compare
    s[0, 2] = NAN  # ... except one row: ranked, not fatal
    y = ((torch.rand(n, k, generator=gen) < 0.4).float() if multilabel
         else torch.randint(0, k, (n,), generator=gen))  # fmt: skip
    data = _Scores(s, y, multilabel)
    kw = dict(multilabel=multilabel, map_k=5)
    one = evaluate_model(_Passthrough(), data, batch_size=n, **kw)
    if multilabel:
        assert one["map5"] == pytest.approx(100 * map_at_k(s, y, 5), rel=1e-6)
        assert one["top1"] == pytest.approx(100 * map_at_k(s, y, 1), rel=1e-6)
    else:
        hits = topk_correct(s, y, (1, 5))
        assert one["top1"] == pytest.approx(100 * hits[1] / n, rel=1e-6)
        assert one["top5"] == pytest.approx(100 * hits[5] / n, rel=1e-6)
    names = [m for m in one if m not in ("n", "unreadable", "loss")]
    for batch in (1, 2, 5):
        other = evaluate_model(_Passthrough(), data, batch_size=batch, **kw)
        for m in names:
            assert other[m] == pytest.approx(one[m], rel=1e-6), (batch, m)
    parts = [evaluate_model(_Passthrough(), data, batch_size=2, rank=r, world=3, **kw)
             for r in range(3)]  # fmt: skip
    assert [p["n"] for p in parts] == [5, 4, 4]
    for m in names:
        combined = sum(p[m] * p["n"] for p in parts) / n
        assert combined == pytest.approx(one[m], rel=1e-6), m


def _ddp_worker(rank, world, path, data, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        result = {}
        for name, (s, y, multilabel) in data.items():
            result[name] = evaluate_model(_Passthrough(), _Scores(s, y, multilabel), batch_size=2,
                                          multilabel=multilabel, rank=rank, world=world)  # fmt: skip
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_ranks_summed_over_a_real_process_group_give_the_one_process_result(tmp_path):
    """Three gloo ranks over 7 images (shards of 3, 2, 2) and over 2 images (the third rank
    scores nothing): the reduced numbers, 'n' included, are the single process's."""
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(5)
    s7 = _tied_scores(gen, 7, 6).clamp(-30, 30).float()
    data = {
        "single": (s7, torch.randint(0, 6, (7,), generator=gen), False),
        "multi": (s7, (torch.rand(7, 6, generator=gen) < 0.5).float(), True),
        "tiny": (s7[:2], torch.tensor([1, 4]), False),
    }
    mp.spawn(_ddp_worker, args=(3, str(tmp_path / "pg"), data, str(tmp_path / "r.pt")), nprocs=3)
    got = torch.load(tmp_path / "r.pt")
    for name, (s, y, multilabel) in data.items():
        want = evaluate_model(_Passthrough(), _Scores(s, y, multilabel), multilabel=multilabel)
        assert got[name]["n"] == want["n"] == len(s)
        for m, v in want.items():
            assert got[name][m] == pytest.approx(v, rel=1e-6, nan_ok=True), (name, m)


# ---------------------------------------------------------------------------------------------
# Training's validation numbers against `xception eval` of the same weights
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    from xception.train import fit

    tmp = tmp_path_factory.mktemp("run3")
    data = make_idx_dataset(tmp / "toy", n_train=128, n_test=40)
    result = fit(tiny_recipe(tmp, data, epochs=3, keep_last=10, eval_batch_size=7),
                 out=str(tmp / "run"))  # fmt: skip
    return result, data, tmp / "run"


def test_every_epochs_checkpoint_evaluates_to_that_epochs_history_row(run3):
    """Each epoch's checkpoint, evaluated by `xception eval` with a different batch size, gives
    that epoch's val_loss, val_top1, val_top5 (EMA weights) and val_top1_raw (--raw); the best
    checkpoint gives model.json's 'best' row; metrics.csv holds the same numbers."""
    from xception.checkpoint import list_checkpoints

    result, data, run = run3
    history = result["history"]
    steps = [p for p in list_checkpoints(run / "checkpoints") if p.name.startswith("step-")]
    assert len(steps) == len(history) == 3
    for ckpt, row in zip(steps, history, strict=True):
        assert ckpt.name == f"step-{row['step']:09d}"
        ema = evaluate_file(ckpt, data, device="cpu", batch_size=16)
        raw = evaluate_file(ckpt, data, device="cpu", batch_size=3, use_ema=False)
        assert ema["images"] == raw["images"] == 40
        assert ema["loss"] == pytest.approx(row["val_loss"], abs=1e-3)
        assert ema["top1"] == pytest.approx(row["val_top1"], abs=1e-3)
        assert ema["top5"] == pytest.approx(row["val_top5"], abs=1e-3)
        assert raw["top1"] == pytest.approx(row["val_top1_raw"], abs=1e-3)
    card = json.loads((run / "model.json").read_text())
    best = sorted((run / "checkpoints").glob("best-step-*"))[-1]
    assert best.name == f"best-step-{card['best']['step']:09d}"
    assert card["best"]["val_top1"] == max(r["val_top1"] for r in history)
    assert evaluate_file(best, data, device="cpu")["top1"] == pytest.approx(
        card["best"]["val_top1"], abs=1e-3)  # fmt: skip
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for row, hist in zip(rows, history, strict=True):
        for m in ("val_loss", "val_top1", "val_top5", "val_top1_raw"):
            assert float(row[m]) == pytest.approx(hist[m], rel=1e-5), m


def test_a_failed_eval_keeps_the_json_of_an_earlier_good_one(run3, tmp_path, capsys):
    """--json of an eval that fails (a dataset with an empty test split) leaves the earlier
    result file as it was, and the error is one line."""
    _, data, run = run3
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--device", "cpu",
                 "--json", str(out)]) == 0  # fmt: skip
    good = out.read_text()
    capsys.readouterr()
    empty = make_idx_dataset(tmp_path / "empty", n_train=8, n_test=1)
    write_idx(empty / "t10k-images-idx3-ubyte.gz", np.zeros((0, 16, 16)))
    write_idx(empty / "t10k-labels-idx1-ubyte.gz", np.zeros(0))
    assert main(["eval", "--checkpoint", str(run), "--data", str(empty), "--device", "cpu",
                 "--json", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no images to evaluate" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == good


# ---------------------------------------------------------------------------------------------
# Faults found (each fails on the code as it is, and passes once the fault is fixed)
# ---------------------------------------------------------------------------------------------


def test_training_on_data_whose_validation_split_is_empty_is_refused(tmp_path):
    """Training on IDX data whose test (validation) split holds no image ran to the end
    without a word, recorded NaN val_loss/val_top1/val_top5 in its history and metrics.csv,
    picked a NaN epoch as 'best', and wrote a model.json with bare NaN in it (not valid JSON;
    `xception eval` refuses the same data with 'no images to evaluate'). It is now refused
    before training, in one line saying the validation split is empty."""
    from xception.data import DataError
    from xception.train import fit

    data = make_idx_dataset(tmp_path / "toy", n_train=64, n_test=4)
    write_idx(data / "t10k-images-idx3-ubyte.gz", np.zeros((0, 16, 16)))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", np.zeros(0))
    run = tmp_path / "run"
    try:
        fit(tiny_recipe(tmp_path, data, epochs=1), out=str(run))
    except (ValueError, DataError) as err:
        assert "no" in str(err).lower() and len(str(err).splitlines()) == 1
        return
    card = (run / "model.json").read_text()
    json.loads(card, parse_constant=lambda c: pytest.fail(f"model.json holds a bare {c}"))
    pytest.fail("a run with no validation images was not refused")


def test_eval_of_a_model_whose_every_output_is_nan_reports_no_accuracy(tmp_path, caplog):
    """README promises that `xception eval` reports the metrics of a diverged model as null,
    but a model whose every logit is NaN (finite weights whose activations overflow) got
    top1 = 33.33 and top5 = 100.0 on 3 classes, chance-level numbers for a model that ranks
    nothing (all NaN scores tie); only the loss was null. Every metric is now null (with the
    warning) when the outputs are not finite."""
    from safetensors.torch import save_file

    from xception.zoo import create_model

    model = create_model("xception-compact", num_classes=3).eval()
    last_bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    with torch.no_grad():  # finite weights: features overflow to inf, then inf - inf = NaN
        last_bn.weight.fill_(3e38)
        last_bn.bias.fill_(3e38)
        model.fc.weight[:, 0::2] = 1.0
        model.fc.weight[:, 1::2] = -1.0
    assert model(torch.randn(2, 3, 28, 28)).isnan().all()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    root = _image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2, size=28)
    result = evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact",
                           device="cpu")  # fmt: skip
    assert result["loss"] is None and "not finite" in caplog.text
    assert result["top1"] is None and result["top5"] is None, result
    assert not any(isinstance(v, float) and math.isnan(v) for v in result.values())
