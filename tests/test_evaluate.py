"""`xception eval` and evaluate.py: run folders, checkpoint folders, weights files, multi-label."""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_data import _image_folder, make_idx_dataset
from test_train import tiny_recipe

from xception.checkpoint import list_checkpoints
from xception.cli import main
from xception.evaluate import evaluate_file, evaluate_model
from xception.train import fit
from xception.zoo import create_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data = make_idx_dataset(tmp / "toy")
    result = fit(tiny_recipe(tmp, data, epochs=2), out=str(tmp / "run"))
    return result, data


def test_eval_cli_on_run_and_checkpoint_folders_agrees_with_training(
    trained, capsys, tmp_path, monkeypatch
):
    from xception import runtime

    kept = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: kept.append(1) or True)
    result, data = trained
    out = tmp_path / "eval.json"
    # On the CPU, as trained: bitwise the same predictions as the run's last validation.
    argv = ["eval", "--checkpoint", result["out"], "--data", str(data), "--json", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    assert kept == [1]  # the CLI owns its process: glibc keeps freed memory
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    # The run folder's weights are the EMA weights the last validation used (test split = val).
    assert printed["top1"] == pytest.approx(result["final"]["val_top1"], abs=1e-3)
    assert printed["images"] == 64 and 0 <= printed["top1"] <= printed["top5"] <= 100
    ckpt = list_checkpoints(f"{result['out']}/checkpoints")[-1]
    raw = evaluate_file(ckpt, data, use_ema=False, device="cpu")
    assert raw["top1"] == pytest.approx(result["final"]["val_top1_raw"], abs=1e-3)
    assert "raw weights" in raw["checkpoint"]


def test_raw_on_a_run_folder_evaluates_the_raw_weights_of_its_newest_checkpoint(
    trained, capsys, tmp_path
):
    """A run folder's model.safetensors holds the EMA weights (EMA is on in the tiny recipe):
    --raw takes the raw ones from the run's newest checkpoint, and says so."""
    import shutil

    from safetensors.torch import load_file

    from xception.checkpoint import CheckpointError
    from xception.evaluate import load_for_eval

    result, data = trained
    ckpt = list_checkpoints(f"{result['out']}/checkpoints")[-1]
    net, info = load_for_eval(result["out"], use_ema=False)
    raw, ema = load_file(ckpt / "model.safetensors"), load_file(result["weights"])
    sd = {k: v for k, v in net.state_dict().items() if "num_batches" not in k}  # not loaded
    assert all(torch.equal(v, raw[k]) for k, v in sd.items())
    assert not all(torch.equal(v, ema[k]) for k, v in sd.items())
    assert info["source"].startswith(f"{ckpt} (raw weights")
    argv = ["eval", "--checkpoint", result["out"], "--data", str(data), "--device", "cpu"]
    assert main([*argv, "--raw"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["top1"] == pytest.approx(result["final"]["val_top1_raw"], abs=1e-3)
    assert printed["checkpoint"].startswith(str(ckpt)) and "raw weights" in printed["checkpoint"]
    # Without --raw: still the run folder's own (EMA) weights file.
    assert load_for_eval(result["out"])[1]["source"] == result["weights"]
    # No checkpoint left beside the final weights: only the EMA weights exist, say so.
    run = tmp_path / "run"
    shutil.copytree(result["out"], run, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(CheckpointError, match="holds only the run's EMA weights"):
        load_for_eval(run, use_ema=False)
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--raw"]) == 2
    err = capsys.readouterr().err
    assert "only the run's EMA weights" in err and len(err.strip().splitlines()) == 1


def test_a_runs_weights_file_describes_its_model_wherever_it_goes(trained, tmp_path):
    """The run's model.safetensors carries its config, classes and preprocessing: named
    directly, or copied away from its run folder, eval, predict and export rebuild the model."""
    import shutil

    from xception.evaluate import load_for_eval
    from xception.weights import read_safetensors_metadata

    result, data = trained
    run_file = f"{result['out']}/model.safetensors"
    config, meta = read_safetensors_metadata(run_file)
    card = json.loads(open(f"{result['out']}/model.json").read())
    assert config == card["model_config"] and config["middle_blocks"] != 8  # not the preset's
    assert (meta.format, meta.input_size, list(meta.categories), meta.num_classes) == (
        "xception", 16, card["classes"], len(card["classes"]))  # fmt: skip
    assert list(meta.mean) == card["mean"] and list(meta.std) == card["std"]
    # Named directly: the run folder's card is used, as for the folder itself.
    by_folder = evaluate_file(result["out"], data, device="cpu")
    by_file = evaluate_file(run_file, data, device="cpu")
    assert by_folder["checkpoint"] == by_file["checkpoint"] == run_file
    assert {k: v for k, v in by_file.items() if k != "seconds"} == {
        k: v for k, v in by_folder.items() if k != "seconds"}  # fmt: skip
    # Copied elsewhere, with no card beside it: the file alone rebuilds the same model.
    shutil.copy(run_file, tmp_path / "m.safetensors")
    net, info = load_for_eval(tmp_path / "m.safetensors")
    assert (info["image_size"], list(info["classes"])) == (16, card["classes"])
    ref, _ = load_for_eval(result["out"])
    x = torch.randn(2, net.config.in_chans, 16, 16)
    assert torch.equal(net.eval()(x), ref.eval()(x))
    copied = evaluate_file(tmp_path / "m.safetensors", data, device="cpu")
    assert copied["top1"] == by_folder["top1"] and copied["images"] == by_folder["images"]
    rebuilt = create_model("xception", weights=tmp_path / "m.safetensors")  # predict, export
    assert rebuilt.config == net.config
    assert list(rebuilt.weights_meta.categories) == card["classes"]  # predict names the classes
    assert rebuilt.weights_meta.input_size == 16  # export's default size
    # A checkpoint's weights file named directly: that checkpoint's raw weights.
    ckpt = list_checkpoints(f"{result['out']}/checkpoints")[-1]
    raw = evaluate_file(ckpt / "model.safetensors", data, device="cpu")
    assert raw["top1"] == evaluate_file(ckpt, data, use_ema=False, device="cpu")["top1"]
    assert "raw weights" in raw["checkpoint"]


def test_eval_on_a_plain_weights_file(tmp_path):
    model = create_model("xception-compact", num_classes=10).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    _image_folder(tmp_path / "imgs" / "val", classes=tuple("abcdefghij"), per_class=2, size=28)
    result = evaluate_file(tmp_path / "w.safetensors", tmp_path / "imgs", model="xception-compact")
    assert result["images"] == 20 and 0 <= result["top1"] <= result["top5"] <= 100
    # The same numbers by hand: Keras preprocessing (x / 127.5 - 1) at 28 px, argmax per image.
    from xception.data import make_eval_dataset

    ds = make_eval_dataset(tmp_path / "imgs", image_size=28)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        top1 = (model(x).argmax(1) == y).float().mean().item() * 100
    assert result["top1"] == pytest.approx(top1, abs=1e-3)
    with pytest.raises(Exception, match="does not fit"):  # the default preset is the paper's
        evaluate_file(tmp_path / "w.safetensors", tmp_path / "imgs")


def _evaluate_scores(scores, labels, **kw) -> dict:
    """Multi-label evaluation of a model whose scores are given: each "image" (C, 1, 1) holds
    its own scores, which the model passes through."""

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)

    class Data(torch.utils.data.Dataset):
        multilabel = True

        def __len__(self):
            return len(scores)

        def __getitem__(self, i):
            return scores[i].view(-1, 1, 1), labels[i]

        collate = staticmethod(torch.utils.data.default_collate)

    return evaluate_model(Fixed(), Data(), multilabel=True, **kw)


def test_multilabel_evaluation_reports_map_at_100():
    out = _evaluate_scores(torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1]]),
                           torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))  # fmt: skip
    # sample 0: its label ranks 2nd -> AP 1/2; sample 1: ranks 1 and 3 -> (1 + 2/3) / 2
    assert out["map100"] == pytest.approx(100 * (0.5 + (1 + 2 / 3) / 2) / 2)
    assert out["top1"] == pytest.approx(50.0) and out["n"] == 2


