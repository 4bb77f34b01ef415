"""A practitioner's pass over training and evaluating on their own image files (not
Fashion-MNIST): class folders with odd names, mixed image modes and broken files, flat folders
split by val_fraction, multi-label lists, augment presets, fine-tuning from a run's weights,
then `xception predict` and `xception eval` on the run folder checked against a forward pass
by hand. Tiny models, 16 px images."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_data import _png_cut_in_its_pixels

from xception.cli import main
from xception.data import DataError, make_datasets
from xception.train import fit

TINY = dict(stem_channels=[8, 8], entry_channels=[8, 16, 16], middle_blocks=1,
            exit_channels=16, head_channels=[16, 16])  # fmt: skip
COMMON = dict(model="xception-compact", model_args=TINY, image_size=16, epochs=1, batch_size=6,
              threads=1, progress=False, ema_decay=None, lr=0.05, warmup_epochs=0,
              device="cpu")  # fmt: skip
# Sorted as folders are: 'café au lait' < 'plain' < '日本 猫'.
CLASSES = ("café au lait", "plain", "日本 猫")


def _pixels(rng, k, w=20, h=24):
    return (rng.random((h, w, 3)) * 80 + k * 80).astype(np.uint8)


def _mixed_class(folder, k, n, rng):
    """n images of class k in every mode a user's folder holds: RGB and RGBA PNG, palette GIF
    and PNG, JPEG, grey, 16-bit grey; every fourth in a nested sub-folder."""
    for i in range(n):
        a = _pixels(rng, k, 20 + i % 3, 24 - i % 2)
        where = folder / "nested" / "deeper" if i % 4 == 3 else folder
        where.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(a)
        kind = i % 6
        if kind == 0:
            im.save(where / f"{i}.png")
        elif kind == 1:
            rgba = im.convert("RGBA")
            rgba.putalpha(Image.fromarray(np.full(a.shape[:2], 180, np.uint8)))
            rgba.save(where / f"{i} with alpha.png")
        elif kind == 2:
            im.convert("P").save(where / f"{i}.gif")
        elif kind == 3:
            im.save(where / f"{i}.jpg", quality=95)
        elif kind == 4:
            im.convert("L").save(where / f"{i} grey.png")
        else:
            Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(where / f"{i}_16bit.png")


def _own_photos(root):
    """train/ and val/ class folders with unicode and space class names, mixed modes, nested
    folders, a zero-byte file and a not-an-image file (both fail the header check) and a PNG
    cut in its pixels (passes it, fails to decode) in train/ and in val/."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        _mixed_class(root / "train" / name, k, 10, rng)
        _mixed_class(root / "val" / name, k, 4, rng)
    (root / "train" / "plain" / "empty.png").write_bytes(b"")
    (root / "train" / "plain" / "notes.jpg").write_text("not an image")
    _png_cut_in_its_pixels(root / "train" / "plain" / "cut.png")
    _png_cut_in_its_pixels(root / "val" / "plain" / "cut.png")
    return root


@pytest.fixture(scope="module")
def photos_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("photos")
    data = _own_photos(tmp / "data")
    runs = {w: fit("fashion-mnist", data=str(data), out=str(tmp / f"run{w}"), workers=w, **COMMON)
            for w in (0, 2)}  # fmt: skip
    return tmp, data, runs


def _hand_logits(weights_file, paths, num_classes, size=16):
    """The run's model rebuilt from its preset and state dict, fed images prepared by hand as
    Keras does (load as RGB, bilinear square resize, x / 127.5 - 1)."""
    from xception import create_model
    from xception.data import load_image

    net = create_model("xception-compact", num_classes=num_classes, **TINY)
    net.load_state_dict(load_file(str(weights_file)))
    x = torch.stack([
        torch.from_numpy(np.asarray(load_image(p).resize((size, size), Image.BILINEAR),
                                    np.float32) / 127.5 - 1).permute(2, 0, 1)
        for p in paths
    ])  # fmt: skip
    with torch.no_grad():
        return net.eval()(x).double()


# ---------------------------------------------------------------------------------------------
# Checked and found right
# ---------------------------------------------------------------------------------------------


