"""`xception predict` and `xception.predict`: real photos and broken files in one folder, one row
per file, error rows, table/JSON/CSV, exit status, batching, and every image mode.

A tiny compact model saved with `save_safetensors` (config, 4 class names, 32 px input) keeps
this fast; the ImageNet-sized path is covered in test_weights_download.py."""

import copy
import csv
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xception import create_model
from xception.cli import main
from xception.data import ImageError, load_image
from xception.predict import find_images, predict
from xception.weights import Weights, save_safetensors

SKLEARN_IMAGES = Path(__import__("sklearn").__file__).parent / "datasets" / "images"
SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"
CLASSES = ("cat", "dog", "bird", "fish")
RED, BLUE = (220, 20, 20), (20, 20, 220)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = create_model("xception-compact", num_classes=4, width=0.25, middle_blocks=1)
    # Batch-norm statistics of real activations (as a trained network has) make the outputs
    # depend on the image, so a batch that mixed rows up would show.
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None  # cumulative average over the one pass below
        bn.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.rand(16, 3, 32, 32) * 2 - 1)
    model.eval()
    meta = Weights(name="tiny", format="xception", num_classes=4, categories=CLASSES,
                   input_size=32)  # fmt: skip
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_safetensors(model, path, meta)
    return path


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A 1x1 PNG whose header claims width x height: a decompression bomb's calling card."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _halves(size=(40, 20)) -> Image.Image:
    im = Image.new("RGB", size, RED)
    im.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return im


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Real photos and every awkward file a user's folder holds. Returns (folder, bad files)."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    shutil.copy(SKLEARN_IMAGES / "china.jpg", root / "china.jpg")
    shutil.copy(SKLEARN_IMAGES / "flower.jpg", root / "flower.jpg")
    shutil.copy(SKIMAGE_DATA / "coffee.png", root / "sub" / "coffee.png")
    shutil.copy(SKIMAGE_DATA / "camera.png", root / "sub" / "camera.png")  # greyscale (L)
    china = (SKLEARN_IMAGES / "china.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(china[: len(china) // 2])
    (root / "text.jpg").write_text("this is not an image\n")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "one_pixel.png")
    rgba = _halves().convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    rgba.save(root / "rgba.png")
    Image.new("RGB", (24, 16), RED).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    ramp = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)  # up to 59,950
    Image.fromarray(ramp).save(root / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _halves().save(root / "rotated.jpg", exif=exif, quality=95)
    _halves().convert("P").save(root / "palette.png")
    _png_claiming(root / "bomb.png", 20000, 20000)
    (root / "notes.txt").write_text("not searched: no image extension")
    (root / ".hidden.jpg").write_text("hidden files are skipped")
    bad = {"truncated.jpg": "truncated", "text.jpg": "cannot identify",
           "bomb.png": "decompression bomb"}  # fmt: skip
    return root, bad


def _run(capsys, *argv) -> tuple[int, str, str]:
    status = main(["predict", *map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_folder_search_finds_images_recursively_and_skips_the_rest(folder):
    root, _ = folder
    names = sorted(p.relative_to(root).as_posix() for p in find_images([root]))
    assert names == sorted([
        "china.jpg", "flower.jpg", "sub/coffee.png", "sub/camera.png", "truncated.jpg",
        "text.jpg", "one_pixel.png", "rgba.png", "cmyk.jpg", "gray16.png", "rotated.jpg",
        "palette.png", "bomb.png",
    ])  # fmt: skip
    assert find_images([root / "notes.txt"]) == [root / "notes.txt"]  # named files are tried


def test_folder_search_follows_links_elsewhere_and_finds_each_image_once(tmp_path):
    # Links to folders elsewhere are followed, as in class folders; links inside the tree and
    # up it are not, so that nothing is predicted twice and no link makes a loop.
    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    for folder in (root / "sub", elsewhere):
        folder.mkdir(parents=True)
    shutil.copy(SKIMAGE_DATA / "coffee.png", root / "sub" / "coffee.png")
    shutil.copy(SKIMAGE_DATA / "camera.png", elsewhere / "camera.png")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "again").symlink_to(root / "sub", target_is_directory=True)
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)
    names = [p.relative_to(root).as_posix() for p in find_images([root])]
    assert names == ["linked/camera.png", "sub/coffee.png"]


def test_json_one_row_per_file_with_error_rows(folder, tiny, capsys, monkeypatch):
    from xception import runtime

    kept = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: kept.append(1) or True)
    root, bad = folder
    status, out, err = _run(capsys, root, "--weights", tiny, "--format", "json", "--topk", "3")
    assert status == 0
    assert kept == [1]  # the CLI owns its process: glibc keeps freed memory
    rows = json.loads(out)
    assert len(rows) == 13 and len({r["path"] for r in rows}) == 13
    for row in rows:
        name = Path(row["path"]).name
        if name in bad:
            assert bad[name] in row["error"] and row["predictions"] == []
        else:
            assert row["error"] is None, row
            probs = [p["probability"] for p in row["predictions"]]
            assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1
            assert all(p["label"] == CLASSES[p["index"]] for p in row["predictions"])
    assert "classified 10 of 13 files; 3 could not be read" in err