@pytest.mark.parametrize("multilabel", [True, False])
def test_sigmoid_loss_is_normalised_like_the_training_loss(multilabel):
    """Binary cross-entropy summed over classes and averaged over images, as training's
    sigmoid loss is: not divided by the class count too."""
    import math

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3]

    scores = [[0.9, -1.0, 0.5], [2.0, 0.8, -0.3]]
    targets = [[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]] if multilabel else [[0, 0, 1], [0, 1, 0]]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            y = torch.tensor(targets[i]) if multilabel else torch.tensor(targets[i].index(1))
            return torch.tensor(scores[i]).view(3, 1, 1), y

        collate = staticmethod(torch.utils.data.default_collate)

    # -log(sigmoid(z)) for a positive class, -log(1 - sigmoid(z)) for a negative one
    bce = lambda z, t: math.log1p(math.exp(z)) - t * z  # noqa: E731
    by_hand = sum(bce(z, t) for row, ts in zip(scores, targets, strict=True)
                  for z, t in zip(row, ts, strict=True)) / 2  # fmt: skip
    out = evaluate_model(Fixed(), Data(), multilabel=multilabel, loss="sigmoid")
    assert out["loss"] == pytest.approx(by_hand, rel=1e-6)


def test_eval_errors_are_one_line(capsys, tmp_path):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and len(err.strip().splitlines()) == 1


def test_eval_counts_only_the_images_it_scored(tmp_path, capsys):
    from test_data import _png_cut_in_its_pixels

    model = create_model("xception-compact", num_classes=3).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    root = _image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2, size=28)
    _png_cut_in_its_pixels(root / "a" / "cut.png")
    result = evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact",
                           batch_size=4)  # fmt: skip
    assert result["images"] == 6 and result["unreadable"] == 1
    for name in ("b", "c"):
        for f in (root / name).iterdir():
            f.unlink()
        for i in range(3):
            _png_cut_in_its_pixels(root / name / f"cut{i}.png")
    with pytest.raises(ValueError, match="7 of 9 images are unreadable"):
        evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact")


