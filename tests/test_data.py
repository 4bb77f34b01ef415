"""Datasets: IDX files, image folders, multi-label lists, seeded augmentation."""

import gzip
import logging
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from xception.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN_STD,
    DataError,
    load_idx,
    make_datasets,
    make_eval_dataset,
    read_idx,
    read_label_list,
    scan_folder,
)


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(root, n_train=256, n_test=64, size=16, classes=4, seed=0):
    """A learnable toy in Fashion-MNIST's file layout: class k is a bright square in the k-th
    cell of a 2x2 grid, on noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, classes, n)
        images = rng.integers(0, 60, (n, size, size))
        half = size // 2
        for i, k in enumerate(labels):
            r, c = divmod(int(k), 2)
            images[i, r * half + 2 : (r + 1) * half - 2, c * half + 2 : (c + 1) * half - 2] = 220
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def test_idx_roundtrip_and_truncation(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", a)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), a)
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "cut").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "cut")


def test_non_square_idx_images_are_resized_to_the_asked_size(tmp_path):
    # 12x16 images asked at 16: their width already matched, so they stayed 12x16 and a batch
    # of them did not fit a model made for 16x16.
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 255, (4, 12, 16)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4))
    x, _ = load_idx(tmp_path, "test", size=16).__getitems__([0, 1])
    assert x.shape == (2, 1, 16, 16)
    assert load_idx(tmp_path, "test", size=None).__getitems__([0])[0].shape == (1, 1, 12, 16)


def test_idx_dataset_splits_and_normalises(tmp_path):
    root = make_idx_dataset(tmp_path / "toy")
    train, val = make_datasets(root, image_size=16)
    assert (len(train), len(val), train.channels) == (256, 64, 1)
    x, y = train.__getitems__([0, 1, 2])
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    x32, _ = load_idx(root, "test", size=32).__getitems__([0])
    assert x32.shape == (1, 1, 32, 32)


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    root = make_idx_dataset(tmp_path / "toy")
    train, _ = make_datasets(root, image_size=16, padding=3)
    alone = train.__getitems__([5])[0][0]
    in_batch = train.__getitems__([9, 5, 2])[0][1]
    assert torch.equal(alone, in_batch)  # batch composition (DDP rank, resume) does not matter
    crops = set()
    for epoch in range(8):
        train.set_epoch(epoch)
        crops.add(train.__getitems__([5])[0].sum().item())
    assert len(crops) > 1  # ... but epochs differ


def _image_folder(root, classes=("cat", "dog"), per_class=3, size=20):
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * k, 10 * i, 100)).save(root / name / f"{i}.png")
    return root


def test_image_folders_train_val_and_held_out_split(tmp_path):
    _image_folder(tmp_path / "d" / "train")
    _image_folder(tmp_path / "d" / "val", per_class=1)
    train, val = make_datasets(tmp_path / "d", image_size=16)
    assert (len(train), len(val), train.classes) == (6, 2, ("cat", "dog"))
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y == 0
    train, val = make_datasets(_image_folder(tmp_path / "flat", per_class=5), image_size=16,
                               val_fraction=0.2, seed=3)  # fmt: skip
    assert (len(train), len(val)) == (8, 2)
    assert len(make_eval_dataset(tmp_path / "d", image_size=16)) == 2  # val/ is used


def test_unreadable_images_are_skipped_counted_and_fatal_when_most(tmp_path, caplog):
    root = _image_folder(tmp_path / "d", per_class=3)
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING):
        samples, _ = scan_folder(root)
    assert len(samples) == 6
    assert "broken.jpg" in caplog.text and "skipped 1 unreadable" in caplog.text
    for i in range(8):
        (root / "dog" / f"bad{i}.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="9 of 15 images are unreadable"):
        scan_folder(root)


def test_folder_errors_name_the_culprit(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        make_datasets(tmp_path / "nowhere", image_size=16)
    root = _image_folder(tmp_path / "d")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no images"):
        scan_folder(root)


def test_multilabel_list(tmp_path):
    _image_folder(tmp_path / "img", classes=("a",), per_class=4)
    rows = ["path,labels", "img/a/0.png,cat dog", "img/a/1.png,dog", "img/a/2.png,bird;cat",
            "img/a/3.png,"]  # fmt: skip
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    samples, classes = read_label_list(tmp_path / "train.csv")
    assert classes == ("bird", "cat", "dog")
    assert [s[1].tolist() for s in samples] == [[0, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]]
    train, val = make_datasets(tmp_path / "train.csv", image_size=16, val_fraction=0.25)
    assert train.multilabel and (len(train), len(val)) == (3, 1)


def _png_cut_in_its_pixels(path) -> None:
    """A PNG whose chunks and CRCs are valid (Image.verify passes) but whose compressed pixels
    stop short: it fails only when decoded."""
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    pixels = zlib.compress(b"".join(b"\x00" + bytes([200, 30, 30]) * 20 for _ in range(20)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20, 20, 8, 2,
                     0, 0, 0)) + chunk(b"IDAT", pixels[: len(pixels) // 3]) + chunk(b"IEND", b""))  # fmt: skip


def test_damaged_idx_headers_and_labels_are_named(tmp_path):
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0]))  # three dimensions announced, half of one given
    with pytest.raises(DataError, match="header is cut short"):
        read_idx(tmp_path / "short.gz")
    with gzip.open(tmp_path / "huge.gz", "wb") as f:  # 2^31 x 3 bytes: no overflow to 0
        f.write(bytes([0, 0, 8, 2]) + struct.pack(">II", 2**31, 3))
    with pytest.raises(DataError, match=r"truncated IDX file \(0 of 6,442,450,944"):
        read_idx(tmp_path / "huge.gz")
    a = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "extra.gz", a)
    raw = gzip.decompress((tmp_path / "extra.gz").read_bytes())
    (tmp_path / "extra").write_bytes(raw + b"\0\0")
    with pytest.raises(DataError, match="2 bytes more than its header's 10 values"):
        read_idx(tmp_path / "extra")

    root = make_idx_dataset(tmp_path / "toy", classes=4)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.full(64, 12))
    with pytest.raises(DataError, match="labels go from 12 to 12, but there are 4 classes"):
        load_idx(root, "test", classes=("a", "b", "c", "d"))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros((64, 2)))
    with pytest.raises(DataError, match="expected N images of H x W and N class indices"):
        load_idx(root, "test")


def test_label_lists_keep_every_label_and_refuse_what_they_cannot_place(tmp_path, caplog):
    _image_folder(tmp_path / "img", classes=("a",), per_class=4)
    lst = tmp_path / "train.csv"
    # A byte-order mark (as spreadsheets write it), labels in several columns, a repeat.
    lst.write_bytes("\ufeffpath,labels\nimg/a/0.png,cat,dog\nimg/a/1.png,dog;bird\n"
                    "img/a/2.png,cat\nimg/a/2.png,cat\n".encode())  # fmt: skip
    with caplog.at_level(logging.WARNING):
        samples, classes = read_label_list(lst)
    assert classes == ("bird", "cat", "dog")  # no class named "labels"
    assert [s[1].tolist() for s in samples] == [[0, 1, 1], [1, 0, 1], [0, 1, 0], [0, 1, 0]]
    assert "1 row(s) repeat an image listed before (first: img/a/2.png on lines 4 and 5)" in (
        caplog.text
    )
    val = tmp_path / "val.csv"
    val.write_text("path,labels\nimg/a/0.png,cat\nimg/a/1.png,wolf\n")
    with pytest.raises(DataError, match=r"val\.csv:3: label 'wolf' is not one of the model's 3"):
        read_label_list(val, classes)
    val.write_text('path,labels\nimg/a/0.png,"cat\nimg/a/1.png,dog\n')
    with pytest.raises(DataError, match=r"val\.csv:3: a quote opened in this row runs over"):
        read_label_list(val, classes)
    with pytest.raises(DataError, match=r"0\.png: not a label list \(\.csv\)"):
        read_label_list(tmp_path / "img" / "a" / "0.png")
    # A missing file's labels name no class.
    lst.write_text("path,labels\nimg/a/0.png,cat\nimg/a/1.png,cat\nimg/a/gone.png,zebra\n")
    assert read_label_list(lst)[1] == ("cat",)


def test_a_class_folder_whose_images_all_fail_is_an_error(tmp_path):
    root = _image_folder(tmp_path / "d", per_class=4)
    (root / "fox").mkdir()
    (root / "fox" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"fox has no readable images"):
        scan_folder(root)


def test_evaluation_sets_leave_undecodable_images_out(tmp_path, caplog):
    root = _image_folder(tmp_path / "d", per_class=3)
    _png_cut_in_its_pixels(root / "dog" / "cut.png")
    samples, _ = scan_folder(root)
    assert len(samples) == 7  # the header check passes it
    ds = make_eval_dataset(root, image_size=16)
    with caplog.at_level(logging.WARNING):
        x, y = ds.collate([ds[i] for i in range(len(ds))])
    assert len(x) == len(y) == 6 and "cut.png" in caplog.text
    assert ds.collate([ds[i] for i in range(len(ds)) if ds[i][0] is None]) == (None, None)
    train, _ = make_datasets(root, image_size=16, val_fraction=0.2)
    assert train.substitute  # training replaces it with the next readable image instead
    grey = make_eval_dataset(root, image_size=16, in_chans=1, mean=(0.5,), std=(0.5,))
    assert grey[0][0].shape == (1, 16, 16)


def test_augment_settings_apply_to_every_kind_of_data_or_are_refused(tmp_path):
    root = _image_folder(tmp_path / "d", per_class=4)
    train, _ = make_datasets(root, image_size=16, augment="small", padding=5)
    crop = next(t for t in train.transform.transforms if type(t).__name__ == "RandomCrop")
    assert crop.padding == 5  # was 16 // 8 whatever crop_padding said
    idx = make_idx_dataset(tmp_path / "toy")
    with pytest.raises(DataError, match="augment='imagenet' .* IDX images take augment='small'"):
        make_datasets(idx, image_size=16, augment="imagenet")


def test_a_damaged_gzip_is_named_and_an_unpacked_one_is_read_whatever_its_name(tmp_path):
    from xception.data import idx_count

    root = make_idx_dataset(tmp_path / "toy")
    labels = root / "train-labels-idx1-ubyte.gz"
    good = labels.read_bytes()
    # A gzip header, then a deflate block of the invalid type 3: zlib.error, no OSError.
    labels.write_bytes(good[:10] + b"\x07" + b"\0" * 16)
    for read in (lambda: read_idx(labels), lambda: idx_count(root, "train")):
        with pytest.raises(DataError, match="damaged gzip file.*download it again"):
            read()
    # What a browser saves when it unpacks a download and keeps the name.
    labels.write_bytes(gzip.decompress(good))
    assert len(read_idx(labels)) == idx_count(root, "train") == 256


def test_a_folder_of_the_test_split_alone_is_idx_data(tmp_path):
    root = make_idx_dataset(tmp_path / "toy")
    for f in root.glob("train-*"):
        f.unlink()
    assert len(make_eval_dataset(root, image_size=16)) == 64  # was 'no class folders'
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz not found"):
        make_datasets(root, image_size=16)


def test_idx_data_with_more_than_ten_classes_gets_a_class_per_label(tmp_path):
    """EMNIST and other IDX data: the labels say how many classes there are (it was refused as
    'damaged'); the test split takes the training split's classes."""
    root = make_idx_dataset(tmp_path / "toy")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(256) % 20)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(64) % 7)
    train, val = make_datasets(root, image_size=16)
    assert train.classes == val.classes == tuple(str(k) for k in range(20))
    assert load_idx(root, "test").classes == tuple(str(k) for k in range(10))  # digits, as before


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_zalandos_idx_files_keep_their_class_names_in_a_folder_of_any_name(tmp_path):
    """Fashion-MNIST in a folder whose name does not say 'fashion' (`make demo DATA=./data`) was
    labelled as digits, with MNIST's normalisation."""
    assert "fashion" not in str(tmp_path).lower()
    for f in FASHION_MNIST_DIR.iterdir():
        (tmp_path / f.name).symlink_to(f)
    test = load_idx(tmp_path, "test")
    assert test.classes == FASHION_MNIST_CLASSES
    assert test.mean.flatten().tolist() == pytest.approx([FASHION_MNIST_MEAN_STD[0][0] * 255])