def test_csv_and_table_one_row_per_file(folder, tiny, capsys):
    root, bad = folder
    status, out, _ = _run(capsys, root, "--weights", tiny, "--format", "csv", "--topk", "2")
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 13
    assert {Path(r["path"]).name for r in rows if r["error"]} == set(bad)
    good = [r for r in rows if not r["error"]]
    assert all(r["label_1"] in CLASSES and 0 < float(r["probability_1"]) <= 1 for r in good)
    assert all(r["label_2"] in CLASSES for r in good) and "label_3" not in rows[0]

    status, out, _ = _run(capsys, root, "--weights", tiny, "--topk", "2")
    lines = out.strip().splitlines()
    assert status == 0 and len(lines) == 2 + 13  # header, rule, one line per file
    assert sum("error:" in line for line in lines) == 3


def test_a_file_name_that_is_not_utf8_is_written_as_its_bytes(tiny, tmp_path, monkeypatch):
    """A Latin-1 name (from another system's archive) failed the whole output with exit status
    2 in a strict UTF-8 locale (en_US.UTF-8: Python's stdout is strict there)."""
    name = b"caf\xe9.jpg"
    shutil.copy(SKLEARN_IMAGES / "china.jpg", os.path.join(os.fsencode(tmp_path), name))
    shutil.copy(SKLEARN_IMAGES / "flower.jpg", tmp_path / "flower.jpg")
    for fmt in ("table", "csv"):
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
        monkeypatch.setattr("sys.stdout", out)
        status = main(["predict", str(tmp_path), "--weights", str(tiny), "--format", fmt,
                       "--no-progress"])  # fmt: skip
        out.flush()
        written = out.buffer.getvalue()
        assert status == 0 and name in written and b"flower.jpg" in written, fmt


def test_batches_do_not_change_or_mix_up_results(folder, tiny, capsys):
    root, _ = folder
    args = (root, "--weights", tiny, "--format", "json", "--topk", "4")
    one = json.loads(_run(capsys, *args, "--batch-size", "1")[1])
    five = json.loads(_run(capsys, *args, "--batch-size", "5")[1])
    assert [r["path"] for r in one] == [r["path"] for r in five]

    def by_index(row: dict) -> list[float]:
        return [p["probability"] for p in sorted(row["predictions"], key=lambda p: p["index"])]

    classified = [(a, b) for a, b in zip(one, five, strict=True) if a["error"] is None]
    assert all(np.allclose(by_index(a), by_index(b), atol=1e-5) for a, b in classified)
    # the photos are told apart, so a batch that mixed rows up would be caught
    vectors = np.array([by_index(a) for a, _ in classified])
    assert np.abs(vectors[:, None] - vectors[None]).max() > 0.05


def test_predictions_use_the_weights_preprocessing(tiny):
    model = create_model("xception-compact", weights=tiny).eval()
    meta = model.weights_meta
    assert meta.categories == CLASSES and meta.input_size == 32
    photo = SKLEARN_IMAGES / "flower.jpg"
    [result] = predict(model, [photo], topk=4)
    with torch.no_grad():
        x = meta.transforms()(load_image(photo)).unsqueeze(0)
        assert x.shape == (1, 3, 32, 32)
        expected = model(x).softmax(-1)[0]
    got = {r.label: r.probability for r in result.top}
    assert all(abs(got[c] - expected[i].item()) < 1e-6 for i, c in enumerate(CLASSES))


