"""Data: image loading that survives real-world files, transform presets, and datasets.

Knows no model. Transform presets are named so that weights can carry the one they were trained
with (see `weights.py`), and so training and evaluation can never silently disagree.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import logging
import math
import numbers
import os
import struct
import unicodedata
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision import transforms as T

__all__ = [
    "DataError",
    "FileDataset",
    "ImageError",
    "TensorImageDataset",
    "eval_preset",
    "eval_transform",
    "keras_transform",
    "load_idx",
    "load_image",
    "make_datasets",
    "make_eval_dataset",
    "read_idx",
    "read_label_list",
    "scan_folder",
    "train_transform",
]

# Pillow's default bomb limit is ~89 MP (warning) / 179 MP (error). We refuse at the warning
# level: nothing a classifier looks at needs more, and a 'bomb' is a denial-of-service attempt.
MAX_IMAGE_PIXELS = 89_478_485


class ImageError(ValueError):
    """A file that is not a usable image (unreadable, truncated, too large)."""


def load_image(path: str | Path) -> Image.Image:
    """Open any image file as 8-bit RGB: EXIF orientation applied, palette/grey/CMYK/16-bit/alpha
    converted (alpha composited on white). Raises ImageError naming the file otherwise."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ImageError(
                        f"{path}: {im.width}x{im.height} pixels exceeds the limit of "
                        f"{MAX_IMAGE_PIXELS} (possible decompression bomb); resize it first"
                    )
                im.load()
                sixteen = im.format == "PPM" and im.mode == "I"  # exif_transpose drops format
                return _to_rgb(_upright(im), sixteen)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: refused, possible decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        # Pillow's "cannot identify image file '<path>'" named the file a second time.
        detail = str(err).replace(f" {str(path)!r}", "")
        raise ImageError(f"{path}: not a readable image ({detail})") from None


_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}  # fmt: skip


def _upright(im: Image.Image) -> Image.Image:
    """`im` turned as its EXIF orientation says. Pillow's exif_transpose also writes the EXIF
    back, and a malformed tag elsewhere in it (text in a numeric tag) raised struct.error
    there, which stopped predict: then the orientation is applied here, the EXIF left alone."""
    try:
        return ImageOps.exif_transpose(im)
    except (struct.error, TypeError, ValueError, KeyError):
        try:
            orientation = im.getexif().get(0x0112)
        except (struct.error, TypeError, ValueError, KeyError, OSError):
            return im  # no orientation to be read: the pixels as stored
        method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
        return im.transpose(method) if method is not None else im


def _to_rgb(im: Image.Image, sixteen: bool = False) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bits by the range the format allows (float: [0, 1]
        # when its values are, but for a slight overshoot). `sixteen`: 16-bit data in mode I
        # (Pillow reads a PGM whose maxval is over 255 so, scaled to 0-65535), also when all
        # of it is dark.
        import numpy as np

        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        if im.mode == "F" and arr.max() <= 1.5:
            # A float image in [0, 1], the usual scale of float TIFFs; a bicubic resize or a
            # sharpening leaves values a little above 1, which had made it read as 0-255 (all
            # but black; on that scale, values up to 1.5 are black anyway). Clipped at 1.
            top = 1.0
        else:
            top = 65535.0 if sixteen or im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        # A 16-bit grey PNG's transparent value (tRNS) is on the 16-bit scale: its pixels
        # become alpha 0 here, before the scaling would lose which they were.
        clear = im.info.get("transparency")
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if isinstance(clear, int | float) and not isinstance(clear, bool):
            alpha = np.where(arr == clear, 0, 255).astype(np.uint8)
            im = Image.merge("LA", (im, Image.fromarray(alpha, "L")))
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        # A palette's transparent entries, or a grey/RGB PNG's transparent colour (tRNS: what
        # PNG optimisers turn an RGBA image with on/off alpha into): on white, like RGBA.
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


def keras_transform(size: int = 299) -> T.Compose:
    """Keras' Xception evaluation preprocessing: resize to size x size, RGB scaled to [-1, 1]."""
    return T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x / 127.5 - 1
        ]
    )


def is_number(value) -> bool:
    """A real number (numpy's too), not True or False."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def is_crop_fraction(value) -> bool:
    """Whether `value` can be a centre crop's fraction of the resized image: above 0, finite."""
    return is_number(value) and 0 < value < math.inf


def eval_transform(
    size: int = 299,
    crop_fraction: float = 1.0,
    interpolation: str = "bilinear",
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
    in_chans: int | None = None,
) -> T.Compose:
    """Resize the shorter side to size / crop_fraction, centre-crop size, normalise.

    crop_fraction=1.0 with a square resize is Keras' preprocessing; timm's legacy_xception uses
    crop_fraction=0.8975 with bicubic interpolation. `in_chans` 1 or 3 first converts an image
    of any mode as `load_image` does (alpha on white, palette, 16-bit), then to its luminance
    for 1; for another count, an image with as many bands (RGBA for 4) is taken as it is and
    any other refused."""
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation={interpolation!r}: use one of {sorted(_INTERPOLATION)}")
    # 0 was a ZeroDivisionError, a negative fraction a negative resize inside torchvision.
    if not is_crop_fraction(crop_fraction):
        raise ValueError(f"crop_fraction={crop_fraction!r} is not valid: give the part of the "
                         "resized image the centre crop keeps, above 0 (1.0: Keras' square "
                         "resize; timm's Xception weights: 0.8975)")  # fmt: skip
    if crop_fraction >= 1.0:
        resize = T.Resize((size, size), interpolation=_INTERPOLATION[interpolation], antialias=True)
        steps = [resize]
    else:
        resize_to = int(size / crop_fraction)
        steps = [
            _ResizeLimit(resize_to),
            T.Resize(resize_to, interpolation=_INTERPOLATION[interpolation], antialias=True),
            T.CenterCrop(size),
        ]
    if in_chans in (1, 3):
        steps.insert(0, _ImageMode(in_chans))
    elif in_chans is not None:
        steps.insert(0, _ImageBands(in_chans))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def _require_pil(image) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}: open the file with "
                        "PIL.Image.open (or xception.data.load_image)")  # fmt: skip