def test_a_held_out_split_always_leaves_something_to_train_on(tmp_path):
    _image_folder(tmp_path / "one", classes=("cat",), per_class=1)
    (tmp_path / "one.csv").write_text("path,labels\none/cat/0.png,cat\n")
    with pytest.raises(DataError, match="1 sample.* would leave nothing to train on"):
        make_datasets(tmp_path / "one.csv", image_size=16)  # was an empty training set
    _image_folder(tmp_path / "few", per_class=2)
    with pytest.raises(DataError, match="4 sample.* val_fraction=0.9 would leave nothing"):
        make_datasets(tmp_path / "few", image_size=16, val_fraction=0.9)


def test_hidden_files_in_class_folders_are_not_images(tmp_path, caplog):
    root = _image_folder(tmp_path / "d")
    for name in ("cat", "dog"):  # macOS's '._' metadata twins, and a hidden folder
        for i in range(3):
            (root / name / f"._{i}.png").write_bytes(b"\0\5\x16\7" + b"\0" * 60)
    (root / "cat" / ".thumbs").mkdir()
    Image.new("RGB", (4, 4)).save(root / "cat" / ".thumbs" / "0.png")
    with caplog.at_level(logging.WARNING):
        samples, _ = scan_folder(root)
    assert len(samples) == 6 and "unreadable" not in caplog.text