def test_eval_decodes_in_worker_processes_with_the_same_result(tmp_path, capsys):
    """`xception eval --workers N`: the engine could, the command had no way to ask (ImageNet's
    50,000 validation images decoded in the one process)."""
    from test_data import _png_cut_in_its_pixels

    model = create_model("xception-compact", num_classes=3).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    root = _image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=3, size=28)
    _png_cut_in_its_pixels(root / "a" / "cut.png")
    results = []
    for workers in ("0", "2"):
        argv = ["eval", "--checkpoint", str(tmp_path / "w.safetensors"), "--data", str(root),
                "--model", "xception-compact", "--batch-size", "4", "--workers", workers]  # fmt: skip
        assert main(argv) == 0
        results.append({k: v for k, v in json.loads(capsys.readouterr().out).items()
                        if k != "seconds"})  # fmt: skip
    assert results[0] == results[1]
    assert results[0]["images"] == 9 and results[0]["unreadable"] == 1
    assert main([*argv[:-1], "-1"]) == 2
    assert "--workers -1: give 0" in capsys.readouterr().err


def test_eval_of_a_grey_model_on_image_files_and_of_an_empty_split(tmp_path):
    import numpy as np
    from test_data import write_idx

    from xception.weights import save_safetensors

    model = create_model("xception-compact", num_classes=10, in_chans=1).eval()
    save_safetensors(model, tmp_path / "w.safetensors")  # its config says in_chans=1
    _image_folder(tmp_path / "imgs", classes=tuple("abcdefghij"), per_class=1, size=28)  # RGB
    result = evaluate_file(tmp_path / "w.safetensors", tmp_path / "imgs",
                           model="xception-compact")  # fmt: skip
    assert result["images"] == 10
    root = make_idx_dataset(tmp_path / "idx", classes=2)
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((0, 16, 16)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(0))
    with pytest.raises(ValueError, match="no images to evaluate"):
        evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.csv").write_text("path,labels\n")
    with pytest.raises(ValueError, match="has train.csv but no val.csv: pass --data"):
        evaluate_file(tmp_path / "w.safetensors", lists, model="xception-compact")


def test_multilabel_precision_at_1_does_not_take_a_nan_score_for_the_best():
    out = _evaluate_scores(torch.tensor([[float("nan"), 0.1, 0.2], [0.3, 0.3, 0.1]]),
                           torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))  # fmt: skip
    # argmax took the NaN for the top class (a hit); the tie at the top is half a hit.
    assert out["top1"] == pytest.approx((0 + 50) / 2)


def test_eval_of_a_diverged_model_is_valid_json(tmp_path, caplog):
    model = create_model("xception-compact", num_classes=3).eval()
    with torch.no_grad():  # finite weights whose outputs overflow: inf logits, a NaN loss
        model.fc.weight.fill_(3e38)
        model.fc.bias.fill_(3.4e38)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    root = _image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=1, size=28)
    result = evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact")
    json.dumps(result, allow_nan=False)  # was a bare NaN, which JSON readers (jq) refuse
    # Every output infinite: the ranking ties everywhere, so no accuracy either.
    assert result["loss"] is None and "not finite (loss, top1, top5)" in caplog.text
    assert result["top1"] is None and result["top5"] is None


def test_a_plain_weights_file_of_a_full_size_preset_is_evaluated_at_299_px(tmp_path, monkeypatch):
    """Only the compact presets are 28 px models: the paper's ablations (nonresidual, mid-relu,
    fc, ...) were evaluated at 28 px, where Xception's 32x downsampling leaves nothing."""
    from xception import zoo

    real = zoo.create_model
    small = dict(width=0.125, middle_blocks=1, fc_layers=())  # the layout, not the size, is tested
    monkeypatch.setattr(zoo, "create_model", lambda name, **kw: real(name, **small, **kw))
    from xception.evaluate import load_for_eval

    for name in ("xception-nonresidual", "xception-compact-nonresidual"):
        save_file(
            zoo.create_model(name, num_classes=3).state_dict(), str(tmp_path / "w.safetensors")
        )
        _, info = load_for_eval(tmp_path / "w.safetensors", model=name)
        assert info["image_size"] == (28 if "compact" in name else 299)