def test_own_class_folders_train_the_same_with_0_and_2_workers_and_count_right(photos_run):
    """Unicode and space class names, nested folders and every image mode train; the zero-byte
    and the text file are left out of the counts (the cut PNG is listed: it passes the header
    check and is replaced in training); two decoding workers give bitwise the same run."""
    tmp, data, runs = photos_run
    for result in runs.values():
        assert result["classes"] == list(CLASSES)
    a, b = load_file(runs[0]["weights"]), load_file(runs[2]["weights"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("images_per_s", "epoch_s", "wall_s")}  # noqa: E731
    assert strip(runs[0]["final"]) == strip(runs[2]["final"])
    card = json.loads((tmp / "run0" / "model.json").read_text())
    assert card["classes"] == list(CLASSES)
    assert (card["data"]["train_images"], card["data"]["val_images"]) == (31, 13)
    assert card["image_size"] == 16


def test_predict_and_eval_on_the_run_agree_with_each_other_and_a_forward_pass_by_hand(
        photos_run, capsys):  # fmt: skip
    """`xception predict` on val/ with the run folder labels with the run's class names and
    gives softmax of the hand logits (1e-4); `xception eval` on the data scores val/ (the cut
    PNG left out and counted), and its top-1 and loss equal the hand forward pass, and top-1
    equals predict's rows counted by folder."""
    tmp, data, _ = photos_run
    run = tmp / "run0"
    assert main(["predict", str(data / "val"), "--weights", str(run), "--format", "json",
                 "--topk", "3", "--no-progress"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    good = [r for r in rows if r["error"] is None]
    assert len(rows) == 13 and len(good) == 12 and "cut.png" in next(
        r["path"] for r in rows if r["error"])  # fmt: skip
    paths = [r["path"] for r in good]
    truth = [CLASSES.index(p.split("/val/")[1].split("/")[0]) for p in paths]
    logits = _hand_logits(run / "model.safetensors", paths, 3)
    probs = logits.softmax(1).numpy()
    for row, p in zip(good, probs, strict=True):
        assert {r["label"] for r in row["predictions"]} == set(CLASSES)
        for r in row["predictions"]:
            assert r["label"] == CLASSES[r["index"]]
            assert r["probability"] == pytest.approx(p[r["index"]], abs=1e-4)
    out = tmp / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--device", "cpu",
                 "--json", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert (result["images"], result.get("unreadable")) == (12, 1)
    y = torch.tensor(truth)
    hand_top1 = 100 * (logits.argmax(1) == y).double().mean().item()
    assert result["top1"] == pytest.approx(hand_top1, abs=1e-3)
    predicted = [CLASSES.index(r["predictions"][0]["label"]) for r in good]
    assert result["top1"] == pytest.approx(100 * np.mean(np.array(predicted) == truth), abs=1e-3)
    assert result["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), abs=1e-3)  # fmt: skip


def test_fine_tuning_from_a_runs_folder_with_another_class_count_loads_all_but_the_head(
        photos_run, tmp_path, caplog):  # fmt: skip
    """--weights RUN (3 classes) on 2-class data without model_args: the run's config is
    restored, every backbone tensor equals the run's, the head is fresh with 2 outputs."""
    from helpers import training_engine

    tmp, _, runs = photos_run
    rng = np.random.default_rng(1)
    for k, name in enumerate(("x", "y")):
        (tmp_path / "two" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(_pixels(rng, k)).save(tmp_path / "two" / name / f"{i}.png")
    recipe = dict(recipe="fashion-mnist", data=str(tmp_path / "two"), image_size=24, epochs=1,
                  batch_size=4, threads=1, progress=False, ema_decay=None, device="cpu",
                  model="xception-compact")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        engine = training_engine(recipe, "cpu", out=str(tmp_path / "ft"), weights=str(tmp / "run0"))
    assert "classifier not loaded" in caplog.text
    src, sd = load_file(runs[0]["weights"]), engine.model.state_dict()
    assert engine.model.fc.out_features == 2 and engine.classes == ("x", "y")
    backbone = [k for k in src if not k.startswith("fc.") and "num_batches" not in k]
    assert backbone and all(torch.equal(sd[k], src[k]) for k in backbone)
    assert src["fc.weight"].shape[0] == 3 and sd["fc.weight"].shape[0] == 2


def test_augment_presets_on_files_of_another_size(tmp_path):
    """Files of 20-22 x 23-24 px trained at 16 px: 'none' is the validation transform exactly;
    'small' is the square resize shifted by at most crop_padding (zero padding: -1 after
    normalising), perhaps flipped; 'imagenet' crops change from epoch to epoch and are no
    plain resize."""
    from xception.data import eval_preset, load_image, train_transform

    rng = np.random.default_rng(3)
    for split, n in (("train", 6), ("val", 2)):
        for name in ("a", "b"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (23 + i % 2, 20 + i % 3, 3), np.uint8)).save(
                    folder / f"{i}.png")  # fmt: skip
    resize = eval_preset("keras", 16)
    train, val = make_datasets(tmp_path, image_size=16, augment="none")
    for i in range(len(train)):
        assert torch.equal(train[i][0], resize(load_image(train.samples[i][0])))
    assert val[0][0].shape == (3, 16, 16)
    train, _ = make_datasets(tmp_path, image_size=16, augment="small", padding=2)
    for epoch in range(3):
        train.set_epoch(epoch)
        for i in range(len(train)):
            x = train[i][0]
            base = resize(load_image(train.samples[i][0]))
            padded = torch.nn.functional.pad(base, (2, 2, 2, 2), value=-1.0)
            shifts = [padded[:, dy : dy + 16, dx : dx + 16] for dy in range(5) for dx in range(5)]
            assert any(torch.equal(x, s) or torch.equal(x, s.flip(-1)) for s in shifts)
    train, _ = make_datasets(tmp_path, image_size=16, augment="imagenet")
    crops = []
    for epoch in range(4):
        train.set_epoch(epoch)
        crops.append(train[0][0])
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert len({c.sum().item() for c in crops}) > 1
    plain = train_transform("none", 16)(load_image(train.samples[0][0]))
    assert any(not torch.allclose(c, plain) for c in crops)


def test_train_subset_of_a_flat_folder_and_eval_of_its_held_out_part(tmp_path):
    """A flat folder of class folders, split by val_fraction; --train-subset takes some of the
    training part; eval of the run on the folder scores the held-out part only."""
    from xception.evaluate import evaluate_file

    rng = np.random.default_rng(4)
    for k, name in enumerate(("ant", "bee")):
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(_pixels(rng, k)).save(tmp_path / "d" / name / f"{i}.jpg")
    result = fit("fashion-mnist", data=str(tmp_path / "d"), out=str(tmp_path / "run"),
                 val_fraction=0.2, train_subset=12, **COMMON)  # fmt: skip
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert (card["data"]["train_images"], card["data"]["split_images"],
            card["data"]["val_images"]) == (12, 16, 4)  # fmt: skip
    scored = evaluate_file(tmp_path / "run", tmp_path / "d", device="cpu")
    assert scored["images"] == 4 and "held out" in scored["split"]
    assert scored["top1"] == pytest.approx(result["final"]["val_top1"], abs=1e-3)


def test_multilabel_list_run_predicts_sigmoids_and_evaluates_its_held_out_rows(tmp_path,
                                                                               capsys):  # fmt: skip
    """A jft run on train.csv alone (unicode labels, ';' and further columns): predict gives
    one sigmoid per class of the hand logits; eval of the folder scores the held-out rows with
    MAP@100."""
    rng = np.random.default_rng(5)
    (tmp_path / "l" / "img").mkdir(parents=True)
    rows = ["path,labels"]
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (18, 22, 3), np.uint8)).save(
            tmp_path / "l" / "img" / f"{i}.png")  # fmt: skip
        rows.append(f"img/{i}.png,été;{'chien' if i % 2 else 'chat'}" if i % 3 else
                    f"img/{i}.png,été,chat")  # fmt: skip
    (tmp_path / "l" / "train.csv").write_text("\n".join(rows) + "\n")
    result = fit("jft", model="xception-compact", model_args=TINY, data=str(tmp_path / "l"),
                 image_size=16, epochs=1, batch_size=6, threads=1, workers=0, progress=False,
                 val_fraction=0.25, checkpoint_every=0, out=str(tmp_path / "run"),
                 device="cpu")  # fmt: skip
    assert result["classes"] == ["chat", "chien", "été"] and "val_map100" in result["final"]
    img = tmp_path / "l" / "img" / "1.png"
    assert main(["predict", str(img), "--weights", str(tmp_path / "run"), "--format", "json",
                 "--no-progress"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out)[0]
    sig = _hand_logits(tmp_path / "run" / "model.safetensors", [img], 3).sigmoid()[0].numpy()
    assert len(row["predictions"]) == 3
    for r in row["predictions"]:
        assert r["probability"] == pytest.approx(sig[r["index"]], abs=1e-4)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "l"),
                 "--device", "cpu"]) == 0  # fmt: skip
    scored = json.loads(capsys.readouterr().out)
    assert (scored["images"], scored["multilabel"]) == (4, True) and "held out" in scored["split"]
    assert scored["map100"] == pytest.approx(result["final"]["val_map100"], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


def _flat(root, classes, per_class=8):
    rng = np.random.default_rng(6)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_pixels(rng, k % 3)).save(root / name / f"{i}.png")
    return root