def test_linked_folders_inside_class_folders_are_followed_once(tmp_path):
    # A class folder assembled from links to other disks; a link back up the tree is no loop.
    root = _image_folder(tmp_path / "d")
    elsewhere = _image_folder(tmp_path / "other", classes=("more",), per_class=2)
    (root / "cat" / "linked").symlink_to(elsewhere / "more", target_is_directory=True)
    (root / "cat" / "up").symlink_to(root, target_is_directory=True)
    Image.new("L", (4, 4)).save(root / "dog" / "grey.pgm")  # a suffix `predict` took already
    samples, classes = scan_folder(root)
    names = [p.relative_to(root).as_posix() for p, _ in samples]
    assert names == ["cat/0.png", "cat/1.png", "cat/2.png", "cat/linked/0.png",
                     "cat/linked/1.png", "dog/0.png", "dog/1.png", "dog/2.png",
                     "dog/grey.pgm"]  # fmt: skip
    assert [k for _, k in samples] == [0] * 5 + [1] * 4


def test_a_transparent_colour_is_composited_on_white_like_an_alpha_channel(tmp_path):
    """A grey or RGB PNG with a tRNS colour (what PNG optimisers make of on/off alpha) showed
    its transparent pixels in their stored colour, black here, instead of white."""
    from xception.data import load_image

    for mode, black in (("RGB", (0, 0, 0)), ("L", 0)):
        im = Image.new(mode, (8, 8), black)
        im.paste((200, 0, 0) if mode == "RGB" else 200, (4, 0, 8, 8))
        im.save(tmp_path / f"{mode}.png", transparency=black)
        rgb = np.asarray(load_image(tmp_path / f"{mode}.png"))
        assert rgb[0, 0].tolist() == [255, 255, 255]
        assert rgb[0, 7].tolist() == ([200, 0, 0] if mode == "RGB" else [200] * 3)


def test_a_dark_16_bit_pgm_stays_dark(tmp_path):
    """Pillow reads a PGM with maxval 65535 in mode I, scaled to 0-65535: one whose values
    all lie below 256 (a dark frame, a depth map) was taken for 8-bit and shown 257x brighter."""
    from xception.data import load_image

    for name, value in (("dark", 200), ("bright", 40000)):
        body = np.full((4, 6), value, ">u2").tobytes()
        (tmp_path / f"{name}.pgm").write_bytes(b"P5\n6 4\n65535\n" + body)
        expected = round(value / 65535 * 255)
        assert np.asarray(load_image(tmp_path / f"{name}.pgm")).max() == expected  # was 200
    eight = np.full((4, 6), 200, np.uint8).tobytes()  # an 8-bit PGM is unchanged
    (tmp_path / "eight.pgm").write_bytes(b"P5\n6 4\n255\n" + eight)
    assert np.asarray(load_image(tmp_path / "eight.pgm")).max() == 200


def test_eval_sets_prepare_images_as_the_weights_expect(tmp_path):
    """timm's legacy_xception weights expect a resize of the shorter side and a centre crop
    (crop fraction 0.8975, bicubic): the evaluation set used Keras' square resize whatever the
    weights said, so timm weights were scored on other pixels than timm's validation."""
    from xception.data import eval_transform, load_image

    root = tmp_path / "d"
    for k, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        im = Image.new("RGB", (48, 32), (200, 30 * k, 10))
        im.paste((10, 10, 250), (0, 0, 8, 32))  # a border a centre crop leaves out
        im.save(root / name / "0.png")
    ds = make_eval_dataset(root, image_size=16, crop_fraction=0.5, interpolation="bicubic")
    expected = eval_transform(16, 0.5, "bicubic")(load_image(root / "cat" / "0.png"))
    assert torch.equal(ds[0][0], expected)
    assert not torch.equal(ds[0][0], make_eval_dataset(root, image_size=16)[0][0])


def test_held_out_evaluation_sets_match_training_and_a_lone_train_folder_is_no_class(tmp_path):
    _image_folder(tmp_path / "flat", per_class=5)
    _, val = make_datasets(tmp_path / "flat", image_size=16, val_fraction=0.3, seed=4)
    held = make_eval_dataset(tmp_path / "flat", image_size=16, classes=("cat", "dog"),
                             held_out=(0.3, 4))  # fmt: skip
    assert held.samples == val.samples and held.held_out == (0.3, 4)
    assert len(make_eval_dataset(tmp_path / "flat", image_size=16)) == 10  # every image
    _image_folder(tmp_path / "split" / "train", per_class=5)
    _, val = make_datasets(tmp_path / "split", image_size=16, val_fraction=0.3, seed=4)
    held = make_eval_dataset(tmp_path / "split", image_size=16, classes=("cat", "dog"),
                             held_out=(0.3, 4))  # fmt: skip
    assert held.samples == val.samples
    # Without a run to say what it held out: 'train' used to be taken for a class folder.
    with pytest.raises(DataError, match=r"has train/ but no val/: pass --data .*split/train"):
        make_eval_dataset(tmp_path / "split", image_size=16)
    _image_folder(tmp_path / "split" / "val", per_class=1)  # a validation part: it is used
    with_val = make_eval_dataset(tmp_path / "split", image_size=16, held_out=(0.3, 4))
    assert len(with_val) == 2 and with_val.held_out is None