def test_weights_without_a_classifier_are_refused_not_scored_with_a_random_head(tmp_path, capsys):
    """A file without the top (imagenet-notop, or a fine-tuning backbone) got a fresh random
    1000-class head; the error then blamed the data ('the model has 1000 outputs')."""
    from xception.weights import WeightsError

    save_file(create_model("xception-compact", num_classes=0).state_dict(),
              str(tmp_path / "notop.safetensors"))  # fmt: skip
    root = _image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=1, size=28)
    with pytest.raises(WeightsError, match="weights without a classifier .* nothing to score"):
        evaluate_file(tmp_path / "notop.safetensors", root, model="xception-compact")
    argv = ["eval", "--checkpoint", str(tmp_path / "notop.safetensors"), "--data", str(root),
            "--model", "xception-compact"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "without a classifier" in err and "1000" not in err and len(err.splitlines()) == 1


def test_eval_prepares_images_as_the_weights_metadata_says(tmp_path, monkeypatch):
    """The weights' crop fraction and interpolation (timm's: 0.8975, bicubic) were ignored:
    every file was scored on Keras' square resize."""
    from PIL import Image

    import xception.data
    from xception.data import load_image
    from xception.weights import Weights, save_safetensors

    model = create_model("xception-compact", num_classes=2).eval()
    meta = Weights(name="crop", format="xception", num_classes=2, categories=("a", "b"),
                   input_size=24, crop_fraction=0.75, interpolation="bicubic")  # fmt: skip
    save_safetensors(model, tmp_path / "w.safetensors", meta)
    root = tmp_path / "imgs"
    for k, name in enumerate("ab"):
        (root / name).mkdir(parents=True)
        im = torch.randint(0, 255, (30, 40, 3), generator=torch.Generator().manual_seed(k))
        Image.fromarray(im.to(torch.uint8).numpy()).save(root / name / "0.png")
    made = []
    real = xception.data.make_eval_dataset
    monkeypatch.setattr(xception.data, "make_eval_dataset", lambda *a, **k: made.append(
        real(*a, **k)) or made[-1])  # fmt: skip
    result = evaluate_file(tmp_path / "w.safetensors", root, device="cpu")
    assert result["images"] == 2 and result["image_size"] == 24
    expected = meta.transforms()(load_image(root / "a" / "0.png"))
    assert torch.equal(made[0][0][0], expected)


def test_eval_of_a_run_on_its_own_training_folder_scores_the_held_out_images(tmp_path):
    """A run on class folders alone validates on a seeded held-out part; `xception eval` on the
    same folder scored every image, most of them ones the run trained on."""
    from xception.data import DataError

    flat = _image_folder(tmp_path / "flat", classes=("a", "b"), per_class=10, size=16)
    result = fit(tiny_recipe(tmp_path, flat, epochs=1, batch_size=8, augment="none",
                             val_fraction=0.3), out=str(tmp_path / "run"))  # fmt: skip
    out = evaluate_file(result["out"], flat, device="cpu")
    assert out["images"] == 6 and "held out in training (val_fraction=0.3" in out["split"]
    assert out["top1"] == pytest.approx(result["final"]["val_top1"], abs=1e-3)
    assert out["loss"] == pytest.approx(result["final"]["val_loss"], abs=1e-4)
    # One image more reshuffles the seeded split: it held out mostly images the run trained
    # on, and was scored as held out. The run's count of training images refuses it, from the
    # run folder and from a checkpoint alike.
    import shutil

    shutil.copy(flat / "a" / "0.png", flat / "a" / "extra.png")
    for source in (result["out"], list_checkpoints(tmp_path / "run" / "checkpoints")[-1]):
        with pytest.raises(DataError, match=r"21 images now, but the run trained on 14 of them "
                           r".*\(a val/ folder"):  # fmt: skip
            evaluate_file(source, flat, device="cpu")
    (flat / "a" / "extra.png").unlink()
    assert evaluate_file(result["out"], flat, device="cpu")["images"] == 6
    # Other data, or a file that knows nothing of a run: every image, no 'split'.
    copy = _image_folder(tmp_path / "copy", classes=("a", "b"), per_class=10, size=16)
    assert "split" not in evaluate_file(result["out"], copy, device="cpu")
    assert evaluate_file(result["out"], copy, device="cpu")["images"] == 20
    # A train/ folder alone: the run's held-out part; 'train' is no class folder.
    split = tmp_path / "split"
    _image_folder(split / "train", classes=("a", "b"), per_class=10, size=16)
    run2 = fit(tiny_recipe(tmp_path, split, epochs=1, batch_size=8, augment="none",
                           val_fraction=0.3), out=str(tmp_path / "run2"))  # fmt: skip
    assert evaluate_file(run2["out"], split, device="cpu")["images"] == 6
    save_file(create_model("xception-compact", num_classes=2).state_dict(),
              str(tmp_path / "w.safetensors"))  # fmt: skip
    with pytest.raises(DataError, match="has train/ but no val/"):  # was '1 classes, but ...'
        evaluate_file(tmp_path / "w.safetensors", split, model="xception-compact")


def test_limit_scores_a_fixed_sample_spread_over_the_classes(tmp_path, monkeypatch):
    """--limit took the first N images: in class folders, those of the first class alone."""
    import xception.evaluate as E

    save_file(create_model("xception-compact", num_classes=3).state_dict(),
              str(tmp_path / "w.safetensors"))  # fmt: skip
    root = _image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=4, size=28)
    seen = []
    real = E.evaluate_model
    monkeypatch.setattr(E, "evaluate_model", lambda net, ds, **k: seen.append(
        [ds[i][1] for i in range(len(ds))]) or real(net, ds, **k))  # fmt: skip
    for _ in range(2):
        out = evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact", limit=4)
        assert out["images"] == 4
    assert seen[0] == seen[1] and len(set(seen[0])) > 1  # was [0, 0, 0, 0]