class _ImageMode:
    """Converts a PIL image of any mode to RGB (3 channels) or its luminance (1), as
    `load_image` and predict do: an RGBA or grey image had given the model 4 or 1 channels."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: Image.Image) -> Image.Image:
        _require_pil(image)
        mode = "L" if self.channels == 1 else "RGB"
        if image.mode == mode and "transparency" not in image.info:
            return image  # as load_image gives it (predict): no copy
        rgb = _to_rgb(image, image.format == "PPM" and image.mode == "I")  # as load_image
        return rgb.convert("L") if self.channels == 1 else rgb

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'L' if self.channels == 1 else 'RGB'})"


class _ImageBands:
    """For a model of another channel count than 1 or 3: takes an image whose bands are as many
    as the model's channels (an "LA" image for 2, "RGBA" or "CMYK" for 4) as it is, and refuses
    any other with the counts and the fix; torchvision's Normalize had failed on the tensor."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: Image.Image) -> Image.Image:
        _require_pil(image)
        bands = len(image.getbands())
        if bands != self.channels:
            modes = {2: "'LA' (grey and alpha)", 4: "'RGBA' or 'CMYK'"}
            fix = (f"give it {modes[self.channels]} images, e.g. image.convert"
                   f"('{'LA' if self.channels == 2 else 'RGBA'}')" if self.channels in modes
                   else "build its input tensors yourself")  # fmt: skip
            raise ImageError(f"a {image.mode!r} image has {bands} band"
                             f"{'s' if bands != 1 else ''}, but the model takes {self.channels} "
                             f"input channels: {fix}")  # fmt: skip
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.channels})"


class _ResizeLimit:
    """Refuses an image whose shorter side, resized to `shorter` pixels, would make a picture
    beyond MAX_IMAGE_PIXELS: a 1x20000 strip would become 333x6.7 million, gigabytes in memory."""

    def __init__(self, shorter: int) -> None:
        self.shorter = shorter

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        pixels = self.shorter * self.shorter * max(w, h) / max(1, min(w, h))
        if pixels > MAX_IMAGE_PIXELS:
            raise ImageError(
                f"{w}x{h} pixels: too elongated to resize its shorter side to {self.shorter} px "
                f"({pixels:,.0f} pixels, over the limit of {MAX_IMAGE_PIXELS:,}); crop it first"
            )
        return image


def to_batch(images: list[Image.Image], transform) -> torch.Tensor:
    return torch.stack([transform(im) for im in images])


# ---------------------------------------------------------------------------------------------
# Datasets for training and evaluation
#
# Every random choice an augmentation makes is a function of (seed, epoch, sample index) only:
# the same sample gets the same crop in a single process, on any DDP rank, and after a resume in
# the middle of an epoch, so runs are exactly reproducible whatever their layout.
# ---------------------------------------------------------------------------------------------
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
MNIST_CLASSES = tuple(str(d) for d in range(10))
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# What a folder search picks up (class folders, `predict` on a folder); named files are tried
# whatever their name.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif",
                            ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".avif",
                            ".apng"})  # fmt: skip