def test_a_single_class_folder_is_refused_naming_the_folder_that_holds_the_classes(tmp_path):
    """data/ holding images/cat and images/dog trained a one-class model ('images', every
    image of both classes in it) at 100% validation accuracy, without a word."""
    _image_folder(tmp_path / "data" / "images", per_class=4)
    with pytest.raises(DataError, match=r"a single class folder, images: .* two or more classes; "
                       r"if its sub-folders \(cat, dog\) are the classes, pass --data .*images"):  # fmt: skip
        make_datasets(tmp_path / "data", image_size=16)
    train, _ = make_datasets(tmp_path / "data" / "images", image_size=16)
    assert train.classes == ("cat", "dog")
    _image_folder(tmp_path / "flat", classes=("cat",), per_class=4)
    with pytest.raises(DataError, match="put each class's images in a sub-folder of its own"):
        make_datasets(tmp_path / "flat", image_size=16)
    # The evaluation set of a model that knows its classes may hold some of them only.
    assert scan_folder(tmp_path / "flat", ("cat", "dog"))[1] == ("cat", "dog")


def test_in_memory_images_are_normalised_per_channel_from_0_255_pixels(tmp_path):
    """(pixel / 255 - mean) / std, channel by channel; IDX data that is not Fashion-MNIST gets
    MNIST's statistics."""
    from xception.data import MNIST_MEAN_STD, TensorImageDataset

    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    ds = TensorImageDataset(images.contiguous(), torch.tensor([0, 1]), ("a", "b"),
                            mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))  # fmt: skip
    x, y = ds.__getitems__([1])
    expected = [(0 / 255 - 0.1) / 0.5, (51 / 255 - 0.2) / 0.25, (255 / 255 - 0.3) / 2.0]
    assert x[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(x[0, :, 0, 0, None, None].expand(3, 2, 2), x[0]) and y.tolist() == [1]
    # Digits (not Fashion-MNIST): MNIST's mean and std.
    (root := tmp_path / "digits").mkdir()
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.full((2, 4, 4), 200))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([3, 7]))
    x, _ = load_idx(root, "test").__getitems__([0])
    (m,), (s,) = MNIST_MEAN_STD
    assert x.flatten().tolist() == pytest.approx([(200 / 255 - m) / s] * 16, rel=1e-6)


def test_small_augmentation_is_a_zero_padded_translation_and_a_horizontal_flip():
    """Each augmented image is the p-pixel zero-padded image cropped back to its size at some
    offset (dy, dx) in 0..2p and maybe mirrored left-right: found by brute force over every
    (dy, dx, flip). Over many images every offset occurs on each axis, the two axes vary
    independently, and about half the images are flipped."""
    from xception.data import TensorImageDataset

    gen = torch.Generator().manual_seed(0)
    n, p, h, w = 300, 2, 6, 7
    images = torch.randint(1, 256, (n, 2, h, w), generator=gen, dtype=torch.uint8)  # no zeros
    kw = dict(mean=(0.0, 0.0), std=(1 / 255, 1 / 255), augment="small", padding=p)
    ds = TensorImageDataset(images, torch.zeros(n, dtype=torch.long), ("a",), seed=3, **kw)
    out = ds.__getitems__(list(range(n)))[0]
    padded = torch.nn.functional.pad(images.float(), (p, p, p, p))
    found = []
    for i in range(n):
        matches = [(dy, dx, flip) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   for flip in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(
                       padded[i, :, dy : dy + h, dx : dx + w]))]  # fmt: skip
        assert len(matches) == 1, (i, matches)
        found.append(matches[0])
    assert {dy for dy, _, _ in found} == set(range(2 * p + 1))
    assert {dx for _, dx, _ in found} == set(range(2 * p + 1))
    assert len({(dy, dx) for dy, dx, _ in found}) == (2 * p + 1) ** 2  # every pair: independent
    assert 0.35 < sum(flip for _, _, flip in found) / n < 0.65
    # No flip when hflip is off; no augmentation at all with 'none'.
    no_flip = TensorImageDataset(images, torch.zeros(n, dtype=torch.long), ("a",), seed=3,
                                 hflip=False, **kw)  # fmt: skip
    x = no_flip.__getitems__(list(range(n)))[0]
    for i, (dy, dx, _) in enumerate(found):
        assert torch.equal(x[i], padded[i, :, dy : dy + h, dx : dx + w])
    kw["augment"] = "none"
    plain = TensorImageDataset(images, torch.zeros(n, dtype=torch.long), ("a",), **kw)
    assert torch.equal(plain.__getitems__(list(range(n)))[0], images.float())


def test_in_memory_downsizing_keeps_the_mean_of_fine_detail():
    """Resizing in-memory images down is antialiased: one bright column in four, shrunk 4x,
    gives about a quarter of the brightness everywhere, not the stripes sampled away (all 0)."""
    from xception.data import TensorImageDataset

    images = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    images[..., ::4] = 255
    ds = TensorImageDataset(images, torch.zeros(1, dtype=torch.long), ("a",),
                            mean=(0.0,), std=(1.0,), size=8)  # fmt: skip
    x = ds.__getitems__([0])[0]
    assert x.shape == (1, 1, 8, 8)
    assert x[0, 0, :, 1:7].flatten().tolist() == pytest.approx([0.25] * 48, abs=1e-4)