def test_weights_names_and_files_that_restore_a_compact_model(tmp_path, monkeypatch):
    """`xception eval --checkpoint imagenet` said 'not found' (predict, convert and export
    take the name); a file restoring a compact config under the default preset name was
    scored at 299 px instead of the compact models' 28."""
    from xception import weights as W
    from xception.evaluate import load_for_eval
    from xception.weights import save_safetensors

    fetched = []
    save_file(create_model("xception-compact", num_classes=1000).state_dict(),
              str(tmp_path / "in1k.safetensors"))  # fmt: skip
    monkeypatch.setattr(W, "download", lambda meta, progress=True: fetched.append(meta.name)
                        or tmp_path / "in1k.safetensors")  # fmt: skip
    net, info = load_for_eval("imagenet", model="xception-compact")
    assert net.fc.out_features == 1000 and info["source"] == "imagenet"
    assert (info["image_size"], info["crop_fraction"]) == (28, 1.0)
    assert info["classes"] == W.WEIGHTS["imagenet"].categories  # folders match by name or ID
    with pytest.raises(W.WeightsError, match="without a classifier"):
        load_for_eval("imagenet-notop", model="xception-compact")
    assert fetched == ["imagenet"]  # the classifier-less file is refused before its download
    # A bare state dict converted without metadata: its config says compact.
    save_safetensors(create_model("xception-compact", num_classes=3), tmp_path / "c.safetensors")
    assert load_for_eval(tmp_path / "c.safetensors")[1]["image_size"] == 28  # was 299


class _Passthrough(torch.nn.Module):
    """A "model" whose logits are its input, flattened: the metrics see exactly these scores."""

    def forward(self, x):
        return x.flatten(1)


class _Scored(torch.utils.data.Dataset):
    """Single-label "images" (C, 1, 1) holding their own logits."""

    def __init__(self, logits, labels):
        self.logits, self.labels = logits, labels

    def __len__(self):
        return len(self.logits)

    def __getitem__(self, i):
        return self.logits[i].view(-1, 1, 1), self.labels[i]

    collate = staticmethod(torch.utils.data.default_collate)