def test_a_flat_folder_with_a_class_named_train_trains_on_its_classes(tmp_path):
    """A flat folder of class folders where one class is named 'train' (CIFAR-100's and
    Pascal VOC's classes include 'train') could not be trained: make_datasets took data/train
    for the training split and failed with "data/train: no class folders". A 'train' folder
    holding images rather than class folders is now a class."""
    data = _flat(tmp_path / "vehicles", ("bus", "car", "train"))
    result = fit("fashion-mnist", data=str(data), out=str(tmp_path / "run"), val_fraction=0.25,
                 **COMMON)  # fmt: skip
    assert result["classes"] == ["bus", "car", "train"]


def test_eval_of_a_run_on_a_flat_folder_with_a_class_named_val_scores_its_held_out_part(
        tmp_path):  # fmt: skip
    """A flat folder with a class named 'val' trained (its 'val' is a class there), but
    `xception eval` of the run on the same folder took data/val for a validation split and
    failed with "data/val: no class folders". Both now read the folder one way, and eval
    scores the run's held-out part."""
    from xception.evaluate import evaluate_file

    data = _flat(tmp_path / "d", ("cat", "val"))
    result = fit("fashion-mnist", data=str(data), out=str(tmp_path / "run"), val_fraction=0.25,
                 **COMMON)  # fmt: skip
    assert result["classes"] == ["cat", "val"]
    scored = evaluate_file(tmp_path / "run", data, device="cpu")
    assert scored["images"] == 4 and "held out" in scored["split"]