@pytest.mark.parametrize(
    "code,dtype,values",
    [(0x0B, ">i2", [-2, 300, -32768, 32767]), (0x0C, ">i4", [-70000, 1, 2**31 - 1, 0]),
     (0x0D, ">f4", [0.5, -1.25, 3e9, 0.0]), (0x0E, ">f8", [1e-300, -2.5, 7.0, 1 / 3]),
     (0x09, "i1", [-128, 127, 0, -1])],
)  # fmt: skip
def test_idx_files_of_every_type_are_read_big_endian(tmp_path, code, dtype, values):
    """The IDX format stores multi-byte values most significant byte first (as MNIST's own
    documentation says), whatever the reading machine."""
    array = np.array(values, dtype=dtype).reshape(2, 2)
    header = bytes([0, 0, code, 2]) + struct.pack(">2I", 2, 2)
    (tmp_path / "x").write_bytes(header + array.tobytes())
    out = read_idx(tmp_path / "x")
    assert out.shape == (2, 2) and out.tolist() == array.tolist()
    assert out.dtype == np.dtype(dtype).newbyteorder("=")


def _norm(a, mean=0.5, std=0.5):
    return (np.asarray(a, dtype=np.float32) / 255 - mean) / std


def test_eval_transforms_resize_crop_and_normalise_like_pil_by_hand():
    """Keras' preprocessing is a square bilinear resize of the whole image and x / 127.5 - 1;
    a crop fraction f resizes the shorter side to int(size / f) and centre-crops size (timm's
    0.8975, bicubic). Compared with Pillow's own resize and crop, and worked by hand."""
    from xception.data import eval_preset, eval_transform, keras_transform

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (32, 48, 3)).astype(np.uint8))  # 48 wide, 32 high
    chw = lambda t: t.permute(1, 2, 0).numpy()  # noqa: E731
    square = _norm(im.resize((16, 16), Image.BILINEAR))
    assert np.array_equal(chw(keras_transform(16)(im)), square)
    assert np.array_equal(chw(eval_preset("keras", 16)(im)), square)
    assert np.array_equal(chw(eval_transform(16)(im)), square)  # crop_fraction 1: no crop
    # 16 / 0.8 = 20: 48x32 -> 30x20, centre 16x16 from column 7 and row 2.
    crop = _norm(im.resize((30, 20), Image.BICUBIC).crop((7, 2, 23, 18)))
    assert np.array_equal(chw(eval_transform(16, 0.8, "bicubic")(im)), crop)
    # 16 / 0.5 = 32 is the shorter side already: the centre 16x16 pixels, untouched.
    centre = _norm(np.asarray(im)[8:24, 16:32])
    assert np.allclose(chw(eval_transform(16, 0.5, "nearest")(im)), centre, atol=1e-6)
    # Per-channel statistics, mean and std each in its place.
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    own = _norm(im.resize((16, 16), Image.BILINEAR), np.array(mean), np.array(std))
    assert np.allclose(chw(eval_transform(16, 1.0, "bilinear", mean, std)(im)), own, atol=1e-6)
    assert np.allclose(chw(eval_preset("small", 16, mean, std)(im)), own, atol=1e-6)


def test_train_transform_presets_hold_the_documented_augmentation():
    """'imagenet': random-resized crops of 8-100% of the area at 3/4-4/3 aspect, and flips;
    'small': a random crop with 1/8 of the size as zero padding (or the padding asked for)."""
    from torchvision import transforms as T

    from xception.data import train_transform

    steps = train_transform("imagenet", 32).transforms
    rrc = next(s for s in steps if isinstance(s, T.RandomResizedCrop))
    assert rrc.size == (32, 32) and rrc.scale == (0.08, 1.0)
    assert rrc.ratio == pytest.approx((3 / 4, 4 / 3))
    assert any(isinstance(s, T.RandomHorizontalFlip) and s.p == 0.5 for s in steps)
    for size, padding, expected in ((32, None, 4), (64, None, 8), (12, None, 1), (32, 3, 3)):
        steps = train_transform("small", size, padding=padding).transforms
        crop = next(s for s in steps if isinstance(s, T.RandomCrop))
        assert (crop.size, crop.padding, crop.fill) == ((size, size), expected, 0)
    # Normalised like evaluation: a uniform image of 51 is 51 / 127.5 - 1 (no padding here).
    grey = Image.new("RGB", (32, 32), (51, 51, 51))
    for preset in ("imagenet", "none"):
        x = train_transform(preset, 16)(grey)
        assert x.shape == (3, 16, 16) and torch.allclose(x, torch.full_like(x, 51 / 127.5 - 1))


def test_load_image_refuses_pictures_over_the_pixel_limit_even_when_pillow_allows_them(
    tmp_path, monkeypatch
):
    """The pixel limit is the project's own: with Pillow's bomb check switched off (a library
    may set Image.MAX_IMAGE_PIXELS = None), a picture over MAX_IMAGE_PIXELS is still refused,
    and one exactly at the limit is read."""
    from xception import data

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 26), (1, 2, 3)).save(tmp_path / "over.png")  # 1040 pixels
    Image.new("RGB", (40, 25), (1, 2, 3)).save(tmp_path / "at.png")  # 1000 pixels
    with pytest.raises(data.ImageError, match=r"over\.png: 40x26 pixels exceeds the limit of 1000"):
        data.load_image(tmp_path / "over.png")
    assert data.load_image(tmp_path / "at.png").size == (40, 25)


def test_elongated_images_are_refused_before_a_shorter_side_resize(monkeypatch):
    """Resizing the shorter side of a thin strip to int(size / crop_fraction) px makes a huge
    picture: such an image, standing or lying, is an ImageError before the resize; a strip
    whose resized picture stays within the limit goes through."""
    from xception import data

    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 10_000)
    t = data.eval_transform(16, 0.8)  # shorter side to 20 px
    for size in ((4, 200), (200, 4)):  # 20 x 1000 = 20,000 pixels once resized
        with pytest.raises(data.ImageError, match="too elongated to resize its shorter side to 20"):
            t(Image.new("RGB", size))
    assert t(Image.new("RGB", (10, 200))).shape == (3, 16, 16)  # 20 x 400 = 8,000 pixels