def _hand_scores(logits, labels):
    """Mean softmax cross-entropy, and top-1/top-5 accuracy (%) counted one image at a time
    (no ties in the scores), in plain Python."""
    import math

    loss = top1 = top5 = 0.0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        loss += math.log(sum(math.exp(z) for z in row)) - row[y]
        rank = sum(z > row[y] for z in row)  # classes scored above the true one
        top1 += rank < 1
        top5 += rank < 5
    n = len(labels)
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def test_single_label_loss_and_top_k_match_a_hand_count_over_uneven_batches():
    """Loss is the mean cross-entropy per image (not a mean of batch means, nor of per-batch
    sums); top-5 counts the images whose class is among the 5 highest scores, top-1 the argmax
    hits. 11 images in batches of 4 (the last one short); 8 classes, so top-5 differs."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(11, 8, generator=gen, dtype=torch.float64).float()
    labels = torch.randint(0, 8, (11,), generator=gen)
    out = evaluate_model(_Passthrough(), _Scored(logits, labels), batch_size=4)
    expected = _hand_scores(logits, labels)
    assert expected["top1"] < expected["top5"] < 100  # the counts tell the metrics apart
    assert out["n"] == 11 and out["unreadable"] == 0
    for name in ("loss", "top1", "top5"):
        assert out[name] == pytest.approx(expected[name], rel=1e-5), name


def test_ranks_of_a_shard_split_score_every_image_once():
    """Under DDP, rank r of w scores images r, r + w, ...: the ranks' shards are disjoint and
    together cover the data (here without a process group, so each rank's sums stay its own)."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 6, generator=gen)
    labels = torch.randint(0, 6, (9,), generator=gen)
    data = _Scored(logits, labels)
    for world in (2, 3):
        total = 0
        for rank in range(world):
            out = evaluate_model(_Passthrough(), data, batch_size=2, rank=rank, world=world)
            mine = list(range(rank, 9, world))
            expected = _hand_scores(logits[mine], labels[mine])
            assert out["n"] == len(mine)
            assert out["loss"] == pytest.approx(expected["loss"], rel=1e-5)
            assert out["top1"] == pytest.approx(expected["top1"])
            total += out["n"]
        assert total == 9


def test_evaluation_restores_the_models_training_mode():
    """The training engine evaluates between epochs: a model left in eval mode would train on
    with frozen batch-norm statistics and no dropout."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), _Passthrough())
    data = _Scored(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    model.train()
    evaluate_model(model, data)
    assert seen == [False] and model.training and model[0].training  # scored in eval mode
    model.eval()
    evaluate_model(model, data)
    assert not model.training and not model[0].training


def test_autocast_runs_in_the_precision_asked_for():
    from xception.evaluate import autocast

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "none"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16' needs CUDA"):
        autocast(torch.device("cpu"), "fp16")


def test_eval_accepts_half_unreadable_images_and_refuses_more(tmp_path):
    """The data is refused only when more than half of its images cannot be read."""
    from test_data import _png_cut_in_its_pixels

    save_file(create_model("xception-compact", num_classes=2).state_dict(),
              str(tmp_path / "w.safetensors"))  # fmt: skip
    root = _image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2, size=28)
    for name in ("a", "b"):
        for i in range(2):
            _png_cut_in_its_pixels(root / name / f"cut{i}.png")
    result = evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact")
    assert (result["images"], result["unreadable"]) == (4, 4)
    (root / "a" / "0.png").unlink()
    with pytest.raises(ValueError, match="4 of 7 images are unreadable"):
        evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact")


def test_imagenet_weights_score_imagenets_own_folder_layout(tmp_path, capsys):
    """ImageNet's folders (val/n01440764/, ..., and Imagenette's) are named by WordNet ID, and
    ImageNet weights name their classes: every such folder was refused as "not in the training
    classes" (listing all 1000), so the paper's Table 1 could not be rerun on them. Each ID now
    scores as its class."""
    from xception.data import imagenet_wnids
    from xception.weights import WEIGHTS, save_safetensors

    model = create_model("xception-compact", num_classes=1000).eval()
    with torch.no_grad():  # every image is called a goldfish (class 1)
        model.fc.weight.zero_()
        model.fc.bias.copy_(-torch.arange(1000) / 100)  # no ties: toilet tissue comes last
        model.fc.bias[1] = 10.0
        model.fc.bias[0] = 5.0  # tench: second, inside the top 5
    meta = WEIGHTS["imagenet"].replace(name="in1k-test", input_size=28, crop_fraction=1.0)
    weights = save_safetensors(model, tmp_path / "in1k.safetensors", meta)
    wnids = imagenet_wnids()
    assert (wnids[0], wnids[1], wnids[999]) == ("n01440764", "n01443537", "n15075141")
    assert (meta.categories[0], meta.categories[1], meta.categories[999]) == (
        "tench", "goldfish", "toilet tissue")  # fmt: skip
    # goldfish, tench and toilet tissue, 2 images each: top-1 1/3, top-5 2/3
    data = _image_folder(tmp_path / "val", classes=("n01443537", "n01440764", "n15075141"),
                         per_class=2, size=28)  # fmt: skip
    result = evaluate_file(weights, data)
    assert result["images"] == 6
    assert result["top1"] == pytest.approx(100 / 3, abs=0.01)
    assert result["top5"] == pytest.approx(200 / 3, abs=0.01)
    # Folders that are neither are named, with a short list of the classes and the fix.
    other = _image_folder(tmp_path / "other", classes=("goldfish", "kitten"), size=28)
    assert main(["eval", "--checkpoint", str(weights), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "class folder(s) kitten are not in the training classes tench, goldfish," in err
    assert "by class name or WordNet ID (n01440764, ...)" in err
    assert "(1000 classes)" in err and len(err) < 600


def test_imagenet_wnids_are_imagenet_1ks_in_class_order():
    """The 1000 IDs, sorted (ImageNet's class order is the sorted IDs), as timm lists them."""
    from pathlib import Path

    import timm

    from xception.data import imagenet_wnids

    wnids = imagenet_wnids()
    assert len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    theirs = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
    assert wnids == tuple(theirs.read_text().split())


def test_a_batch_with_no_readable_image_is_skipped_not_the_end_of_the_data():
    """A batch whose images all failed to decode collates to (None, None): the batches after
    it are still scored (stopping there dropped them, and counted them as unreadable)."""

    class Holes(_Scored):
        def __getitem__(self, i):
            return (None, None) if i < 2 else super().__getitem__(i)

        @staticmethod
        def collate(batch):
            batch = [item for item in batch if item[0] is not None]
            return torch.utils.data.default_collate(batch) if batch else (None, None)

    logits = torch.tensor([[0.0, 1.0]] * 2 + [[2.0, 1.0], [0.5, 1.0], [3.0, 0.0], [1.0, 4.0]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    out = evaluate_model(_Passthrough(), Holes(logits, labels), batch_size=2)
    # images 2-5 scored: argmax hits on 2 (class 0) and 5 (class 1) -> 2 of 4
    assert (out["n"], out["unreadable"]) == (4, 2)
    assert out["top1"] == pytest.approx(50.0)


def test_bf16_logits_are_scored_in_float32():
    """Under amp='bf16' the model's logits are bfloat16: the loss is their cross-entropy in
    float32 (summed in bfloat16 it was off in the third digit)."""
    import math

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 7))
    x, y = torch.randn(40, 6), torch.randint(0, 7, (40,))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    loss = sum(math.log(sum(math.exp(z) for z in row)) - row[t]
               for row, t in zip(logits.double().tolist(), y.tolist(), strict=True)) / 40  # fmt: skip
    out = evaluate_model(model, _Scored(x, y), amp="bf16")
    assert out["loss"] == pytest.approx(loss, rel=1e-5)


def test_map_k_sets_the_cutoff_and_the_metrics_name():
    """`map_k`: MAP@k with that k, reported as 'map{k}' (it was always MAP@100)."""
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.9, 0.2, 0.3]])
    labels = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    out = _evaluate_scores(scores, labels, map_k=2)
    # sample 0: its labels rank 3rd and 4th, none in the top 2 -> AP@2 0 (AP@100 would be
    # (1/3 + 2/4) / 2); sample 1: ranks 1 and 2 -> AP@2 1
    assert "map100" not in out and out["map2"] == pytest.approx(50.0)
    assert out["top1"] == pytest.approx(50.0)


def test_sigmoid_loss_counts_the_classes_no_image_is_labelled_with():
    """The one-hot targets of the single-label sigmoid loss span all the model's classes, not
    just up to the largest label in the batch (a shape error, or a loss over fewer classes)."""
    import math

    scores = torch.tensor([[0.9, -1.0, 0.5, 2.0], [2.0, 0.8, -0.3, -0.5]])
    labels = torch.tensor([0, 1])  # classes 2 and 3 are nobody's
    bce = lambda z, t: math.log1p(math.exp(z)) - t * z  # noqa: E731
    by_hand = sum(bce(z, float(c == t)) for row, t in zip(scores.tolist(), labels.tolist(),
                  strict=True) for c, z in enumerate(row)) / 2  # fmt: skip
    out = evaluate_model(_Passthrough(), _Scored(scores, labels), loss="sigmoid")
    assert out["loss"] == pytest.approx(by_hand, rel=1e-6)