def test_exit_status_is_non_zero_only_when_nothing_was_classified(folder, tiny, tmp_path, capsys):
    root, _ = folder
    status, out, _ = _run(capsys, root / "text.jpg", root / "bomb.png", "--weights", tiny)
    assert status == 1 and out.count("error:") == 2
    status, out, _ = _run(capsys, tmp_path / "missing.jpg", root / "china.jpg", "--weights", tiny)
    assert status == 0 and "no such file" in out
    # Nothing exists: refused before the weights are loaded (here they do not exist either).
    status, _, err = _run(capsys, tmp_path / "missing.jpg", "--weights", tmp_path / "none.h5")
    assert status == 2 and f"no such file: {tmp_path / 'missing.jpg'}" in err
    (tmp_path / "empty").mkdir()
    status, _, err = _run(capsys, tmp_path / "empty", "--weights", tiny)
    assert status == 2 and "no image files in" in err and len(err.strip().splitlines()) == 1
    # A backend that does not exist: refused before the weights are loaded (or downloaded).
    none = tmp_path / "none.h5"
    status, _, err = _run(capsys, root / "china.jpg", "--weights", none, "--backend", "tensorrt")
    assert status == 2 and "unknown --backend 'tensorrt': use one of torch, onnxruntime" in err
    status, _, err = _run(capsys, root / "china.jpg", "--weights", tiny, "--topk", "0")
    assert status == 2 and "--topk 0 is not valid: give at least 1" in err


def test_model_without_classifier_is_refused(tmp_path):
    model = create_model("xception-compact", num_classes=0)
    with pytest.raises(ValueError, match="no classifier"):
        list(predict(model, [SKLEARN_IMAGES / "china.jpg"]))


def test_unknown_backend_is_refused_by_the_api_too():
    model = create_model("xception-compact", num_classes=3)
    with pytest.raises(ValueError, match="backend 'tensorrt' is not available: use one of torch"):
        list(predict(model, [SKLEARN_IMAGES / "china.jpg"], backend="tensorrt"))


# load_image: every mode a photo folder holds -------------------------------------------------
def test_greyscale_palette_and_one_pixel_images_become_rgb(folder):
    root, _ = folder
    grey = np.asarray(load_image(root / "sub" / "camera.png"))
    assert grey.shape == (512, 512, 3) and (grey[..., 0] == grey[..., 2]).all() and grey.std() > 10
    palette = np.asarray(load_image(root / "palette.png"))
    assert np.abs(palette[10, 5] - RED).max() < 40 and np.abs(palette[10, 35] - BLUE).max() < 40
    assert load_image(root / "one_pixel.png").getpixel((0, 0)) == (10, 200, 30)


def test_transparent_pixels_are_composited_on_white(folder):
    assert (np.asarray(load_image(folder[0] / "rgba.png")) == 255).all()


def test_cmyk_jpeg_keeps_its_colour(folder):
    pixels = np.asarray(load_image(folder[0] / "cmyk.jpg")).reshape(-1, 3)
    assert np.abs(pixels.mean(0) - RED).max() < 12


def test_16_bit_png_is_scaled_to_8_bits(folder):
    assert Image.open(folder[0] / "gray16.png").mode.startswith("I")
    grey = np.asarray(load_image(folder[0] / "gray16.png"))[..., 0].astype(int)
    assert grey[0, 0] == 0 and abs(grey.max() - round(59950 / 65535 * 255)) <= 1


def test_exif_orientation_is_applied(folder):
    im = load_image(folder[0] / "rotated.jpg")
    assert im.size == (20, 40)  # stored 40x20, displayed rotated
    a = np.asarray(im).astype(int)
    assert np.abs(a[3, 10] - RED).max() < 40 and np.abs(a[36, 10] - BLUE).max() < 40


def test_decompression_bomb_is_refused_before_decoding(folder):
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(folder[0] / "bomb.png")


def test_one_channel_models_see_the_luminance(tmp_path, capsys):
    """A model trained on grey images (Fashion-MNIST: in_chans=1, 28 px, one mean and std) is
    fed the luminance of colour photos, through the Python API and the CLI."""
    model = create_model("xception-compact", num_classes=4, in_chans=1, width=0.25,
                         middle_blocks=1).eval()  # fmt: skip
    meta = Weights(name="grey", format="xception", num_classes=4, categories=CLASSES,
                   input_size=28, mean=(0.286,), std=(0.353,))  # fmt: skip
    model.weights_meta = meta
    photo = SKLEARN_IMAGES / "flower.jpg"
    [result] = predict(model, [photo], topk=4)
    assert result.error is None
    with torch.no_grad():
        x = meta.transforms()(load_image(photo).convert("L")).unsqueeze(0)
        assert x.shape == (1, 1, 28, 28)
        expected = model(x).softmax(-1)[0]
    got = {r.label: r.probability for r in result.top}
    assert all(abs(got[c] - expected[i].item()) < 1e-6 for i, c in enumerate(CLASSES))
    path = tmp_path / "grey.safetensors"
    save_safetensors(model, path, meta)
    status, out, _ = _run(capsys, photo, "--weights", path, "--format", "json")
    assert status == 0
    [row] = json.loads(out)
    assert row["error"] is None and len(row["predictions"]) == 4
    two = create_model("xception-compact", num_classes=4, in_chans=2, width=0.25, middle_blocks=1)
    with pytest.raises(ValueError, match="takes 2 input channels"):
        list(predict(two, [photo]))