def test_integer_images_are_scaled_by_the_range_their_format_allows(tmp_path):
    """A 16-bit PNG is scaled from 0-65535 even when all of it is dark (200 of 65535 is 1 of
    255, not 200); a 32-bit integer TIFF whose values reach exactly 255 is 8-bit data, kept."""
    from xception.data import load_image

    Image.fromarray(np.full((4, 6), 200, np.uint16)).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode == "I;16"
    assert np.asarray(load_image(tmp_path / "dark16.png")).max() == 1  # round(200 / 257)
    values = np.arange(24, dtype=np.int32).reshape(4, 6) * 11 + 2  # 2 ... 255
    Image.fromarray(values, "I").save(tmp_path / "i32.tif")
    rgb = np.asarray(load_image(tmp_path / "i32.tif"))
    assert rgb[..., 0].tolist() == values.tolist() and rgb.max() == 255


def test_transparent_palette_entries_and_grey_alpha_are_composited_on_white(tmp_path):
    """A palette PNG's transparent entry and a grey+alpha (LA) PNG's clear pixels show white,
    as an RGBA image's do, not the colour stored under them (black here)."""
    from xception.data import load_image

    pal = Image.new("P", (8, 4), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.paste(1, (4, 0, 8, 4))
    pal.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(load_image(tmp_path / "p.png"))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 7].tolist() == [200, 0, 0]
    la = Image.new("LA", (8, 4), (0, 0))
    la.paste((100, 255), (4, 0, 8, 4))
    la.save(tmp_path / "la.png")
    rgb = np.asarray(load_image(tmp_path / "la.png"))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 7].tolist() == [100, 100, 100]


def test_a_crop_fraction_resizes_to_the_truncated_size_and_unknown_interpolation_is_refused():
    """16 / 0.7 = 22.86: the shorter side goes to 22 px (int, as timm does), not 23; a 44x32
    image becomes 30x22 and its centre 16x16 is taken from column 7 and row 3. An interpolation
    name that does not exist is a ValueError naming the ones that do."""
    from xception.data import eval_transform

    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (32, 44, 3)).astype(np.uint8))
    expected = _norm(im.resize((30, 22), Image.BILINEAR).crop((7, 3, 23, 19)))
    out = eval_transform(16, 0.7, "bilinear")(im).permute(1, 2, 0).numpy()
    assert np.allclose(out, expected, atol=1e-6)
    # numpy's floats too, as the weights metadata takes them (they were refused here).
    same = eval_transform(16, np.float32(0.7), "bilinear")(im).permute(1, 2, 0).numpy()
    assert np.allclose(same, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"interpolation='lanczos': use one of \['bicubic'"):
        eval_transform(16, interpolation="lanczos")
    # A fraction of 0 (weights metadata of one's own) was a ZeroDivisionError.
    for bad in (0, -0.5, float("nan"), float("inf"), "0.9", True):
        with pytest.raises(ValueError, match=rf"crop_fraction={bad!r} is not valid: .* above 0"):
            eval_transform(16, bad)


def test_in_memory_crops_with_one_pixel_of_padding_shift_and_follow_the_seed():
    """padding=1 crops at offsets 0, 1 and 2 on each axis (found by matching against the
    zero-padded image); the crops are the same for the same seed and others for another."""
    from xception.data import TensorImageDataset

    gen = torch.Generator().manual_seed(1)
    n, h, w = 80, 5, 6
    images = torch.randint(1, 256, (n, 1, h, w), generator=gen, dtype=torch.uint8)
    kw = dict(mean=(0.0,), std=(1 / 255,), augment="small", padding=1, hflip=False)
    out = TensorImageDataset(images, torch.zeros(n, dtype=torch.long), ("a",), seed=3, **kw)
    x = out.__getitems__(list(range(n)))[0]
    padded = torch.nn.functional.pad(images.float(), (1, 1, 1, 1))
    offsets = []
    for i in range(n):
        [found] = [(dy, dx) for dy in range(3) for dx in range(3)
                   if torch.equal(x[i], padded[i, :, dy : dy + h, dx : dx + w])]  # fmt: skip
        offsets.append(found)
    assert {dy for dy, _ in offsets} == {dx for _, dx in offsets} == {0, 1, 2}
    again = TensorImageDataset(images, torch.zeros(n, dtype=torch.long), ("a",), seed=3, **kw)
    other = TensorImageDataset(images, torch.zeros(n, dtype=torch.long), ("a",), seed=4, **kw)
    assert torch.equal(again.__getitems__(list(range(n)))[0], x)
    assert not torch.equal(other.__getitems__(list(range(n)))[0], x)


def test_idx_files_with_a_foreign_or_cut_header_are_refused_by_name(tmp_path):
    """Bad first bytes, an unknown type code, a file shorter than the magic number, and
    dimensions cut short are DataErrors naming the file; so is a label file's bad magic number
    when only its count is read."""
    from xception.data import idx_count

    cases = {
        "first": (bytes([1, 0, 8, 1]) + struct.pack(">I", 1) + b"\5", "bad magic number"),
        "second": (bytes([0, 1, 8, 1]) + struct.pack(">I", 1) + b"\5", "bad magic number"),
        "type": (bytes([0, 0, 7, 1]) + struct.pack(">I", 1) + b"\5", "bad magic number"),
        "three": (bytes([0, 0, 8]), "bad magic number"),
        "dims": (bytes([0, 0, 8, 1, 0, 0, 0]), "header is cut short"),
    }
    for name, (raw, message) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(DataError, match=f"{name}: .*{message}"):
            read_idx(tmp_path / name)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(cases["first"][0])
    with pytest.raises(DataError, match="not an IDX label file"):
        idx_count(tmp_path, "test")


def test_idx_files_named_with_a_dot_before_idx_are_found(tmp_path):
    """Some downloads unpack to 't10k-images.idx3-ubyte': that spelling is found too."""
    write_idx(tmp_path / "t10k-images.idx3-ubyte", np.zeros((3, 4, 4)))
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", np.array([2, 0, 1]))
    ds = load_idx(tmp_path, "test")
    assert len(ds) == 3 and ds.targets.tolist() == [2, 0, 1]


def _idx_bytes(code: int, array: np.ndarray) -> bytes:
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2"}[code]
    return (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.astype(dtype).tobytes())  # fmt: skip


