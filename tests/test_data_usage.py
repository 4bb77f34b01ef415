"""A demanding user's data and evaluation: own image folders and lists, `xception eval`, and
metrics checked against an independent computation."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import _image_folder
from test_train import tiny_recipe

from xception.data import load_image
from xception.evaluate import evaluate_file
from xception.metrics import average_precision_at_k, topk_correct
from xception.train import fit
from xception.weights import save_safetensors
from xception.zoo import create_model


def _png(path, width, height, bit_depth, colour_type, rows, chunks=()):
    """A PNG written chunk by chunk (Pillow writes no 16-bit grey PNG with a tRNS chunk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = zlib.compress(b"".join(b"\0" + row for row in rows))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + b"".join(chunk(k, d) for k, d in chunks)
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))  # fmt: skip
    return path


def _held_out_run(tmp_path, data, **extra):
    return fit(tiny_recipe(tmp_path, data, epochs=1, batch_size=8, augment="none",
                           val_fraction=0.3, **extra), out=str(tmp_path / "run"))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Faults found (each test failed on the code before its fix)
# ---------------------------------------------------------------------------------------------


def test_eval_of_a_run_trained_on_a_subset_of_its_own_folder_scores_the_held_out_part(tmp_path):
    """A run trained with `train_subset` (`--train-subset N`) on class folders alone
    records N training images; `xception eval` of that run on the very same, unchanged folder
    must score the part training held out (as without --train-subset), not refuse it with
    'N images now, but the run trained on ... of them' as if the data had changed."""
    flat = _image_folder(tmp_path / "flat", classes=("a", "b"), per_class=10, size=16)
    result = _held_out_run(tmp_path, flat, train_subset=8)
    out = evaluate_file(result["out"], flat, device="cpu")  # DataError on the current code
    assert out["images"] == 6 and "held out in training" in out["split"]


def test_eval_of_a_run_given_its_data_relative_to_another_folder_still_scores_held_out(
    tmp_path, monkeypatch
):
    """A run trained with a relative --data (`xception train --data flat`, as most users
    type it) and evaluated from another working directory on the same folder, by its absolute
    path, must score the part training held out. It scored every image, 14 of the 20 being
    images the run trained on, with no 'split' in the JSON: a silently inflated accuracy."""
    _image_folder(tmp_path / "flat", classes=("a", "b"), per_class=10, size=16)
    monkeypatch.chdir(tmp_path)
    result = fit(tiny_recipe(tmp_path, "flat", epochs=1, batch_size=8, augment="none",
                             val_fraction=0.3), out=str(tmp_path / "run"))  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = evaluate_file(result["out"], tmp_path / "flat", device="cpu")
    assert out["images"] == 6, "scored the images the run trained on"
    assert "held out in training" in out.get("split", "")