def test_torch_backend_runs_the_optimized_model_with_the_same_logits():
    """predict's default backend folds BN and slices the batch (deploy.optimize, eager) for an
    Xception: the logits are the model's own within 1e-4."""
    from torch import nn

    from xception import create_model
    from xception.predict import BACKENDS

    torch.manual_seed(0)
    model = create_model("xception", width=0.25, middle_blocks=1, num_classes=7).eval()
    for m in model.modules():  # trained-looking statistics, so an unfolded BN would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    run = BACKENDS["torch"](model)
    from xception import deploy

    assert isinstance(run.model, deploy.InferenceModel) and run.model.backend == "eager"
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    out = run(x)
    assert out.shape == (3, 7) and (out - ref).abs().max().item() < 1e-4
    assert ref.abs().max().item() > 0.1
    assert model.block1.conv1.bn.__class__ is nn.BatchNorm2d  # the user's model is untouched


def test_an_image_too_elongated_to_resize_is_an_error_row_and_the_others_still_run(
    tiny, tmp_path, capsys
):
    """With a shorter-side resize (here crop 0.875: 36 px) an 80000x1 strip would become a
    2,880,000x36 image (10^8 pixels; at 299 px a 1x10000 strip is 30 GB of floats). It is
    refused before resizing."""
    from xception.weights import open_weights

    model = create_model("xception-compact", weights=tiny)
    model.weights_meta = open_weights(tiny).meta.replace(crop_fraction=0.875)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (80000, 1), RED).save(strip)
    good = tmp_path / "good.png"
    _halves().save(good)
    rows = list(predict(model, [strip, good], topk=1))
    assert "too elongated to resize its shorter side to 36 px" in rows[0].error
    assert rows[0].top == [] and rows[1].error is None and len(rows[1].top) == 1


def test_predict_leaves_the_callers_model_in_its_mode(tmp_path):
    _halves().save(tmp_path / "x.png")
    for name in ("xception-compact", "inception-v3-compact"):
        model = create_model(name, num_classes=4).train()
        rows = list(predict(model, [tmp_path / "x.png"], topk=1))
        assert rows[0].error is None and model.training, name


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_an_interrupted_predict_prints_the_rows_classified_so_far(
    folder, tiny, capsys, monkeypatch, fmt
):
    import xception.predict as P

    real = P.predict

    def stops_after_five(*args, **kwargs):
        for i, row in enumerate(real(*args, **kwargs)):
            if i == 5:
                raise KeyboardInterrupt
            yield row

    monkeypatch.setattr(P, "predict", stops_after_five)
    root, _ = folder
    status, out, err = _run(capsys, root, "--weights", tiny, "--format", fmt, "--batch-size", "2")
    assert status == 130
    if fmt == "json":
        rows = json.loads(out)
    elif fmt == "csv":  # streamed as they come
        rows = list(csv.DictReader(io.StringIO(out)))
        assert "stopped after" not in err
    else:
        rows = out.strip().splitlines()[2:]  # after the header and its rule
    assert len(rows) == 5
    if fmt != "csv":
        assert "stopped after 5 of 13 files" in err


def test_models_in_other_precisions_run_in_float32_and_stay_as_they_were(tmp_path):
    """An Inception model in half (or double) precision failed on predict's float32 batch with
    a RuntimeError, where an Xception ran in float32 as the README says."""
    _halves().save(tmp_path / "x.png")
    for name in ("xception-compact", "inception-v3-compact"):
        model = create_model(name, num_classes=4).eval()
        [want] = predict(model, [tmp_path / "x.png"], topk=4)
        for dtype in (torch.float16, torch.float64):
            other = copy.deepcopy(model).to(dtype)
            [row] = predict(other, [tmp_path / "x.png"], topk=4)
            assert row.error is None and next(other.parameters()).dtype == dtype, (name, dtype)
            got = {r.index: r.probability for r in row.top}
            assert all(abs(got[r.index] - r.probability) < 1e-3 for r in want.top), (name, dtype)


