"""A practitioner's pass over `xception predict` and `xception.predict.predict`: own fine-tuned
weights (a tiny compact model saved with class names, softmax and sigmoid), folders of photos
with odd names and odd files, every output format read back exactly, closed streams, and the
probabilities checked against the model's logits computed by hand."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xception import create_model
from xception.cli import main
from xception.data import load_image
from xception.predict import find_images, predict
from xception.weights import Weights, save_safetensors

CLASSES = ("cat, black", 'dog "x"', "bird")  # names a CSV must quote
SIZE = 24
XCEPTION = Path(sys.executable).with_name("xception")


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm statistics away from their defaults, so that outputs depend on the image."""
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.2, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(model, softmax file, sigmoid file): one 3-class compact model, as a user's own weights."""
    torch.manual_seed(0)
    model = _randomised(create_model("xception-compact", num_classes=3, width=0.25,
                                     middle_blocks=1))  # fmt: skip
    meta = Weights(name="mine", format="xception", num_classes=3, categories=CLASSES,
                   input_size=SIZE)  # fmt: skip
    root = tmp_path_factory.mktemp("weights")
    soft = save_safetensors(model, root / "mine.safetensors", meta)
    sig = save_safetensors(model, root / "multi.safetensors", meta.replace(loss="sigmoid"))
    return model, soft, sig


def _noise(path, h=30, w=40, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return Path(path)


def _by_hand(model, path) -> torch.Tensor:
    """The logits of the image at `path` prepared as the metadata says, with PIL and numpy:
    a square bilinear resize to SIZE, RGB scaled to [-1, 1]."""
    image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 127.5 - 1
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None])[0]


def _run_bytes(monkeypatch, argv) -> tuple[int, bytes]:
    """`main(argv)` with a strict UTF-8 stdout, as in an en_US.UTF-8 terminal: its bytes."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    status = main([*map(str, argv), "--no-progress"])
    out.flush()
    return status, out.buffer.getvalue()


# Regression guards ------------------------------------------------------------------------------
def test_cli_probabilities_are_softmax_or_sigmoid_of_the_logits_computed_by_hand(
    weights, tmp_path, capsys
):
    """Own weights with class names, softmax and multi-label: each JSON row holds every class
    (--topk 10 of 3), best first, with the probability of the logits of the image prepared by
    hand; the CSV has one column group per class the model has."""
    model, soft, sig = weights
    images = [_noise(tmp_path / f"{i}.png", 30 + 9 * i, 40, seed=i) for i in range(3)]
    logits = [_by_hand(model, p) for p in images]
    assert (
        max((a - b).abs().max().item() for a, b in zip(logits[:-1], logits[1:], strict=True)) > 1e-3
    )
    for path, activation in ((soft, "softmax"), (sig, "sigmoid")):
        argv = ["predict", *map(str, images), "--weights", str(path), "--topk", "10",
                "--format", "json", "--batch-size", "2", "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["path"] for r in rows] == list(map(str, images))
        for row, z in zip(rows, logits, strict=True):
            expected = z.softmax(-1) if activation == "softmax" else z.sigmoid()
            assert row["error"] is None and len(row["predictions"]) == 3
            assert [p["index"] for p in row["predictions"]] == z.argsort(descending=True).tolist()
            for p in row["predictions"]:
                assert p["label"] == CLASSES[p["index"]]
                assert p["probability"] == pytest.approx(expected[p["index"]].item(), abs=1e-5)
    argv[argv.index("json")] = "csv"
    assert main(argv) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert header == ["path", "error"] + [f"{c}_{k}" for k in (1, 2, 3)
                                          for c in ("index", "label", "probability")]  # fmt: skip


def test_csv_and_json_keep_odd_file_names_and_labels_exactly(weights, tmp_path, monkeypatch):
    """File names with a comma, a quote, a newline and a Latin-1 byte, labels with a comma and
    quotes, and an unreadable file: the CSV read back by a CSV reader gives the very names,
    labels, the JSON's probabilities to 6 places, and empty cells on the error row."""
    _, soft, _ = weights
    root = os.fsencode(tmp_path / "photos")
    os.mkdir(root)
    names = [b"a,b.png", b'q"uote.png', b"new\nline.png", b"caf\xe9.png", b"plain.png"]
    for i, name in enumerate(names):
        _noise(os.fsdecode(os.path.join(root, name)), seed=i)
    with open(os.path.join(root, b"broken.jpg"), "w") as f:
        f.write("not an image")
    folder = os.fsdecode(root)
    status, raw = _run_bytes(monkeypatch, ["predict", folder, "--weights", soft, "--format",
                                           "json", "--topk", "2"])  # fmt: skip
    assert status == 0
    rows = json.loads(raw)
    expected_paths = [str(p) for p in find_images([folder])]
    assert [r["path"] for r in rows] == expected_paths and len(rows) == 6
    status, raw = _run_bytes(monkeypatch, ["predict", folder, "--weights", soft, "--format",
                                           "csv", "--topk", "2"])  # fmt: skip
    assert status == 0
    text = raw.decode("utf-8", errors="surrogateescape")
    table = list(csv.reader(io.StringIO(text, newline="")))
    assert table[0] == ["path", "error", "index_1", "label_1", "probability_1", "index_2",
                        "label_2", "probability_2"]  # fmt: skip
    assert len(table) == 1 + 6
    for cells, row in zip(table[1:], rows, strict=True):
        assert cells[0] == row["path"]
        if row["error"]:
            assert os.path.basename(cells[0]) == "broken.jpg"
            assert cells[1] == row["error"] and cells[2:] == [""] * 6
            continue
        assert cells[1] == ""
        for k, p in enumerate(row["predictions"]):
            index, label, probability = cells[2 + 3 * k : 5 + 3 * k]
            assert (int(index), label) == (p["index"], p["label"])
            assert probability == f"{p['probability']:.6f}"