def test_channels_last_feeds_the_model_channels_last_images():
    """`channels_last=True` (the engine's layout on a GPU) hands the model NHWC-strided input;
    without it, the input is left as it is."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last))
            return x.mean((2, 3))

    class Images(_Scored):
        def __getitem__(self, i):
            return self.logits[i], self.labels[i]

    data = Images(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))
    evaluate_model(Probe(), data, channels_last=True)
    evaluate_model(Probe(), data)
    assert seen == [True, False]


def test_workers_decode_in_worker_processes():
    """`workers=N` decodes in N worker processes (evaluate_file passes its `workers` on); 0
    decodes in this one."""

    class WhereDecoded(_Scored):
        def __getitem__(self, i):  # scores class 1 when decoded in a worker, class 0 if not
            worker = torch.utils.data.get_worker_info() is not None
            return torch.tensor([0.0, 1.0] if worker else [1.0, 0.0]).view(2, 1, 1), 1

    data = WhereDecoded(torch.zeros(4, 2), torch.ones(4, dtype=torch.long))
    assert evaluate_model(_Passthrough(), data, workers=2)["top1"] == pytest.approx(100.0)
    assert evaluate_model(_Passthrough(), data, workers=0)["top1"] == pytest.approx(0.0)


def test_evaluate_file_passes_workers_on(tmp_path, monkeypatch):
    """`evaluate_file(workers=N)` is what `xception eval --workers N` calls: N reaches the
    evaluation loop (it decoded in one process whatever was asked)."""
    import xception.evaluate as E

    save_file(create_model("xception-compact", num_classes=2).state_dict(),
              str(tmp_path / "w.safetensors"))  # fmt: skip
    root = _image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=1, size=28)
    asked = []
    real = E.evaluate_model
    monkeypatch.setattr(E, "evaluate_model", lambda net, ds, **k: asked.append(k["workers"])
                        or real(net, ds, **k))  # fmt: skip
    evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact", workers=2)
    assert asked == [2]


def test_a_plain_weights_file_is_prepared_as_keras_does_and_at_the_size_asked_for(tmp_path):
    """A state dict without metadata: Keras' preprocessing (x / 127.5 - 1 on a square resize,
    no crop), softmax, no class names; `image_size` overrides the model's default size; a
    clean data set reports no 'unreadable' count."""
    from xception.evaluate import load_for_eval

    save_file(create_model("xception-compact", num_classes=2).state_dict(),
              str(tmp_path / "w.safetensors"))  # fmt: skip
    _, info = load_for_eval(tmp_path / "w.safetensors", model="xception-compact")
    assert (info["mean"], info["std"]) == ((0.5,) * 3, (0.5,) * 3)
    assert (info["crop_fraction"], info["interpolation"]) == (1.0, "bilinear")
    assert (info["classes"], info["loss"], info["multilabel"]) == (None, "softmax", False)
    root = _image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=1, size=40)
    out = evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact",
                        image_size=36)  # fmt: skip
    assert out["image_size"] == 36 and out["images"] == 2 and "unreadable" not in out


def test_weights_trained_with_the_sigmoid_loss_are_scored_with_it(tmp_path):
    """Weights whose metadata says loss='sigmoid' report the sigmoid loss (BCE summed over
    classes), not the softmax cross-entropy of the same logits."""
    import math

    from xception.data import make_eval_dataset
    from xception.weights import Weights, save_safetensors

    model = create_model("xception-compact", num_classes=2).eval()
    meta = Weights(name="sig", format="xception", num_classes=2, categories=("a", "b"),
                   input_size=28, crop_fraction=1.0, loss="sigmoid")  # fmt: skip
    save_safetensors(model, tmp_path / "w.safetensors", meta)
    root = _image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2, size=28)
    out = evaluate_file(tmp_path / "w.safetensors", root, device="cpu")
    ds = make_eval_dataset(root, image_size=28, classes=("a", "b"))
    with torch.no_grad():
        logits = model(torch.stack([ds[i][0] for i in range(len(ds))])).double().tolist()
    ys = [ds[i][1] for i in range(len(ds))]
    bce = lambda z, t: math.log1p(math.exp(z)) - t * z  # noqa: E731
    by_hand = sum(bce(z, float(c == t)) for row, t in zip(logits, ys, strict=True)
                  for c, z in enumerate(row)) / len(ys)  # fmt: skip
    assert out["loss"] == pytest.approx(by_hand, abs=1e-4)


def test_evaluate_files_own_checks_name_the_bad_value():
    """evaluate_file refuses a bad number before loading anything, naming it (a batch size of 0
    failed in range(), an image size of 0 fell back to the default, a limit of 0 said 'no
    images'); a device that is no device is refused in words."""
    from xception.evaluate import resolve_device

    for kw, said in ((dict(batch_size=0), "batch_size=0: give at least 1"),
                     (dict(workers=-1), "workers=-1: give 0"),
                     (dict(image_size=0), "image_size=0: give the input size"),
                     (dict(limit=0), "limit=0: give at least 1 image")):  # fmt: skip
        with pytest.raises(ValueError, match=said):
            evaluate_file("no-such-weights", "no-such-data", **kw)
    for name in (None, 1.5, "cuda:x", "bogus"):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(name)


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch):
    """cuda:N exists for N < the GPU count: on a 2-GPU machine cuda:1 is the last one, cuda:2
    is refused by name (not a CUDA error deep in the work)."""
    from xception.evaluate import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match="'cuda:2' does not exist: this machine has 2 GPU"):
        resolve_device("cuda:2")