def test_a_grey_model_without_weights_metadata_classifies_grey_images(tmp_path):
    """Without metadata, predict fell back to three-channel mean and std for a one-channel
    model and failed in Normalize on the grey image it had made."""
    model = create_model("xception-compact", num_classes=4, in_chans=1).eval()
    assert getattr(model, "weights_meta", None) is None
    image = tmp_path / "rgb.png"
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(image)
    (row,) = list(predict(model, [image], topk=2))
    assert row.error is None and len(row.top) == 2


def test_the_api_takes_one_path_or_folders_as_the_command_does(folder, tiny):
    """predict(model, "cat.jpg") read the string letter by letter (a row per character: "no
    such file"), and a folder was one error row ("Is a directory") where the command, whose
    rows the README says the API yields, searches it."""
    root, bad = folder
    model = create_model("xception-compact", weights=tiny)
    [row] = predict(model, str(root / "china.jpg"), topk=1)
    assert row.path == str(root / "china.jpg") and row.error is None and len(row.top) == 1
    [row] = predict(model, root / "flower.jpg", topk=1)
    assert row.error is None
    rows = list(predict(model, [root], topk=1))
    assert [r.path for r in rows] == [str(p) for p in find_images([root])] and len(rows) == 13
    assert {Path(r.path).name for r in rows if r.error} == set(bad)


def test_a_model_that_cannot_classify_is_refused_before_any_output(tmp_path, capsys):
    """A model without a classifier is refused when predict is called, not at the first row:
    the command printed a CSV header on stdout (a bogus labels.csv) before its error."""
    model = create_model("xception-compact", num_classes=0, width=0.25, middle_blocks=1)
    with pytest.raises(ValueError, match="no classifier"):
        predict(model, [SKLEARN_IMAGES / "china.jpg"])  # called, never iterated
    path = save_safetensors(model, tmp_path / "notop.safetensors")
    status, out, err = _run(capsys, SKLEARN_IMAGES / "china.jpg", "--weights", path,
                            "--format", "csv")  # fmt: skip
    assert status == 2 and "no classifier" in err
    assert out == ""


def test_multi_label_weights_give_a_probability_per_class(tiny, tmp_path):
    """Weights trained with the sigmoid loss (the jft recipe) were scored with softmax: the
    ranking is the same, but the printed probabilities were wrong (they summed to 1 over the
    classes where each class is on its own)."""
    from xception.weights import read_safetensors_metadata

    model = create_model("xception-compact", weights=tiny).eval()
    _, meta = read_safetensors_metadata(tiny)
    sigmoid = tmp_path / "multi.safetensors"
    save_safetensors(model, sigmoid, meta.replace(loss="sigmoid"))
    image = SKLEARN_IMAGES / "china.jpg"
    with torch.no_grad():
        logits = model(meta.transforms()(load_image(image))[None])[0]
    for path, expected in ((tiny, logits.softmax(-1)), (sigmoid, logits.sigmoid())):
        loaded = create_model("xception-compact", weights=path)
        [row] = predict(loaded, image, topk=4)
        got = {r.index: r.probability for r in row.top}
        assert [r.index for r in row.top] == logits.argsort(descending=True).tolist()
        assert torch.allclose(torch.tensor([got[i] for i in range(4)]), expected, atol=1e-4)
    assert sum(got.values()) != pytest.approx(1.0, abs=1e-3)  # the sigmoid file's own
    with pytest.raises(ValueError, match="loss='hinge' is not valid: use 'softmax' or 'sigmoid'"):
        meta.replace(loss="hinge")


def test_a_compact_model_without_metadata_sees_its_own_image_size(tmp_path, caplog):
    """A compact model's bare state dict was fed 299 px images (Keras' preprocessing), where
    it was trained on 28 px: every image came out as one class."""
    from xception.predict import _meta_for

    compact = create_model("xception-compact", num_classes=4, width=0.25, middle_blocks=1)
    compact.weights_meta = None
    assert _meta_for(compact).input_size == 28 and "at 28x28" in caplog.text
    paper = create_model("xception", num_classes=4, width=0.25, middle_blocks=1)
    paper.weights_meta = None
    assert _meta_for(paper).input_size == 299