def test_idx_images_and_labels_that_cannot_be_a_classification_set_are_refused(tmp_path):
    """Images not N x H x W, counts that differ, pixels not bytes, and negative labels are each
    a DataError naming the problem, not a dataset that fails (or trains) later."""
    root = tmp_path / "digits"
    root.mkdir()
    images, labels = root / "t10k-images-idx3-ubyte", root / "t10k-labels-idx1-ubyte"

    def refused(image_array, label_array, message, image_code=0x08, label_code=0x08):
        images.write_bytes(_idx_bytes(image_code, image_array))
        labels.write_bytes(_idx_bytes(label_code, label_array))
        with pytest.raises(DataError, match=message):
            load_idx(root, "test")

    three = np.array([1, 2, 3])
    refused(np.zeros((3, 16)), three, r"images \(3, 16\) and labels \(3,\) do not match")
    refused(np.zeros((4, 2, 2)), three, r"images \(4, 2, 2\) and labels \(3,\) do not match")
    refused(np.zeros((3, 2, 2)), three, "int16 pixels; IDX images of unsigned bytes", 0x0B)
    refused(np.zeros((3, 2, 2)), np.array([1, -1, 3]), "labels go from -1 to 3", 0x08, 0x09)


def test_idx_labels_reaching_ten_get_eleven_classes(tmp_path):
    """Labels 0 to 10 are 11 classes: one past MNIST's ten is already another dataset."""
    root = tmp_path / "digits"
    root.mkdir()
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((11, 2, 2)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(11))
    assert load_idx(root, "test").classes == tuple(str(k) for k in range(11))


def test_idx_folder_names_are_matched_whatever_their_case(tmp_path):
    """The folder's name is matched whatever its case: 'Fashion-MNIST' gets Zalando's class
    names and statistics, as 'fashion-mnist' does."""
    root = tmp_path / "Fashion-MNIST"
    root.mkdir()
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((2, 2, 2)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([0, 9]))
    assert load_idx(root, "test").classes == FASHION_MNIST_CLASSES


def test_idx_normalisation_uses_the_published_dataset_statistics(tmp_path):
    """MNIST's mean and std are 0.1307 and 0.3081, Fashion-MNIST's 0.2860 and 0.3530 (of pixels
    in [0, 1]); where Fashion-MNIST is installed, its test pixels agree."""
    root = tmp_path / "digits"
    root.mkdir()
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((2, 2, 2)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([0, 9]))
    ds = load_idx(root, "test")
    assert (ds.mean.item(), ds.std.item()) == pytest.approx((0.1307 * 255, 0.3081 * 255))
    (fashion := tmp_path / "fashion").mkdir()
    for f in root.iterdir():
        (fashion / f.name).write_bytes(f.read_bytes())
    ds = load_idx(fashion, "test")
    assert (ds.mean.item(), ds.std.item()) == pytest.approx((0.2860 * 255, 0.3530 * 255))
    if FASHION_MNIST_DIR.is_dir():
        pixels = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") / 255.0  # 10,000
        assert (pixels.mean(), pixels.std()) == pytest.approx((0.2860, 0.3530), abs=2e-3)


def test_split_samples_is_a_seeded_sorted_partition_and_refuses_an_empty_hold_out():
    """The held-out part is round(n * fraction) indices, train and held-out together are every
    index once, each list in file order; the seed picks which (the same seed, the same split),
    and a fraction of 0 (or 1) is refused."""
    from xception.data import split_samples

    splits = set()
    for seed in range(6):
        train, held = split_samples(20, 0.25, seed)
        assert len(held) == 5 and sorted(train + held) == list(range(20))
        assert train == sorted(train) and held == sorted(held)
        assert split_samples(20, 0.25, seed) == (train, held)
        splits.add(tuple(held))
    assert len(splits) == 6
    for fraction in (0.0, 1.0):
        with pytest.raises(DataError, match=f"val_fraction={fraction}: use a fraction in"):
            split_samples(20, fraction, 0)


def test_class_folders_skip_hidden_folders_and_take_any_case_of_suffix(tmp_path):
    """A hidden folder beside the classes (.ipynb_checkpoints) is no class; 'IMG_1.JPG' is an
    image as much as 'x.jpg'."""
    root = _image_folder(tmp_path / "d")
    Image.new("RGB", (8, 8)).save(root / "cat" / "IMG_1.JPG")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "0.png")
    samples, classes = scan_folder(root)
    assert classes == ("cat", "dog")
    names = [p.relative_to(root).as_posix() for p, _ in samples]
    assert names == ["cat/0.png", "cat/1.png", "cat/2.png", "cat/IMG_1.JPG", "dog/0.png",
                     "dog/1.png", "dog/2.png"]  # fmt: skip


def test_image_files_follow_links_to_look_alike_folders_once_and_skip_dangling_links(tmp_path):
    """A link to 'pics-more' beside 'pics' is another folder (not inside 'pics' because its name
    starts the same); two links to one folder give its images once; a link to a file that
    is gone is no image."""
    from xception.data import image_files

    pics, more = tmp_path / "pics", tmp_path / "pics-more"
    pics.mkdir()
    more.mkdir()
    Image.new("RGB", (4, 4)).save(pics / "a.png")
    Image.new("RGB", (4, 4)).save(more / "b.png")
    (pics / "l1").symlink_to(more, target_is_directory=True)
    (pics / "l2").symlink_to(more, target_is_directory=True)
    (pics / "gone.png").symlink_to(tmp_path / "nowhere.png")
    names = [p.relative_to(pics).as_posix() for p in image_files(pics)]
    assert names in (["a.png", "l1/b.png"], ["a.png", "l2/b.png"])


def test_training_replaces_an_undecodable_image_by_the_next_readable_sample(tmp_path):
    """For training, a file that fails to decode is replaced by the next sample (its image and
    its target), not retried in place until the dataset gives up."""
    from xception.data import FileDataset, eval_preset, load_image

    root = _image_folder(tmp_path / "d", classes=("a", "b"), per_class=1)
    _png_cut_in_its_pixels(root / "cut.png")
    t = eval_preset("keras", 8)
    ds = FileDataset([(root / "cut.png", 0), (root / "a" / "0.png", 1), (root / "b" / "0.png", 0)],
                     ("x", "y"), t)  # fmt: skip
    x, y = ds[0]
    assert y == 1 and torch.equal(x, t(load_image(root / "a" / "0.png")))


