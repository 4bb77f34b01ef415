"""Datasets: IDX files, image folders, multi-label lists, seeded augmentation."""

import gzip
import logging
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from xception.data import (
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