def test_predict_prepares_images_with_the_weights_crop_interpolation_mean_and_std(tiny, tmp_path):
    """The input is the weights' own preprocessing, computed here with PIL by hand: shorter
    side resized to input_size / crop_fraction (bicubic), centre crop, per-channel mean/std."""
    from xception.weights import open_weights

    mean, std = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)
    model = create_model("xception-compact", weights=tiny).eval()
    model.weights_meta = open_weights(tiny).meta.replace(
        crop_fraction=0.5, interpolation="bicubic", mean=mean, std=std
    )
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 80, 3), dtype=np.uint8))  # 80 x 40
    image.save(tmp_path / "noise.png")
    # 32 / 0.5 = 64 px on the shorter side: 128 x 64, then the centre 32 x 32.
    pixels = image.resize((128, 64), Image.BICUBIC).crop((48, 16, 80, 48))
    x = (np.asarray(pixels, dtype=np.float32) / 255 - mean) / std
    x = torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))[None]
    with torch.no_grad():
        expected = model(x).softmax(-1)[0]
    [row] = predict(model, tmp_path / "noise.png", topk=4)
    got = torch.tensor([p.probability for p in sorted(row.top, key=lambda p: p.index)])
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad():  # the default preprocessing would have given other probabilities
        plain = model(meta_default(image)).softmax(-1)[0]
    assert (plain - expected).abs().max() > 1e-3


def meta_default(image: Image.Image) -> torch.Tensor:
    x = np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(x.transpose(2, 0, 1))[None]


def test_a_model_other_than_xception_is_run_in_eval_mode(tmp_path):
    """A compact Inception handed over in training mode is scored as in eval mode (batch-norm
    running statistics, no dropout), while the caller's model stays in training mode."""
    model = create_model("inception-v3-compact", num_classes=4, width=0.125, blocks=(1, 1, 1),
                         drop_rate=0.5)  # fmt: skip
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    model.weights_meta = Weights(name="w", format="xception", num_classes=4, input_size=16)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))  # no resize
    image.save(tmp_path / "x.png")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x[None]).softmax(-1)[0]
    [row] = predict(model.train(), tmp_path / "x.png", topk=4)
    got = torch.tensor([p.probability for p in sorted(row.top, key=lambda p: p.index)])
    assert torch.allclose(got, expected, atol=1e-5) and model.training


def test_topk_and_batch_size_are_checked_when_predict_is_called(tiny):
    model = create_model("xception-compact", weights=tiny)
    photo = SKLEARN_IMAGES / "china.jpg"
    for kw, named in ((dict(topk=0), "topk=0"), (dict(batch_size=0), "batch_size=0"),
                      (dict(topk=-1, batch_size=0), "topk=-1")):  # fmt: skip
        with pytest.raises(ValueError, match=f"^{named} is not valid: give at least 1 "):
            predict(model, photo, **kw)  # called, never iterated
    # More classes asked for than the model has: all of them, best first.
    [row] = predict(model, photo, topk=10)
    probs = [r.probability for r in row.top]
    assert sorted(r.index for r in row.top) == [0, 1, 2, 3] and probs == sorted(probs)[::-1]


def test_class_names_that_do_not_fit_the_head_give_way_to_indices(caplog):
    """Metadata whose 4 names belong to another head (set by hand on a 6-class model): rows
    are labelled by class index (as text), with a warning, rather than by the wrong names."""
    model = create_model("xception-compact", num_classes=6, width=0.25, middle_blocks=1)
    model.weights_meta = Weights(name="w", format="xception", num_classes=4, categories=CLASSES,
                                 input_size=32)  # fmt: skip
    [row] = predict(model, SKLEARN_IMAGES / "china.jpg", topk=6)
    assert sorted(r.index for r in row.top) == list(range(6))
    assert all(r.label == str(r.index) for r in row.top)
    assert "4 class names do not fit the model's 6 classes" in caplog.text


def test_an_error_row_gives_the_reason_without_repeating_the_path(tiny, tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    model = create_model("xception-compact", weights=tiny)
    missing, text = predict(model, [tmp_path / "missing.jpg", tmp_path / "text.jpg"], topk=1)
    assert (missing.path, missing.error) == (str(tmp_path / "missing.jpg"), "no such file")
    assert text.error.startswith("not a readable image (")
    assert "text.jpg" not in text.error  # Pillow's own message had named the file again
