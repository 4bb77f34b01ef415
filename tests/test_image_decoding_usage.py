"""A demanding user's pass over how real-world image files are decoded and prepared by every
consumer: `xception predict`, `xception eval` on class folders, training on class folders and
the int8 calibration images. Files of every awkward kind are made with Pillow here; the pixels
each consumer hands the model are checked against an independent Pillow computation, and bad
files against one-line errors. Tiny compact models, 8-32 px images."""

import csv
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, features

import xception.predict as predict_mod
from xception import create_model
from xception.cli import _images, main
from xception.data import (
    ImageError,
    load_image,
    make_datasets,
    make_eval_dataset,
    scan_folder,
)
from xception.predict import find_images, predict
from xception.weights import Weights, input_meta

SIZE = 8
CLASSES = ("a", "b", "c")


def _tiny_model():
    model = create_model("xception-compact", num_classes=3, width=0.25, middle_blocks=1).eval()
    model.weights_meta = Weights(name="tiny", format="xception", num_classes=3,
                                 categories=CLASSES, input_size=SIZE)  # fmt: skip
    return model


def _chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc & 0xFFFFFFFF)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A 1x1 PNG whose header claims width x height (valid CRC): a decompression bomb's header."""
    data = bytearray(_png_bytes(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _noise(seed=0, h=12, w=20) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _by_hand(path: Path, size: int = SIZE) -> torch.Tensor:
    """What the model should see, computed with Pillow alone: EXIF orientation, alpha/palette
    transparency on white, 16-bit and [0, 1] float scaled to 8 bits, RGB, a square bilinear
    resize (Keras' preprocessing as the README states it), x / 127.5 - 1."""
    im = ImageOps.exif_transpose(Image.open(path))
    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255,) * 4), im.convert("RGBA"))
    if im.mode == "I;16":
        im = Image.fromarray((np.asarray(im) / 65535 * 255 + 0.5).astype(np.uint8))
    if im.mode == "F":
        im = Image.fromarray((np.clip(np.asarray(im), 0, 1) * 255 + 0.5).astype(np.uint8))
    im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1)