def test_a_class_folder_whose_every_image_fails_to_decode_is_an_error_in_training(tmp_path):
    """README: "a class folder with no readable image is an error". A class folder whose
    PNGs passed the header check but all failed to decode trained silently as a class the model
    never saw an image of (each was replaced by another class's image). It is now a DataError
    naming the class."""
    data = _flat(tmp_path / "d", ("a", "b"))
    (data / "c").mkdir()
    for i in range(3):
        _png_cut_in_its_pixels(data / "c" / f"{i}.png")
    with pytest.raises(DataError, match=r"c.*no readable"):
        fit("fashion-mnist", data=str(data), out=str(tmp_path / "run"), val_fraction=0.25,
            **COMMON)  # fmt: skip


def test_training_stops_when_most_images_fail_to_decode(tmp_path):
    """README: "the run stops if most are unreadable". With 12 of 16 images failing to
    decode (they pass the header check), `xception train` ran to the end on the 4 others,
    repeated in their place. Training now counts decode failures too and stops with a
    DataError."""
    data = _flat(tmp_path / "d", ("a", "b"), per_class=2)
    for name in ("a", "b"):
        for i in range(6):
            _png_cut_in_its_pixels(data / name / f"cut{i}.png")
    with pytest.raises(DataError, match="unreadable"):
        fit("fashion-mnist", data=str(data), out=str(tmp_path / "run"), val_fraction=0.25,
            **dict(COMMON, batch_size=4))  # fmt: skip


def test_a_valid_folder_beside_train_is_named_as_not_read(tmp_path, caplog):
    """Kaggle's and Roboflow's `train/` + `valid/` layout: `valid/` was ignored without a word
    and a part of `train/` held out instead; the warning now names the folder and the fix."""
    from xception.data import make_datasets

    data = tmp_path / "d"
    _flat(data / "train", ("a", "b"))
    _flat(data / "valid", ("a", "b"))
    with caplog.at_level("WARNING", logger="xception"):
        make_datasets(data, image_size=16, val_fraction=0.25)
    assert "valid is not read as the validation part" in caplog.text and "val/" in caplog.text