def test_eval_stops_when_most_images_are_unreadable_counting_those_the_listing_dropped(tmp_path):
    """'the run stops if most are unreadable'. Of 10 files, 4 fail the header check
    when the folder is listed and 3 more (truncated BMPs, whose header is fine) fail to decode:
    7 of 10 are unreadable, yet `xception eval` scored the 3 left and reported success, since
    each check sees only its own part (4 of 10, then 3 of 6). It must refuse, as it does when
    the 7 fail in either place alone."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, "BMP")
    bmp = buf.getvalue()
    val = tmp_path / "data" / "val"
    for name, (good, garbage, cut) in {"a": (2, 2, 1), "b": (1, 2, 2)}.items():
        (val / name).mkdir(parents=True)
        for i in range(good):
            (val / name / f"good{i}.bmp").write_bytes(bmp)
        for i in range(garbage):
            (val / name / f"garbage{i}.bmp").write_bytes(b"not an image")
        for i in range(cut):
            (val / name / f"cut{i}.bmp").write_bytes(bmp[: len(bmp) // 2])
    weights = tmp_path / "w.safetensors"
    save_safetensors(create_model("xception-compact", num_classes=2).eval(), weights)
    with pytest.raises(ValueError, match="unreadable"):
        result = evaluate_file(weights, tmp_path / "data", model="xception-compact",
                               device="cpu")  # fmt: skip
        pytest.fail(f"scored {result['images']} of 10 images, 7 unreadable: {result}")


def test_a_16_bit_grey_png_with_a_transparent_colour_is_composited_on_white(tmp_path):
    """A grey PNG's transparent colour (tRNS) is composited on white, as the 8-bit one
    is; the 16-bit one lost its tRNS when scaled to 8 bits, so its transparent pixels came out
    black (a 16-bit grey mask or scan exported with transparency)."""
    row = struct.pack(">HHHH", 0, 0, 65535, 65535)  # 2 transparent black, 2 opaque white
    eight = _png(tmp_path / "g8.png", 4, 4, 8, 0, [bytes([0, 0, 255, 255])] * 4,
                 [(b"tRNS", struct.pack(">H", 0))])  # fmt: skip
    sixteen = _png(tmp_path / "g16.png", 4, 4, 16, 0, [row] * 4, [(b"tRNS", struct.pack(">H", 0))])
    assert np.asarray(load_image(eight)).min() == 255  # the 8-bit one: all white
    assert np.asarray(load_image(sixteen))[:, :2].min() == 255, "transparent pixels came out black"


def test_minus_infinity_outranks_nan_in_top_k_and_average_precision():
    """'NaN ranks below every number' (metrics.py): -inf is a number, so a true class
    scored -inf among NaN scores is ranked first. NaN was mapped to -inf and tied with it, so
    top-1 counted 1/3 and AP@1 1/3 instead of 1."""
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[-inf, nan, nan]])
    assert topk_correct(scores, torch.tensor([0]), (1,))[1] == pytest.approx(1.0)
    assert average_precision_at_k(scores, torch.tensor([[1.0, 0, 0]]), 1).item() == pytest.approx(1)


def test_empty_rows_a_spreadsheet_adds_to_a_label_list_are_not_unreadable_images(tmp_path, caplog):
    """Spreadsheets export the empty rows below a table as ',,' lines. Such a row names
    no image: it must be skipped like a blank line (or refused by line number). It was read as
    an image at the list's own folder: 'skipping unreadable image <folder> (Is a directory)',
    counted as unreadable, and the second one warned as 'a row repeating an image'."""
    import logging

    from xception.data import DataError, read_label_list

    _image_folder(tmp_path / "img", classes=("x",), per_class=2, size=8)
    (tmp_path / "train.csv").write_text("path,labels\nimg/x/0.png,cat\nimg/x/1.png,dog\n,,\n,,\n")
    with caplog.at_level(logging.WARNING):
        samples, classes = read_label_list(tmp_path / "train.csv")
    assert (len(samples), classes) == (2, ("cat", "dog"))
    noise = [r.getMessage() for r in caplog.records]
    assert not any("unreadable" in m or "repeat" in m for m in noise), noise
    # Labels with no path name no image either, and are refused by their line.
    (tmp_path / "train.csv").write_text("img/x/0.png,cat\n  ,dog\n")
    with pytest.raises(DataError, match=r"train.csv:2: labels without an image path"):
        read_label_list(tmp_path / "train.csv")


def test_class_folders_named_in_decomposed_unicode_match_the_models_class_names(tmp_path):
    """macOS writes file names decomposed (NFD: 'e' + combining accent), Linux keeps
    what it is given (usually NFC). A model trained on Linux with a class 'café', evaluated on
    the same images copied from a Mac, was refused with 'class folder(s) café are not in the
    training classes bee, café' -- two names that look the same. Folder names should be
    matched to class names after Unicode normalisation."""
    import unicodedata

    from xception.data import read_label_list, scan_folder

    root = tmp_path / "val"
    for name in (unicodedata.normalize("NFD", "café"), "bee"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")
    samples, classes = scan_folder(root, classes=("bee", "café"))
    assert classes == ("bee", "café") and sorted(t for _, t in samples) == [0, 1]
    # A label list's labels likewise.
    (tmp_path / "val.csv").write_text(f"val/bee/a.png,{unicodedata.normalize('NFD', 'café')}\n")
    samples, _ = read_label_list(tmp_path / "val.csv", ("bee", "café"))
    assert samples[0][1].tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Checked and found right: guards
# ---------------------------------------------------------------------------------------------


def test_multilabel_eval_json_matches_numpy_over_every_label_syntax(tmp_path, capsys):
    """Guards `xception eval` on a val.csv mixing the three label syntaxes the README allows
    (spaces, ';', further columns), with a `path,labels` header, a row with no label and a
    row of two classes: the JSON file equals what is printed, counts every row, and its
    MAP@100, precision@1 and summed-over-classes sigmoid loss equal a numpy computation on
    the model's own outputs."""
    import json

    from xception.cli import main
    from xception.weights import Weights

    classes = ("ant", "bee", "cat", "dog")
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)).save(
            tmp_path / "img" / f"{i}.png")  # fmt: skip
        rows.append([c for c in classes if rng.random() < 0.4])
    rows[0], rows[1] = [], ["bee", "dog"]
    lines = ["path,labels"]
    for i, labels in enumerate(rows):
        cells = [" ".join(labels)] if i % 3 == 0 else [";".join(labels)] if i % 3 == 1 else labels
        lines.append(",".join([f"img/{i}.png", *cells]))
    (tmp_path / "val.csv").write_text("\n".join(lines) + "\n")
    net = create_model("xception-compact", num_classes=4).eval()
    meta = Weights(name="t", format="xception", num_classes=4, categories=classes,
                   input_size=16, loss="sigmoid")  # fmt: skip
    save_safetensors(net, tmp_path / "w.safetensors", meta)
    out = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(tmp_path / "w.safetensors"), "--data", str(tmp_path),
            "--device", "cpu", "--batch-size", "4", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert (printed["images"], printed["multilabel"], "unreadable" in printed) == (9, True, False)
    # By hand: x / 127.5 - 1, the model's scores, AP@100 = mean precision at each hit.
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "img" / f"{i}.png"),
                     np.float32) / 127.5 - 1).permute(2, 0, 1) for i in range(9)])  # fmt: skip
    with torch.no_grad():
        s = net(x).double().numpy()
    t = np.array([[c in labels for c in classes] for labels in rows], float)

    def ap(scores, rel):
        hits, total = 0, 0.0
        for place, c in enumerate(np.argsort(-scores)):
            if rel[c]:
                hits += 1
                total += hits / (place + 1)
        return total / max(1, rel.sum())

    assert printed["map100"] == pytest.approx(100 * np.mean([ap(s[i], t[i]) for i in range(9)]),
                                              abs=1e-3)  # fmt: skip
    assert printed["top1"] == pytest.approx(100 * t[np.arange(9), s.argmax(1)].mean(), abs=1e-3)
    bce = np.logaddexp(0, s) - t * s  # softplus(s) - t * s, summed over classes
    assert printed["loss"] == pytest.approx(bce.sum() / 9, abs=1e-3)


def test_top_k_and_average_precision_agree_with_sklearn_on_untied_scores():
    """Guards metrics.py against an independent implementation: sklearn's top-k accuracy and
    per-sample average precision (AP@k with k >= classes is sklearn's AP of the sample)."""
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for num_classes in (3, 7, 12):
        scores = rng.normal(size=(40, num_classes))
        target = rng.integers(0, num_classes, 40)
        hits = topk_correct(torch.tensor(scores), torch.tensor(target), (1, 2, 5, 100))
        for k in (1, 2, 5):
            want = (40 if k >= num_classes else sklearn.top_k_accuracy_score(
                target, scores, k=k, labels=list(range(num_classes)), normalize=False))  # fmt: skip
            assert hits[k] == pytest.approx(want)
        assert hits[100] == 40
        multi = rng.random((40, num_classes)) < 0.3
        multi[:, 0] |= ~multi.any(1)  # every sample has a label: sklearn needs one
        got = average_precision_at_k(torch.tensor(scores), torch.tensor(multi, dtype=torch.float32),
                                     100).numpy()  # fmt: skip
        want = [sklearn.average_precision_score(multi[i], scores[i]) for i in range(40)]
        assert got == pytest.approx(want, abs=1e-6)