# Normalisation (mean, std) per preset family: the paper's models see x / 127.5 - 1.
KERAS_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
FASHION_MNIST_MEAN_STD = ((0.2860,), (0.3530,))
MNIST_MEAN_STD = ((0.1307,), (0.3081,))
TRAIN_PRESETS = ("imagenet", "small", "none")
EVAL_PRESETS = ("keras", "small")

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Data the user pointed at cannot be used (missing, empty, mostly unreadable)."""


def sample_keys(seed: int, epoch: int, indices) -> np.ndarray:
    """A 64-bit random key per sample: splitmix64 of (seed, epoch, index), vectorised."""
    with np.errstate(over="ignore"):
        z = np.asarray(indices, dtype=np.uint64) + np.uint64(
            (seed * 1_000_003 + epoch) & (2**63 - 1)
        ) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


GZIP_MAGIC = b"\x1f\x8b"


@contextlib.contextmanager
def open_idx(path: Path):
    """An IDX file opened for reading its bytes, through gzip if its first bytes say so (not
    its name: a browser may have unpacked a download and kept its '.gz'). A file that cannot
    be read or decompressed, then or while it is read, is a DataError naming the fix."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == GZIP_MAGIC
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            yield f
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: damaged gzip file, it cannot be decompressed ({err}); "
                        "download it again") from None  # fmt: skip
    except OSError as err:
        raise DataError(f"{path}: not a readable IDX file ({err})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format), plain or gzipped, as a numpy array of its stored type.

    Gzip is told by the file's first bytes, not its name: a browser may have unpacked a
    download and kept its '.gz'."""
    path = Path(path)
    with open_idx(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX file (its header is cut short)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]]).newbyteorder(">")
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow to a small number
    body = raw[4 + 4 * ndim :]
    if len(body) < expected:
        raise DataError(f"{path}: truncated IDX file ({len(body):,} of {expected:,} data bytes)")
    if len(body) > expected:
        raise DataError(f"{path}: damaged IDX file ({len(body) - expected:,} bytes more than its "
                        f"header's {'x'.join(map(str, dims))} values)")  # fmt: skip
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def idx_count(root: str | Path, split: str) -> int:
    """How many images an IDX folder's `split` ('train' or 'test') holds, from its label file's
    header alone."""
    path = _find_idx(Path(root), IDX_FILES[split][1])
    with open_idx(path) as f:
        head = f.read(8)
    if len(head) < 8 or head[:2] != b"\0\0" or head[3] != 1:
        raise DataError(f"{path}: not an IDX label file (bad magic number)")
    return struct.unpack(">I", head[4:8])[0]


_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: "i2", 0x0C: "i4", 0x0D: "f4", 0x0E: "f8"}


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"{root}: {stem}.gz not found. Point --data at a folder holding the four IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...), or install the "
        "Debian package dataset-fashion-mnist"
    )


def is_idx_dir(root: str | Path) -> bool:
    root = Path(root)
    return root.is_dir() and any(root.glob("train-images*idx3-ubyte*"))


def _holds_idx(root: Path) -> bool:
    """IDX files of either split: a folder holding only the test split is still IDX data (to
    evaluate on, or to be told that training needs the train files), not a class folder."""
    return is_idx_dir(root) or (root.is_dir() and any(root.glob("t10k-images*idx3-ubyte*")))


# sha256 of Fashion-MNIST's label arrays (train, test): the data is known by its content
# wherever it lies, not only in a folder whose name says 'fashion'.
FASHION_MNIST_LABELS_SHA256 = frozenset({
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
})  # fmt: skip


def _is_fashion_mnist(root: Path, labels: np.ndarray) -> bool:
    if "fashion" in str(root).lower():
        return True
    return hashlib.sha256(np.ascontiguousarray(labels, np.uint8).tobytes()).hexdigest() in (
        FASHION_MNIST_LABELS_SHA256
    )


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W), fetched and augmented a whole
    batch at a time (`__getitems__`): Fashion-MNIST's 60,000 images cost no loader time.

    `augment` is "small" (random crop with `padding` zero pixels, horizontal flip) or "none".
    Targets are class indices (N,) or multi-hot rows (N, K)."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: tuple[str, ...],
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: str = "none",
        padding: int = 2,
        hflip: bool = True,
        size: int | None = None,
        seed: int = 0,
    ) -> None:
        if augment not in ("small", "none"):
            raise ValueError(f"augment={augment!r}: in-memory images support 'small' or 'none'")
        self.images, self.targets, self.classes = images, targets, tuple(classes)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.augment, self.padding, self.hflip = augment, padding, hflip
        square = images.shape[-2] == images.shape[-1]
        self.size = size if size and (size != images.shape[-1] or not square) else None
        self.seed, self.epoch = seed, 0
        self.multilabel = targets.ndim == 2
        self.channels = images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        if self.size is not None:
            # Resized first, as image files are (train_transform): the crop's padding is in
            # pixels of the size trained on (16 px IDX images at 32 had shifted twice as far).
            x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear",
                              antialias=True)  # fmt: skip
        if self.augment == "small":
            x = self._crop_flip(x, sample_keys(self.seed, self.epoch, indices))
        x = (x.float() - self.mean) / self.std
        return x, self.targets[idx]

    def _crop_flip(self, x: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        p = self.padding
        n, c, h, w = x.shape
        span = 2 * p + 1
        if p > 0:
            dy = torch.from_numpy((keys % np.uint64(span)).astype(np.int64))
            dx = torch.from_numpy(((keys >> np.uint64(8)) % np.uint64(span)).astype(np.int64))
            padded = x.new_zeros(n, c, h + 2 * p, w + 2 * p)
            padded[:, :, p : p + h, p : p + w] = x
            # One gather for the whole batch: image i reads rows dy[i].. and columns dx[i]..
            rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
            x = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                       rows, cols]  # fmt: skip
        if self.hflip:
            flip = torch.from_numpy(((keys >> np.uint64(16)) & np.uint64(1)).astype(bool))
            x[flip] = x[flip].flip(-1)
        return x

    @staticmethod
    def collate(batch):
        return batch  # __getitems__ already returns (images, targets)


def load_idx(
    root: str | Path,
    split: str,
    *,
    classes: tuple[str, ...] | None = None,
    like: TensorImageDataset | None = None,
    **kw,
) -> TensorImageDataset:
    """Fashion-MNIST / MNIST split ('train' or 'test') from IDX files, in memory. `like`: the
    other split of the same data, whose classes and normalisation this one takes (each split
    had told the dataset from its own labels: a training part that did not look like
    Fashion-MNIST's was normalised as MNIST, its test split as Fashion-MNIST)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    images_file, labels_file = (_find_idx(root, s) for s in IDX_FILES[split])
    images = read_idx(images_file)
    labels = read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{root}: {split} images {images.shape} and labels {labels.shape} do not match "
            "(expected N images of H x W and N class indices)"
        )
    if images.dtype != np.uint8:
        raise DataError(f"{images_file}: {images.dtype} pixels; IDX images of unsigned bytes "
                        "(0-255) are expected")  # fmt: skip
    fashion = labels.dtype == np.uint8 and _is_fashion_mnist(root, labels)
    own = FASHION_MNIST_CLASSES if fashion else MNIST_CLASSES
    if like is not None:
        own = classes = like.classes
    elif len(labels) and labels.min() >= 0 and labels.max() >= len(own):
        # Other IDX data (EMNIST: 26 or 47 classes): as many classes as its labels name.
        own = tuple(str(k) for k in range(int(labels.max()) + 1))
        if classes is None:
            log.info("%s: labels 0 to %d: %d classes, named by index", labels_file,
                     len(own) - 1, len(own))  # fmt: skip
    if classes is None:
        classes = own
    elif tuple(map(_nfc, classes)) != tuple(map(_nfc, own)):
        labels = _relabel(labels, own, classes, root)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(
            f"{labels_file}: labels go from {labels.min()} to {labels.max()}, but there are "
            f"{len(classes)} classes ({classes[0]} ... {classes[-1]}): the file is damaged, or "
            "the data is not what the model was trained on"
        )
    default = FASHION_MNIST_MEAN_STD if fashion else MNIST_MEAN_STD
    kw.setdefault("mean", default[0])
    kw.setdefault("std", default[1])
    dataset = TensorImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        classes,
        **kw,
    )
    if like is not None:  # exactly the other split's (not through a round trip of floats)
        dataset.mean, dataset.std = like.mean.clone(), like.std.clone()
    return dataset