def _awkward_folder(root: Path) -> list[Path]:
    """Class folders a, b, c holding one file of every kind a user's photos come in."""
    base = _noise()
    rgb = np.asarray(base)
    made = []

    def add(cls, name, save):
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save(path)
        made.append(path)

    add("a", "upper.PNG", lambda p: base.save(p, "PNG"))
    add("a", "grey16.png", lambda p: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(p))
    add("a", "float.tif", lambda p: Image.fromarray(rgb[..., 1] / np.float32(255), "F").save(p))

    def palette(p):
        base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(p, transparency=0)

    add("a", "palette.png", palette)
    add(
        "a",
        "grey_alpha.png",
        lambda p: Image.merge("LA", (base.convert("L"), Image.fromarray(rgb[..., 2]))).save(p),
    )

    def rgba(p):
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        alpha[:, :5] = 0  # fully transparent strip
        im = base.convert("RGBA")
        im.putalpha(Image.fromarray(alpha))
        im.save(p)

    add("b", "rgba.png", rgba)
    add("b", "cmyk.jpg", lambda p: base.convert("CMYK").save(p, quality=95))
    add("b", "progressive.JPEG", lambda p: base.save(p, "JPEG", quality=95, progressive=True))

    def rotated(p):
        exif = Image.Exif()
        exif[0x0112] = 6
        base.save(p, "JPEG", exif=exif, quality=95)

    add("b", "rotated.jpg", rotated)
    add("b", "lossless.webp", lambda p: base.save(p, lossless=True))
    add("c", "bitmap.bmp", lambda p: base.save(p))
    add("c", "one.png", lambda p: Image.new("RGB", (1, 1), (9, 99, 199)).save(p))
    add("c", "two_by_three.png", lambda p: base.crop((0, 0, 2, 3)).save(p))
    wide = np.random.default_rng(1).integers(0, 256, (3, 1000, 3), np.uint8)
    add("c", "wide.png", lambda p: Image.fromarray(wide).save(p))
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 250, 0))]
    add("c", "anim.gif", lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    add("c", "pages.tif", lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    return made


def test_predict_eval_training_and_calibration_feed_the_same_pixels_as_pillow_by_hand(
    tmp_path, monkeypatch
):
    """Every kind of file, through each of the four consumers, reaches the model as the same
    tensor, equal to an independent Pillow computation (EXIF applied, alpha on white, 16-bit
    and float scaled, first frame, square bilinear resize, x / 127.5 - 1)."""
    root = tmp_path / "data"
    files = _awkward_folder(root)
    model = _tiny_model()
    seen = []

    def recording_backend(_model):
        def run(batch):
            seen.extend(batch.clone())
            return torch.zeros(len(batch), 3)

        return run

    monkeypatch.setitem(predict_mod.BACKENDS, "torch", recording_backend)
    rows = list(predict(model, [root], topk=1, batch_size=4))
    assert [r.error for r in rows] == [None] * len(files)
    by_consumer = {"predict": dict(zip([Path(r.path) for r in rows], seen, strict=True))}
    ev = make_eval_dataset(root, image_size=SIZE)
    by_consumer["eval"] = {p: ev[i][0] for i, (p, _) in enumerate(ev.samples)}
    train, val = make_datasets(root, image_size=SIZE, augment="none", val_fraction=0.3)
    by_consumer["train"] = {p: ds[i][0] for ds in (train, val)
                            for i, (p, _) in enumerate(ds.samples)}  # fmt: skip
    calibration = _images([str(root)], input_meta(model), 3)
    by_consumer["int8 calibration"] = dict(zip(find_images([root]), calibration, strict=True))
    for path in files:
        expected = _by_hand(path)
        for consumer, tensors in by_consumer.items():
            assert path in tensors, (consumer, path.name)
            diff = (tensors[path] - expected).abs().max().item() * 127.5
            assert diff <= 0.51, (consumer, path.name, diff)  # within one rounding of 8 bits


def test_photo_and_class_folders_skip_the_same_junk_and_take_the_same_images(tmp_path):
    """Thumbs.db, .DS_Store, macOS '._' twins, a file without an extension and a dangling link
    are not images to either search; upper-case suffixes and links to images are; predict
    still classifies the extension-less file when it is named."""
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        _noise(1).save(root / cls / "IMG_1.JPG", "JPEG")
        _noise(2).save(root / cls / "scan.PNG", "PNG")
        (root / cls / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + b"\0" * 60)
        (root / cls / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 40)
        (root / cls / "._IMG_1.JPG").write_bytes(b"\0\5\x16\7" + b"\0" * 60)
        _noise(3).save(root / cls / "no_extension", "PNG")
        (root / cls / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    elsewhere = tmp_path / "elsewhere.png"
    _noise(4).save(elsewhere)
    (root / "cat" / "linked.png").symlink_to(elsewhere)
    expected = ["cat/IMG_1.JPG", "cat/linked.png", "cat/scan.PNG", "dog/IMG_1.JPG", "dog/scan.PNG"]
    assert [p.relative_to(root).as_posix() for p in find_images([root])] == expected
    samples, classes = scan_folder(root)
    assert classes == ("cat", "dog") and samples.skipped == 0
    assert [p.relative_to(root).as_posix() for p, _ in samples] == expected
    rows = list(predict(_tiny_model(), [root / "cat" / "no_extension", root / "cat" / "gone.jpg"]))
    assert rows[0].error is None and rows[1].error == "no such file"


def test_bad_files_named_to_predict_get_one_line_rows_naming_the_reason(tmp_path, capsys):
    """Zero-byte, text-as-.jpg, truncated JPEG, dangling link, a PNG claiming 400 MP: each gets
    its own one-line error row, the good file is classified, exit status 0."""
    from xception.weights import save_safetensors

    weights = save_safetensors(
        _tiny_model(), tmp_path / "w.safetensors", _tiny_model().weights_meta
    )
    good = tmp_path / "good.jpg"
    _noise().save(good, quality=95)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image\n")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    names = ["zero.jpg", "text.jpg", "cut.jpg", "dangling.png", "bomb.png", "good.jpg"]
    status = main(["predict", *[str(tmp_path / n) for n in names], "--weights", str(weights),
                   "--format", "csv", "--topk", "1", "--no-progress"])  # fmt: skip
    out = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert status == 0 and len(out) == 1 + len(names)
    assert all("\n" not in row[1] for row in out[1:])
    errors = {Path(row[0]).name: row[1] for row in out[1:]}
    assert "cannot identify" in errors["zero.jpg"] and "cannot identify" in errors["text.jpg"]
    assert "truncated" in errors["cut.jpg"].lower() and errors["dangling.png"] == "no such file"
    assert "decompression bomb" in errors["bomb.png"] and errors["good.jpg"] == ""


def _classes_with_a_huge_picture(tmp_path: Path) -> Path:
    """Class folders a and b of two small pictures each, and a/huge.png claiming 100 MP."""
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            _noise(i).save(root / cls / f"{i}.png")
    _png_claiming(root / "a" / "huge.png", 10000, 10000)
    return root


def test_a_picture_between_the_projects_limit_and_pillows_is_refused_by_every_consumer(tmp_path):
    """100 MP: over the project's 89.5 MP limit, under Pillow's 179 MP error. predict gives it
    an error row, eval and training's listing or decode leave it out; nothing decodes it."""
    root = _classes_with_a_huge_picture(tmp_path)
    with pytest.raises(ImageError, match=r"huge\.png: .*(exceeds the limit|decompression bomb)"):
        load_image(root / "a" / "huge.png")
    rows = {Path(r.path).name: r for r in predict(_tiny_model(), [root / "a"])}
    assert "decompression bomb" in rows["huge.png"].error and "\n" not in rows["huge.png"].error
    ev = make_eval_dataset(root, image_size=SIZE)
    scored = [i for i in range(len(ev)) if ev[i][0] is not None]
    assert len(scored) == 4


def test_exif_orientation_is_applied_alike_in_predict_eval_and_training(tmp_path):
    """A portrait photo stored landscape with orientation 6: predict, eval and training all see
    it upright (its red left half on top), not only predict."""
    root = tmp_path / "data"
    im = Image.new("RGB", (40, 20), (0, 0, 220))
    im.paste((220, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        im.save(root / cls / "photo.jpg", exif=exif, quality=95)
    top_red = []
    ev = make_eval_dataset(root, image_size=16)
    train, _ = make_datasets(root, image_size=16, augment="none", val_fraction=0.5)
    for x in (ev[0][0], train[0][0]):
        top_red.append(bool(x[0, :6].mean() > 0.5 and x[2, :6].mean() < -0.5))
        top_red.append(bool(x[2, -6:].mean() > 0.5))
    assert all(top_red)


# Faults found and fixed -------------------------------------------------------------------------------------
def test_a_png_predict_classifies_is_not_dropped_by_eval_and_training_as_unreadable(tmp_path):
    """A PNG whose pixels decode completely but whose IEND chunk is missing (a download cut at
    its last 12 bytes), or whose trailing text chunk has a bad CRC, was classified by
    `xception predict`, yet the class-folder listing of eval and training (Image.verify)
    dropped it as "unreadable". A file verify() refuses is now decoded as the consumers do."""
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            _noise(i).save(root / cls / f"{i}.png")
    data = _png_bytes(_noise(7))
    assert data[-8:-4] == b"IEND"
    (root / "a" / "no_iend.png").write_bytes(data[:-12])
    bad_text = _chunk(b"tEXt", b"Comment\0hello", crc=12345)
    (root / "b" / "bad_text_crc.png").write_bytes(data[:-12] + bad_text + data[-12:])
    for name in ("a/no_iend.png", "b/bad_text_crc.png"):
        assert np.array_equal(np.asarray(load_image(root / name)), np.asarray(_noise(7)))
    rows = list(predict(_tiny_model(), [root]))
    assert [r.error for r in rows] == [None] * 6  # predict classifies all six
    samples, _ = scan_folder(root)
    assert samples.skipped == 0 and len(samples) == 6


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow cannot read AVIF")
def test_avif_photos_are_found_in_folders_as_pillow_reads_them(tmp_path):
    """Pillow here decodes AVIF (Chrome's and Android's photo format), and load_image read a
    named .avif file, but the folder search (data.IMAGE_SUFFIXES) left .avif out: `xception
    predict photos/` skipped them and a class folder of them 'has no images'."""
    root = tmp_path / "data"
    for k, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (16, 16), (200 * k, 10, 10)).save(root / cls / "photo.avif")
        assert load_image(root / cls / "photo.avif").size == (16, 16)
    assert [p.name for p in find_images([root])] == ["photo.avif", "photo.avif"]
    samples, classes = scan_folder(root)
    assert classes == ("a", "b") and len(samples) == 2


def test_listing_a_folder_with_a_huge_picture_lets_no_raw_python_warning_through(tmp_path):
    """A 100 MP picture in a class folder made the eval/training listing emit Pillow's
    DecompressionBombWarning as a raw Python warning (two lines on stderr pointing at Pillow's
    source), before the project's own one-line 'skipping ... possible decompression bomb'.
    The listing now catches it as load_image does: one line."""
    root = _classes_with_a_huge_picture(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_eval_dataset(root, image_size=SIZE)
        make_datasets(root, image_size=SIZE, val_fraction=0.5)
    leaked = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert leaked == [], str(leaked[0].message)


def test_transforms_of_a_16_bit_pgm_opened_with_pillow_match_predict(tmp_path):
    """`model.weights_meta.transforms()` (README: 'takes an image of any mode ... 16-bit') made
    a dark 16-bit PGM opened with PIL.Image.open 257x brighter than `xception predict` reads
    the same file (load_image knew PPM's mode I is 16-bit, transforms() did not): value 200 of
    65535 became 200/255, not 1/255. transforms() now scales it as load_image does."""
    body = np.full((4, 6), 200, ">u2").tobytes()
    path = tmp_path / "dark.pgm"
    path.write_bytes(b"P5\n6 4\n65535\n" + body)
    model = create_model("xception-compact", num_classes=3, width=0.25, middle_blocks=1)
    transform = input_meta(model).transforms()  # in_chans=3: any mode becomes RGB
    by_predict = transform(load_image(path))
    assert by_predict.max().item() == pytest.approx(1 / 127.5 - 1, abs=1e-6)
    assert torch.equal(transform(Image.open(path)), by_predict)


def test_a_unit_float_image_with_a_slight_overshoot_is_not_black(tmp_path):
    """A 32-bit float TIFF on the [0, 1] scale whose brightest pixels overshoot to 1.02 (what a
    bicubic resize or sharpening of such an image produces) was divided by 255 instead of 1
    (the [0, 1] scale was taken only when no value was above 1.0): the whole image turned
    black (max 1 of 255). Values a hair over 1 are now read on the [0, 1] scale and clipped."""
    values = np.linspace(0.0, 1.02, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values, "F").save(tmp_path / "overshoot.tif")
    grey = np.asarray(load_image(tmp_path / "overshoot.tif"))[..., 0]
    assert grey.max() == 255 and abs(int(grey[4, 0]) - round(values[4, 0] * 255)) <= 1