def test_a_run_without_ema_holds_out_with_its_own_seed_and_raw_is_its_final_weights(tmp_path):
    """A run without EMA: its model.safetensors is the raw weights, so --raw scores that file
    (not a checkpoint); the held-out part is drawn with the run's seed (seed 0 drew another
    part, on which the run had trained); moved elsewhere, its data is no longer its own."""
    import shutil

    from xception.evaluate import load_for_eval

    flat = _image_folder(tmp_path / "flat", classes=("a", "b"), per_class=10, size=16)
    result = fit(tiny_recipe(tmp_path, flat, epochs=1, batch_size=8, augment="none", seed=5,
                             val_fraction=0.3, ema_decay=None), out=str(tmp_path / "run"))  # fmt: skip
    assert load_for_eval(result["out"], use_ema=False)[1]["source"] == result["weights"]
    out = evaluate_file(result["out"], flat, device="cpu")
    assert out["split"].endswith("(val_fraction=0.3, seed=5)") and out["images"] == 6
    assert out["loss"] == pytest.approx(result["final"]["val_loss"], abs=1e-4)
    # The run's data folder moved: it cannot be told for the same, every image is scored.
    moved = tmp_path / "moved"
    shutil.move(flat, moved)
    out = evaluate_file(result["out"], moved, device="cpu")
    assert "split" not in out and out["images"] == 20


def test_grey_data_for_a_colour_model_is_refused_in_words(tmp_path):
    """Fashion-MNIST's grey images for an RGB model: a one-line error naming both channel
    counts, not a convolution's shape error."""
    save_file(create_model("xception-compact", num_classes=4).state_dict(),
              str(tmp_path / "w.safetensors"))  # fmt: skip
    root = make_idx_dataset(tmp_path / "idx", classes=4)
    with pytest.raises(ValueError, match="1-channel images, but the model takes 3"):
        evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact")


def test_a_limited_multilabel_list_is_still_scored_as_multilabel(tmp_path):
    """`limit` wraps the data in a Subset: the multi-label flag is read through it (it was
    read off the Subset, and the multi-hot targets were scored as single-label ones)."""
    _image_folder(tmp_path / "img", classes=("a",), per_class=4, size=28)
    rows = ["path,labels", "img/a/0.png,cat dog", "img/a/1.png,dog", "img/a/2.png,bird;cat",
            "img/a/3.png,bird"]  # fmt: skip
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    save_file(create_model("xception-compact", num_classes=3).state_dict(),
              str(tmp_path / "w.safetensors"))  # fmt: skip
    out = evaluate_file(tmp_path / "w.safetensors", tmp_path, model="xception-compact", limit=3)
    assert out["multilabel"] is True and out["images"] == 3
    assert 0 <= out["map100"] <= 100 and "top5" not in out


def test_no_readable_image_at_all_says_how_many_were_unreadable(tmp_path):
    """Every image fails to decode: 'no images to evaluate (3 unreadable)', which says why."""
    from test_data import _png_cut_in_its_pixels

    save_file(create_model("xception-compact", num_classes=3).state_dict(),
              str(tmp_path / "w.safetensors"))  # fmt: skip
    for name in ("a", "b", "c"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        _png_cut_in_its_pixels(tmp_path / "imgs" / name / "cut.png")
    with pytest.raises(ValueError, match=r"no images to evaluate \(3 unreadable\)"):
        evaluate_file(tmp_path / "w.safetensors", tmp_path / "imgs", model="xception-compact")


def test_class_names_that_do_not_match_the_outputs_are_not_used(tmp_path):
    """A Keras/timm file whose metadata names 3 classes for a 4-output head: the names cannot
    be the outputs', so folders are matched to outputs in sorted order (classes None), not to
    a list one short."""
    from xception.evaluate import load_for_eval
    from xception.weights import WEIGHTS, save_safetensors

    meta = WEIGHTS["imagenet"].replace(name="t", input_size=28, crop_fraction=1.0,
                                       categories=("a", "b", "c"), num_classes=4)  # fmt: skip
    assert meta.format != "xception"
    save_safetensors(create_model("xception-compact", num_classes=4), tmp_path / "w.safetensors",
                     meta)  # fmt: skip
    net, info = load_for_eval(tmp_path / "w.safetensors", model="xception-compact")
    assert net.fc.out_features == 4 and info["classes"] is None
    root = _image_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=1, size=28)
    assert evaluate_file(tmp_path / "w.safetensors", root, model="xception-compact")["images"] == 4