def _relabel(labels: np.ndarray, own: tuple[str, ...], classes: tuple[str, ...],
             root: Path) -> np.ndarray:  # fmt: skip
    """IDX labels (indices into the data's own class names, `own`) as indices into a model's
    `classes`, matched by name: a model trained on Fashion-MNIST's PNG folders has them
    sorted by name, and label k had been scored against its k-th output. Classes that share
    no name with the data's (named by index, say) keep the labels as they are."""
    index = _class_index(classes)
    # A data name as the model has it, or as a folder spells it (a run trained on folders).
    table = [index.get(_nfc(n), index.get(_folder_name(n), -1)) for n in own]
    if all(k < 0 for k in table):
        return labels
    present = np.unique(labels).tolist() if len(labels) else []
    missing = [own[k] for k in present if table[k] < 0]
    if missing:
        raise DataError(f"{root}: its classes {', '.join(missing)} are not among the model's "
                        f"({', '.join(classes)}): evaluate a model trained on these classes")  # fmt: skip
    return np.array(table)[labels.astype(np.int64)]


def train_transform(preset: str, size: int, mean=KERAS_MEAN_STD[0], std=KERAS_MEAN_STD[1],
                    padding: int | None = None):  # fmt: skip
    """Training augmentation for PIL images.

    'imagenet': Inception-style random-resized crop (8-100% of the area, 3/4-4/3 aspect) and
    horizontal flip, the augmentation Xception was trained with; 'small': resize, random crop
    with `padding` zero pixels (default 1/8 of the size) and flip, for 28-64 px images; 'none':
    the evaluation resize only."""
    if preset == "imagenet":
        steps = [T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                 T.RandomHorizontalFlip()]  # fmt: skip
    elif preset == "small":
        pad = max(1, size // 8) if padding is None else padding
        steps = [T.Resize((size, size), antialias=True),
                 T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip()]  # fmt: skip
    elif preset == "none":
        steps = [T.Resize((size, size), antialias=True)]
    else:
        raise ValueError(f"train transform {preset!r}: use one of {', '.join(TRAIN_PRESETS)}")
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def eval_preset(preset: str, size: int, mean=KERAS_MEAN_STD[0], std=KERAS_MEAN_STD[1]):
    """Evaluation preprocessing: 'keras' (square resize, Keras' Xception) or 'small' (same
    square resize with the dataset's own normalisation)."""
    if preset not in EVAL_PRESETS:
        raise ValueError(f"eval transform {preset!r}: use one of {', '.join(EVAL_PRESETS)}")
    return eval_transform(size, 1.0, "bilinear", mean, std)


class FileDataset(torch.utils.data.Dataset):
    """Images read from files with a per-sample transform: image folders and multi-label lists.

    `samples` are (path, target) pairs; target is a class index or a multi-hot float tensor. A
    file that fails to decode at load time is logged; for training (`substitute=True`) it is
    replaced by the next readable sample, so one bad file never kills a long run, and for
    evaluation it is left out of its batch (`collate`), so no image is scored twice and the
    count says how many were scored. `grey` feeds 1-channel models the luminance."""

    def __init__(self, samples, classes, transform, *, seed: int = 0, multilabel: bool = False,
                 substitute: bool = True, grey: bool = False):  # fmt: skip
        self.samples, self.classes, self.transform = list(samples), tuple(classes), transform
        self.seed, self.epoch, self.multilabel = seed, 0, multilabel
        self.substitute, self.grey = substitute, grey
        self.failed: set[int] = set()
        self.tried: set[int] = set()  # indices this process has loaded (or failed to)
        self.classes_checked: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        key = int(sample_keys(self.seed, self.epoch, [index])[0] >> np.uint64(1))
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, target = self.samples[i]
            self.tried.add(i)
            try:
                image = load_image(path)
                if self.grey:
                    image = image.convert("L")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(key)
                    x = self.transform(image)
            except ImageError as err:  # unreadable, or unfit for the transform (_ResizeLimit)
                if i not in self.failed:
                    self.failed.add(i)
                    text = str(err)
                    log.warning("skipping unreadable image %s", text if text.startswith(str(path))
                                else f"{path}: {text}")  # fmt: skip
                if not self.substitute:
                    return None, target
                self._check_failures(target)
                continue
            return x, target
        raise DataError("no readable image left in the dataset")

    def _check_failures(self, target) -> None:
        """In training, where failures are replaced: stop when most images tried fail to
        decode, or when a class has no image that decodes (its images had all been replaced
        by other classes' without a word: a class the model never saw)."""
        tried, failed = len(self.tried), len(self.failed)
        if failed * 2 > tried >= min(20, len(self.samples)):
            raise DataError(f"{failed} of {tried} images tried failed to decode (they passed the "
                            "header check): most of the data is unreadable; check the files")  # fmt: skip
        if self.multilabel or int(target) in self.classes_checked:
            return
        k = int(target)
        self.classes_checked.add(k)  # once per class and process: one decode at most, usually
        files = [(j, path) for j, (path, t) in enumerate(self.samples) if int(t) == k]
        for j, path in files:
            if j in self.failed:
                continue
            try:
                load_image(path)
                return
            except ImageError as err:
                self.failed.add(j)
                log.warning("skipping unreadable image %s", err)
        raise DataError(f"class {self.classes[k]!r} has no readable image: all {len(files)} of "
                        f"its files failed to decode (e.g. {files[0][1]}): replace or remove "
                        "them")  # fmt: skip

    @staticmethod
    def collate(batch):
        """default_collate of the readable samples; (None, None) when none of them was."""
        batch = [item for item in batch if item[0] is not None]
        return torch.utils.data.default_collate(batch) if batch else (None, None)


class Samples(list):
    """(path, target) pairs of a listed dataset (`scan_folder`, `read_label_list`), and
    `skipped`: how many files listed were left out for failing the header check (which
    `xception eval` counts with those that then fail to decode)."""

    skipped: int = 0


def _check_readable(paths: list[Path], where: str) -> list[bool]:
    """Header check of every file; unreadable ones are logged with their path and counted."""
    ok = []
    for path in paths:
        try:
            with warnings.catch_warnings():  # not Pillow's raw two-line warning: our one line
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise ValueError("too large")
                    im.verify()
            ok.append(True)
        except Exception:  # noqa: BLE001 - any failure: decode it as training and eval would
            # verify() is stricter than the decoder (a PNG cut at its IEND chunk, a bad CRC
            # in a trailing text chunk): such files, which predict classifies, were dropped.
            try:
                load_image(path)
                ok.append(True)
            except ImageError as err:
                log.warning("skipping unreadable image (%s)", err)
                ok.append(False)
    bad = ok.count(False)
    if ok and bad * 2 > len(ok):
        raise DataError(
            f"{where}: {bad} of {len(ok)} images are unreadable; check the files "
            "(first: {})".format(next(p for p, g in zip(paths, ok, strict=True) if not g))
        )
    if bad:
        log.warning("%s: skipped %d unreadable image(s) of %d", where, bad, len(ok))
    return ok


def image_files(folder: str | Path) -> list[Path]:
    """The image files under `folder` (by suffix, `IMAGE_SUFFIXES`), recursively and sorted.

    Hidden files and folders are skipped: macOS leaves a '._x.jpg' of metadata beside every
    image it copies to a foreign disk, which is no image. Symbolic links to folders elsewhere
    are followed (a class folder assembled from links to other disks); a link into the tree
    itself, up to a folder that holds it, or to a folder already followed is not, so no image
    is found twice and no link makes a loop."""
    followed = [os.path.realpath(folder)]
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        keep = []
        for name in dirs:
            if name.startswith("."):
                continue
            if os.path.islink(os.path.join(top, name)):
                target = os.path.realpath(os.path.join(top, name))
                if any(_within(target, f) or _within(f, target) for f in followed):
                    continue
                followed.append(target)
            keep.append(name)
        dirs[:] = keep
        found += [
            Path(top, name) for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
            and os.path.isfile(os.path.join(top, name))
        ]  # fmt: skip
    return sorted(found)


def _within(path: str, folder: str) -> bool:
    """Whether the real path `path` is `folder` or under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """ImageNet-1k's WordNet IDs (n01440764, ...) in class-index order: the i-th is the class of
    the i-th output of ImageNet weights (Keras', timm's, torchvision's), whose names
    `WEIGHTS['imagenet'].categories` lists in the same order."""
    from importlib import resources  # not a path beside __file__: a zipped package has none

    return tuple(resources.files(__package__).joinpath("imagenet_wnids.txt").read_text("ascii")
                 .split())  # fmt: skip


def _is_imagenet(classes: tuple[str, ...]) -> bool:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(classes) == tuple(_IMAGENET_CATEGORIES)


def _nfc(name: str) -> str:
    """A name in Unicode's composed form (NFC), as class names are compared."""
    return unicodedata.normalize("NFC", name)


def _folder_name(name: str) -> str:
    """A class name as a folder can be named: '/' (and the OS's separators) as '_'."""
    for sep in {"/", os.sep, os.altsep or "/"}:
        name = name.replace(sep, "_")
    return _nfc(name)


def _class_index(classes: tuple[str, ...]) -> dict[str, int]:
    """Class k by its name, after Unicode normalisation, and by the name a folder can have: a
    class name no folder can have ("T-shirt/top", Fashion-MNIST's) with '_' for '/'."""
    index = {_nfc(name): k for k, name in enumerate(classes)}
    return {**{_folder_name(name): k for k, name in enumerate(classes)}, **index}


def scan_folder(root: str | Path, classes: tuple[str, ...] | None = None):
    """(samples, classes) of a folder with one sub-folder of images per class. With ImageNet's
    classes given (ImageNet weights), folders named by WordNet ID (n01440764, ...) are matched
    to their class too."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{root}: no class folders; put each class's images in a sub-folder")
    if classes is None and len(found) == 1:
        # One class is no classifier (every image scores 100%): most often the folder above the
        # class folders, e.g. data/ holding images/cat, images/dog.
        inner = sorted(d.name for d in (root / found[0]).iterdir()
                       if d.is_dir() and not d.name.startswith("."))  # fmt: skip
        hint = (f"if its sub-folders ({', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''})"
                f" are the classes, pass --data {root / found[0]}" if inner
                else "put each class's images in a sub-folder of its own")  # fmt: skip
        raise DataError(f"{root}: a single class folder, {found[0]}: a classifier needs two or "
                        f"more classes; {hint}")  # fmt: skip
    classes = tuple(classes or found)
    # ImageNet's classes (ImageNet weights) in folders named as ImageNet's own are
    # (val/n01440764/, and Imagenette's): the folder of class k is the k-th WordNet ID, or its
    # name, folder by folder (a folder of one's own images beside ImageNet's).
    imagenet = _is_imagenet(classes)
    # Matched after Unicode normalisation: macOS writes names decomposed ('e' + accent), so a
    # folder 'café' copied from a Mac did not match the class 'café' a model was trained with.
    index = _class_index(classes)
    if imagenet:
        index |= {wnid: k for k, wnid in enumerate(imagenet_wnids())}
    unknown = sorted(name for name in found if _nfc(name) not in index)
    if unknown:
        listed = ", ".join(classes) if len(classes) <= 20 else (
            f"{', '.join(classes[:20])}, ... ({len(classes)} classes)")  # fmt: skip
        ids = " or WordNet ID (n01440764, ...)" if imagenet else ""
        more = f", ... ({len(unknown)} folders)" if len(unknown) > 20 else ""
        raise DataError(f"{root}: class folder(s) {', '.join(unknown[:20])}{more} are not in the "
                        f"training classes {listed}: name each class's folder by class "
                        f"name{ids}"
                        + (" ('/' in a name written as '_')" if any("/" in c for c in classes)
                           else ""))  # fmt: skip
    first: dict[int, str] = {}
    for name in found:
        other = first.setdefault(index[_nfc(name)], name)
        if other != name:
            raise DataError(f"{root}: class {classes[index[_nfc(name)]]} has two folders, "
                            f"{other} and {name}: merge them into one")  # fmt: skip
    by_class = sorted(found, key=lambda name: index[_nfc(name)])  # in class order, as before
    paths, targets, folder_of = [], [], []
    for name in by_class:
        folder = root / name
        files = image_files(folder)
        if not files:
            raise DataError(f"class folder {folder} has no images: add images or remove it")
        paths += files
        targets += [index[_nfc(name)]] * len(files)
        folder_of += [name] * len(files)
    ok = _check_readable(paths, str(root))
    samples = Samples((p, t) for p, t, g in zip(paths, targets, ok, strict=True) if g)
    samples.skipped = ok.count(False)
    left = {f for f, g in zip(folder_of, ok, strict=True) if g}
    for name in by_class:
        if name not in left:
            raise DataError(f"class folder {root / name} has no readable images: fix its "
                            "images or remove the folder")  # fmt: skip
    return samples, classes


def read_label_list(path: str | Path, classes: tuple[str, ...] | None = None):
    """(samples, classes) of a multi-label CSV list: `path,labels` rows, labels separated by
    spaces or ';'. Relative paths are relative to the list file; a `path,labels` header is
    allowed. Targets are multi-hot float vectors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label list not found: {path}")
    if path.suffix.lower() != ".csv":
        raise DataError(f"{path}: not a label list (.csv): --data takes a folder (class folders, "
                        "train/ and val/, IDX files, train.csv/val.csv) or a .csv list")  # fmt: skip
    rows, seen, again = [], {}, []  # rows: (file, labels, line)
    try:  # utf-8-sig: a byte-order mark (as spreadsheets write) is not part of the header
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                line = reader.line_num
                # A blank line, or the empty rows a spreadsheet exports below its table (',,').
                if not any(cell.strip() for cell in row) or (
                    not rows and row[0].strip().lower() == "path"
                ):
                    continue
                if not row[0].strip():
                    raise DataError(f"{path}:{line}: labels without an image path: give the "
                                    "image's path first, e.g. 'images/a.jpg,cat dog'")  # fmt: skip
                if len(row) < 2:
                    raise DataError(f"{path}:{line}: expected 'path,labels', got {row!r}")
                if any("\n" in cell for cell in row):
                    raise DataError(f"{path}:{line}: a quote opened in this row runs over the "
                                    "next line: close it, or drop it")  # fmt: skip
                # Labels: every column after the path, each split at spaces or ';'.
                labels = [s for cell in row[1:] for s in cell.replace(";", " ").split() if s]
                file = path.parent / row[0].strip()
                if file in seen:
                    again.append(f"{row[0].strip()} on lines {seen[file]} and {line}")
                seen.setdefault(file, line)
                rows.append((file, labels, line))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text label list ({err})") from None
    if not rows:
        raise DataError(f"{path}: no rows; expected lines like 'images/a.jpg,cat dog'")
    if again:
        log.warning("%s: %d row(s) repeat an image listed before (first: %s); each row counts, "
                    "in training and in scores", path, len(again), again[0])  # fmt: skip
    ok = _check_readable([p for p, _, _ in rows], str(path))
    readable = [row for row, good in zip(rows, ok, strict=True) if good]
    # Classes come from the images that will be seen, so a missing file adds none.
    classes = tuple(classes or sorted({_nfc(lab) for _, labs, _ in readable for lab in labs}))
    index = {_nfc(c): k for k, c in enumerate(classes)}  # matched as scan_folder matches
    samples = Samples()
    samples.skipped = ok.count(False)
    for p, labels, line in readable:
        labels = [_nfc(lab) for lab in labels]
        unknown = [lab for lab in labels if lab not in index]
        if unknown:
            raise DataError(f"{path}:{line}: label {unknown[0]!r} is not one of the model's "
                            f"{len(classes)} classes ({', '.join(classes[:8])}"
                            f"{', ...' if len(classes) > 8 else ''})")  # fmt: skip
        target = torch.zeros(len(classes))
        target[[index[lab] for lab in labels]] = 1.0
        samples.append((p, target))
    return samples, classes


def split_samples(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) index lists: a seeded permutation, `fraction` of it held out."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_fraction={fraction}: use a fraction in (0, 1) to hold out data")
    k = max(1, round(n * fraction))
    if k >= n:
        raise DataError(f"{n} sample(s) with val_fraction={fraction} would leave nothing to train "
                        "on: add data, lower the fraction, or give the validation data "
                        "separately (a val/ folder, or val.csv)")  # fmt: skip
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def resolve_data(data: str | Path) -> Path:
    """A dataset name ('fashion-mnist') or a path, as a path that exists."""
    if str(data) == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise DataError(
                f"Fashion-MNIST not found at {FASHION_MNIST_DIR}: install the Debian package "
                "dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist), or pass "
                "--data DIR, a folder holding its four IDX files (xception demo --data DIR)"
            )
        return FASHION_MNIST_DIR
    if str(data) == "mnist":
        raise DataError("MNIST has no default location: pass --data DIR holding its IDX files")
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(
            f"data folder not found: {path}; pass --data DIR (class folders, train/ and val/, "
            "IDX files, or a .csv list)"
        )
    return path


def _file_datasets(train_samples, val_samples, classes, multilabel, *, size, augment, padding,
                   seed):  # fmt: skip
    mean, std = KERAS_MEAN_STD
    train = FileDataset(train_samples, classes, train_transform(augment, size, mean, std, padding),
                        seed=seed, multilabel=multilabel)  # fmt: skip
    val = FileDataset(val_samples, classes, eval_preset("keras", size, mean, std),
                      seed=seed, multilabel=multilabel, substitute=False)  # fmt: skip
    return train, val


def _holds_images(folder: Path) -> bool:
    """Whether `folder` has image files of its own (not only in sub-folders)."""
    return any(not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
               for f in folder.iterdir())  # fmt: skip


def _is_split(root: Path, name: str) -> bool:
    """Whether `root/name` ('train' or 'val') is a split of class folders rather than a class
    of its own: a folder with no images of its own, beside no class folders. CIFAR-100's and
    Pascal VOC's "train" class had been taken for a split ("no class folders") in training,
    and a "val" class in eval."""
    folder = root / name
    if not folder.is_dir() or _holds_images(folder):
        return False
    return not any(d.is_dir() and d.name not in ("train", "val", "test")
                   and not d.name.startswith(".") and _holds_images(d)
                   for d in root.iterdir())  # fmt: skip


def make_datasets(
    data: str | Path,
    *,
    image_size: int,
    augment: str = "small",
    padding: int = 2,
    val_fraction: float = 0.1,
    seed: int = 0,
):
    """(train, val) datasets for `data`, which may be:

    - 'fashion-mnist' or a folder of IDX files: the train split, and the test split as val;
    - a folder with `train/` (and `val/`) sub-folders of class folders, or just class folders;
    - a multi-label list `*.csv`, or a folder holding `train.csv` (and `val.csv`).

    Without a validation part, `val_fraction` of the training data is held out with `seed`.
    Both datasets carry `classes` and `multilabel`; in-memory ones also `channels`."""
    root = resolve_data(data)
    if _holds_idx(root):
        if augment == "imagenet":
            raise DataError(f"{root}: augment='imagenet' (random-resized crops) works on image "
                            "files; IDX images take augment='small' or 'none'")  # fmt: skip
        kw = dict(size=image_size, seed=seed)
        train = load_idx(root, "train", augment="none" if augment == "none" else "small",
                         padding=padding, **kw)  # fmt: skip
        return train, load_idx(root, "test", like=train, **kw)
    if root.is_file() or (root / "train.csv").is_file():
        train_list = root if root.is_file() else root / "train.csv"
        samples, classes = read_label_list(train_list)
        if root.is_dir() and (root / "val.csv").is_file():
            val_samples, _ = read_label_list(root / "val.csv", classes)
        else:
            keep, held = split_samples(len(samples), val_fraction, seed)
            samples, val_samples = [samples[i] for i in keep], [samples[i] for i in held]
        return _file_datasets(samples, val_samples, classes, True, size=image_size,
                              augment=augment, padding=padding, seed=seed)  # fmt: skip
    if _is_split(root, "train"):
        samples, classes = scan_folder(root / "train")
        if _is_split(root, "val"):
            val_samples, _ = scan_folder(root / "val", classes)
        else:
            for other in ("valid", "validation"):  # Kaggle's and Roboflow's names for it
                if (root / other).is_dir():
                    log.warning("%s is not read as the validation part (only val/ is): %s of "
                                "train/ is held out instead; rename it val/ to use it",
                                root / other, f"{val_fraction:.0%}")  # fmt: skip
            keep, held = split_samples(len(samples), val_fraction, seed)
            samples, val_samples = [samples[i] for i in keep], [samples[i] for i in held]
    else:
        samples, classes = scan_folder(root)
        keep, held = split_samples(len(samples), val_fraction, seed)
        samples, val_samples = [samples[i] for i in keep], [samples[i] for i in held]
    return _file_datasets(samples, val_samples, classes, False, size=image_size,
                          augment=augment, padding=padding, seed=seed)  # fmt: skip


def make_eval_dataset(
    data: str | Path,
    *,
    image_size: int,
    classes: tuple[str, ...] | None = None,
    in_chans: int = 3,
    crop_fraction: float = 1.0,
    interpolation: str = "bilinear",
    held_out: tuple[float, int] | None = None,
    train_images: int | None = None,
    **norm,
):
    """The dataset to evaluate on: IDX test split, `val/` (or the whole folder of class
    folders), or a multi-label list (`val.csv` in a folder, or the given CSV file). Image files
    are read as RGB, or as grey for a model with `in_chans=1`, and prepared as `eval_transform`
    does with `crop_fraction` and `interpolation` (the weights' own preprocessing).

    `held_out=(val_fraction, seed)`, for a run evaluated on the data it trained on: where that
    data has no validation part (class folders alone, `train/` alone, a list without val.csv)
    the dataset is the part training held out, as `make_datasets` split it. The returned
    dataset's `held_out` says whether that was done, and its `listing` (image files only)
    counts the files listed that passed and that failed the header check (before any split).
    `train_images`, the images in the training part of the run's split (before any
    --train-subset), when known: data that has gained or lost images since is refused,
    because its split is another (one image more reshuffles it) and would score images the run
    trained on."""
    root = resolve_data(data)
    if _holds_idx(root):
        return load_idx(root, "test", size=image_size, classes=classes, **norm)
    if in_chans not in (1, 3):
        raise DataError(f"the model takes {in_chans} input channels: image files are read as "
                        "RGB (3) or grey (1)")  # fmt: skip
    mean, std = norm.get("mean", KERAS_MEAN_STD[0]), norm.get("std", KERAS_MEAN_STD[1])
    transform = eval_transform(image_size, crop_fraction, interpolation, mean, std)
    kw = dict(substitute=False, grey=in_chans == 1)
    split = None  # the held-out split, when one is taken

    listing = None  # (files that passed the header check, files that failed it)

    def held(samples):
        keep, part = split_samples(len(samples), *held_out)
        if train_images is not None and len(keep) != train_images:
            raise DataError(f"{root}: {len(samples)} images now, but the run trained on "
                            f"{train_images} of them and held out the rest: with another number "
                            "the held-out part is another, mostly images the run trained on. "
                            "Evaluate on the run's data as it was, or on images it did not see "
                            "(a val/ folder, or val.csv)")  # fmt: skip
        return [samples[i] for i in part]

    if root.is_file() or (root / "val.csv").is_file():
        samples, classes = read_label_list(root if root.is_file() else root / "val.csv", classes)
        listing = (len(samples), samples.skipped)
        if held_out and root.is_file():  # a list given alone is split for training
            samples, split = held(samples), held_out
        dataset = FileDataset(samples, classes, transform, multilabel=True, **kw)
    elif (root / "train.csv").is_file():
        if not held_out:
            raise DataError(f"{root} has train.csv but no val.csv: pass --data "
                            f"{root / 'train.csv'} to evaluate on the training list, or add "
                            "val.csv")  # fmt: skip
        samples, classes = read_label_list(root / "train.csv", classes)
        listing = (len(samples), samples.skipped)
        samples, split = held(samples), held_out
        dataset = FileDataset(samples, classes, transform, multilabel=True, **kw)
    elif _is_split(root, "val"):
        samples, classes = scan_folder(root / "val", classes)
        listing = (len(samples), samples.skipped)
        dataset = FileDataset(samples, classes, transform, **kw)
    elif (train_split := _is_split(root, "train")) and not held_out:
        # 'train' is the training split, not a class (as `make_datasets` reads the folder).
        raise DataError(f"{root} has train/ but no val/: pass --data {root / 'train'} to "
                        "evaluate on the training images, or add val/")  # fmt: skip
    else:
        samples, classes = scan_folder(root / "train" if train_split else root,
                                       classes)  # fmt: skip
        listing = (len(samples), samples.skipped)
        if held_out:
            samples, split = held(samples), held_out
        dataset = FileDataset(samples, classes, transform, **kw)
    dataset.held_out, dataset.listing = split, listing
    return dataset