def test_file_augmentation_is_a_function_of_seed_epoch_and_index_only(tmp_path):
    """A training sample's random crop is the same on every call whatever the global random
    state (which it leaves alone), and another in another epoch."""
    from xception.data import FileDataset, train_transform

    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)).save(root / "a" / "0.png")
    ds = FileDataset([(root / "a" / "0.png", 0)], ("a",), train_transform("imagenet", 16), seed=5)
    torch.manual_seed(1)
    first = ds[0][0]
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    assert torch.equal(ds[0][0], first)
    torch.manual_seed(1)
    ds[0]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is untouched
    crops = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        crops.add(ds[0][0].sum().item())
    assert len(crops) > 1


def test_validation_parts_keep_the_training_classes_and_leave_bad_images_out(tmp_path):
    """val/ holding only some classes gets the training class indices (dog stays 1), and so
    does a val.csv naming some labels only; the validation set leaves an undecodable image
    out rather than scoring another image in its place."""
    _image_folder(tmp_path / "d" / "train")
    _image_folder(tmp_path / "d" / "val", classes=("dog",), per_class=2)
    _png_cut_in_its_pixels(tmp_path / "d" / "val" / "dog" / "cut.png")
    train, val = make_datasets(tmp_path / "d", image_size=8)
    assert val.classes == ("cat", "dog") and [t for _, t in val.samples] == [1, 1, 1]
    assert [val[i][0] is None for i in range(3)] == [False, False, True]
    _image_folder(tmp_path / "img", classes=("a",), per_class=3)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train.csv").write_text("../img/a/0.png,cat dog\n../img/a/1.png,cat\n")
    (tmp_path / "m" / "val.csv").write_text("../img/a/2.png,dog\n")
    _, val = make_datasets(tmp_path / "m", image_size=8)
    assert val.classes == ("cat", "dog") and val.samples[0][1].tolist() == [0, 1]


def test_idx_training_sets_take_augment_none_and_the_padding_asked_for(tmp_path):
    """augment='none' leaves IDX training images as they are (only normalised); 'small' crops
    with the padding given."""
    root = make_idx_dataset(tmp_path / "toy", n_train=8, n_test=4)
    train, _ = make_datasets(root, image_size=16, augment="none")
    raw = read_idx(root / "train-images-idx3-ubyte.gz")
    (m,), (s,) = train.mean.flatten().tolist(), train.std.flatten().tolist()
    expected = (torch.from_numpy(raw).float()[:, None] - m) / s
    assert torch.allclose(train.__getitems__(list(range(8)))[0], expected)
    train, _ = make_datasets(root, image_size=16, augment="small", padding=5)
    assert (train.augment, train.padding) == ("small", 5)


def test_image_files_are_read_as_rgb_or_grey_only(tmp_path):
    """A model of 2 input channels cannot be fed image files: refused by name."""
    root = _image_folder(tmp_path / "d")
    with pytest.raises(DataError, match="takes 2 input channels: image files are read as RGB"):
        make_eval_dataset(root, image_size=16, in_chans=2)


def test_a_class_folder_half_unreadable_is_still_used(tmp_path, caplog):
    """Folders are refused only when more than half of the files are unreadable: exactly half
    is a warning, and the readable half is kept."""
    root = _image_folder(tmp_path / "d", per_class=2)
    for name in ("cat", "dog"):
        for i in range(2):
            (root / name / f"bad{i}.png").write_bytes(b"\x89PNG garbage")
    with caplog.at_level(logging.WARNING):
        samples, _ = scan_folder(root)
    assert [p.name for p, _ in samples] == ["0.png", "1.png"] * 2
    assert "skipped 4 unreadable image(s) of 8" in caplog.text


def test_a_label_list_row_without_a_comma_is_refused_by_line(tmp_path):
    """A row holding a path alone (no comma, so no labels column) is a mistake named with its
    line, not an image silently taken as having no labels (a row 'x.png,' has none on purpose)."""
    _image_folder(tmp_path / "img", classes=("a",), per_class=2)
    lst = tmp_path / "train.csv"
    lst.write_text("path,labels\nimg/a/0.png,cat\nimg/a/1.png\n")
    with pytest.raises(DataError, match=r"train\.csv:3: expected 'path,labels', got \['img/a/1"):
        read_label_list(lst)


def test_float_images_below_zero_are_black_not_wrapped_around(tmp_path):
    """Values under the range are clipped to 0: -0.5 in a [0, 1] float image is black, not a
    bright pixel from an unsigned wrap-around."""
    from xception.data import load_image

    Image.fromarray(np.array([[-0.5, 0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 0, 128, 255]


def test_imagenet_folders_may_mix_wordnet_ids_and_class_names(tmp_path):
    """With ImageNet's classes, folders had to be all WordNet IDs or all names: a folder of
    one's own named 'tench' beside ImageNet's n01443537 was refused as not a training class.
    Each folder is now matched by its own name; two folders of one class are refused."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    from xception.data import imagenet_wnids

    classes = tuple(_IMAGENET_CATEGORIES)
    wnids = imagenet_wnids()
    assert (classes[0], classes[1], wnids[1], wnids[999]) == (
        "tench", "goldfish", "n01443537", "n15075141")  # fmt: skip
    root = _image_folder(tmp_path / "mixed", classes=("n15075141", "tench", "n01443537"),
                         per_class=2)  # fmt: skip
    samples, got = scan_folder(root, classes)
    assert got == classes
    assert [(p.parent.name, t) for p, t in samples] == [
        ("tench", 0), ("tench", 0), ("n01443537", 1), ("n01443537", 1),
        ("n15075141", 999), ("n15075141", 999)]  # fmt: skip
    _image_folder(root, classes=("goldfish",), per_class=1)
    with pytest.raises(DataError, match=r"class goldfish has two folders, goldfish and "
                       r"n01443537: merge them into one"):  # fmt: skip
        scan_folder(root, classes)
    # Other classes take their names only: a WordNet ID is no class of theirs.
    other = _image_folder(tmp_path / "other", classes=("cat", "n01443537"), per_class=1)
    with pytest.raises(DataError, match=r"class folder\(s\) n01443537 are not in the training "
                       r"classes cat, dog: name each class's folder by class name$"):  # fmt: skip
        scan_folder(other, ("cat", "dog"))