def test_animated_images_are_read_as_their_first_frame_and_rare_modes_as_rgb(tmp_path):
    """GIF, WebP, APNG and multi-page TIFF: the first frame; LAB and bilevel TIFF, transparent
    grey+alpha PNG: RGB, the transparent pixels white."""
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    for ext in ("gif", "webp", "png", "tif"):
        path = tmp_path / f"anim.{ext}"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)
        assert Image.open(path).n_frames == 3
        assert load_image(path).getpixel((8, 8)) == (250, 0, 0), ext
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8))
    base.convert("LAB").save(tmp_path / "lab.tif")
    lab = np.asarray(load_image(tmp_path / "lab.tif"), dtype=float)
    assert np.abs(lab - np.asarray(base, dtype=float)).mean() < 3
    base.convert("1").save(tmp_path / "bilevel.tif")
    assert set(np.unique(np.asarray(load_image(tmp_path / "bilevel.tif")))) <= {0, 255}
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_grey_and_multi_label_inception_models_agree_across_backends(tmp_path):
    """A grey Xception (one mean and std) and a multi-label compact Inception V3: onnxruntime
    gives the torch backend's ranking and probabilities, batch sizes differing."""
    images = [_noise(tmp_path / f"{i}.png", 20 + 7 * i, 30, seed=i) for i in range(3)]
    torch.manual_seed(0)
    grey = _randomised(create_model("xception-compact", num_classes=4, in_chans=1, width=0.25,
                                    middle_blocks=1))  # fmt: skip
    grey.weights_meta = Weights(name="g", format="xception", num_classes=4, input_size=28,
                                mean=(0.3,), std=(0.4,))  # fmt: skip
    inception = _randomised(create_model("inception-v3-compact", num_classes=4, width=0.125,
                                         blocks=(1, 1, 1)))  # fmt: skip
    inception.weights_meta = Weights(name="i", format="xception", num_classes=4, input_size=32,
                                     loss="sigmoid")  # fmt: skip
    for model in (grey, inception):
        eager = list(predict(model, images, topk=4, batch_size=2))
        ort = list(predict(model, images, topk=4, batch_size=3, backend="onnxruntime"))
        for a, b in zip(eager, ort, strict=True):
            assert a.error is None and b.error is None
            assert [r.index for r in a.top] == [r.index for r in b.top]
            assert all(abs(r.probability - s.probability) < 1e-4
                       for r, s in zip(a.top, b.top, strict=True))  # fmt: skip
    assert sum(r.probability for r in eager[0].top) > 1.01  # sigmoid: not a distribution


def test_a_reader_that_stops_early_ends_the_command_quietly(weights, tmp_path):
    """`xception predict ... --format csv | head -1`: the header reaches head, the command stops
    with 141 (SIGPIPE's status) and no traceback."""
    _, soft, _ = weights
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(24):
        _noise(folder / f"{i:02d}.png", seed=i)
    command = (f"'{XCEPTION}' predict '{folder}' --weights '{soft}' --format csv "
               "--batch-size 2 --no-progress | head -1; exit ${PIPESTATUS[0]}")  # fmt: skip
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("path,error,index_1,label_1,probability_1")
    assert done.stdout.count("\n") == 1
    assert done.returncode == 141 and "Traceback" not in done.stderr


