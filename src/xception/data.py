"""Data: image loading that survives real-world files, transform presets, and datasets.

Knows no model. Transform presets are named so that weights can carry the one they were trained
with (see `weights.py`), and so training and evaluation can never silently disagree.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

__all__ = [
    "ImageError",
    "eval_transform",
    "keras_transform",
    "load_image",
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
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: refused, possible decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{path}: not a readable image ({err})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bits by the range the format allows.
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
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


def eval_transform(
    size: int = 299,
    crop_fraction: float = 1.0,
    interpolation: str = "bilinear",
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
) -> T.Compose:
    """Resize the shorter side to size / crop_fraction, centre-crop size, normalise.

    crop_fraction=1.0 with a square resize is Keras' preprocessing; timm's legacy_xception uses
    crop_fraction=0.8975 with bicubic interpolation."""
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation={interpolation!r}: use one of {sorted(_INTERPOLATION)}")
    if crop_fraction >= 1.0:
        resize = T.Resize((size, size), interpolation=_INTERPOLATION[interpolation], antialias=True)
        steps = [resize]
    else:
        resize_to = int(size / crop_fraction)
        steps = [
            T.Resize(resize_to, interpolation=_INTERPOLATION[interpolation], antialias=True),
            T.CenterCrop(size),
        ]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def to_batch(images: list[Image.Image], transform) -> torch.Tensor:
    return torch.stack([transform(im) for im in images])