# Faults -----------------------------------------------------------------------------------------
def _bad_exif_jpeg(path) -> Path:
    """A photo whose EXIF has orientation 6 and a Compression tag holding text (a corrupt
    camera or editor writes such tags): Pillow reads it, but fails to write it back."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate to display
    exif[0x010F] = "Canon"  # Make, ASCII
    data = exif.tobytes()
    assert data.count(b"\x01\x0f\x00\x02") == 1  # big-endian tag 0x010F, type ASCII
    data = data.replace(b"\x01\x0f\x00\x02", b"\x01\x03\x00\x02")  # now tag 259, Compression
    Image.new("RGB", (20, 10), (220, 20, 20)).save(path, exif=data)
    assert Image.open(path).getexif()[0x0103] == "Canon"
    return Path(path)


def test_a_photo_with_a_malformed_exif_tag_does_not_stop_the_others(weights, tmp_path):
    """A JPEG whose EXIF holds text in a numeric tag made load_image raise struct.error
    (from ImageOps.exif_transpose), which stopped predict and the command with a traceback
    instead of giving that file its row."""
    model, _, _ = weights
    good = _noise(tmp_path / "good.png")
    bad = _bad_exif_jpeg(tmp_path / "bad_exif.jpg")
    rows = list(predict(model, [bad, good], topk=1))
    assert [r.path for r in rows] == [str(bad), str(good)]
    assert rows[1].error is None and len(rows[1].top) == 1
    # The pixels are fine: read, and turned as the orientation says (20x10 stored, 10x20 shown).
    assert rows[0].error is None and len(rows[0].top) == 1
    assert load_image(bad).size == (10, 20)


def test_a_closed_stdout_is_an_error_not_a_traceback_or_a_silent_success(weights, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """With stdout closed (`>&-`, sys.stdout is None) `--format csv` died with a
    TypeError traceback from csv.writer(None), and table/json exited 0 having printed nothing."""
    _, soft, _ = weights
    image = _noise(tmp_path / "x.png")
    for fmt in ("csv", "json", "table"):
        err = io.StringIO()
        monkeypatch.setattr(sys, "stdout", None)
        monkeypatch.setattr(sys, "stderr", err)
        try:
            status = main(["predict", str(image), "--weights", str(soft), "--format", fmt,
                           "--no-progress"])  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            status = repr(exc)
        assert status == 2, (fmt, status)
        assert "xception predict: error:" in err.getvalue(), fmt


def test_a_closed_stderr_does_not_stop_the_predictions(weights, tmp_path, monkeypatch):
    """With stderr closed (`2>&-`, sys.stderr is None) the progress bar (on by
    default) raised AttributeError writing to None: no predictions, exit status 1, where the
    table belongs on stdout."""
    _, soft, _ = weights
    image = _noise(tmp_path / "x.png")
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", None)
    try:
        status = main(["predict", str(image), "--weights", str(soft)])
    except Exception as exc:  # noqa: BLE001
        status = repr(exc)
    assert status == 0
    assert str(image) in out.getvalue() and CLASSES[0] in out.getvalue()


def test_overlapping_folders_classify_each_image_once(weights, tmp_path):
    """`xception predict photos/ photos/sub/` (or `photos photos/`) listed every image of
    the overlap twice, and counted it twice ("classified 4 of 4 files" for 2 files), though
    the folder search promises each image found once."""
    model, _, _ = weights
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    a = _noise(root / "a.png", seed=1)
    b = _noise(root / "sub" / "b.png", seed=2)
    assert find_images([root, root / "sub"]) == [a, b]
    assert find_images([root, Path(f"{root}/")]) == [a, b]
    assert [r.path for r in predict(model, [root, root / "sub"], topk=1)] == [str(a), str(b)]


def test_jpeg_files_with_other_jpeg_extensions_are_found_in_folders(tmp_path):
    """A folder search skipped .jfif and .jpe files (JPEGs as browsers and Windows save
    them, which load_image reads), so `xception predict downloads/` says "no image files"."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    for ext in (".jpg", ".jfif", ".jpe"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / f"photo{ext}", "JPEG")
        assert load_image(folder / f"photo{ext}").size == (8, 8)
    names = sorted(p.name for p in find_images([folder]))
    assert names == ["photo.jfif", "photo.jpe", "photo.jpg"]
