"""Finding and decoding input images safely: any size, grayscale, RGBA, palette and 16-bit, size-limited.

``decode_image`` keeps 8-bit images as decoded, uint8 RGB [H, W, 3] (a quarter of float32's bytes, and what the
uint8 backends take); ``load_image`` gives every image as float32 RGB in [0, 1], [3, H, W] - anomalib's input
convention - through ``as_float``, the one uint8-to-float conversion (the backends' own for uint8 input too).
8-bit images (and a GIF's first frame) decode exactly as anomalib's ``read_image`` does. 16-bit images are
scaled by their full range (0..65535); float images are taken as [0, 1], [0, 255] or [0, 65535], whichever range
holds their values. anomalib's ``read_image`` instead clips 16-bit and float images through PIL's RGB
conversion, so a model trained by anomalib's own loaders on such data saw clipped inputs. A file that cannot be
read raises ImageError with the reason, so callers can report it and go on with the other files.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import stat
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from patchcore_trt.artifact import MIN_SIDE
from patchcore_trt.errors import UserError
from patchcore_trt.files import display_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
ALLOWED_FORMATS = {"PNG", "JPEG", "BMP", "TIFF", "WEBP", "MPO", "GIF"}
# Checked from the header before any pixel is decoded: a 100 kB PNG can claim 100,000 x 100,000 pixels.
MAX_PIXELS = 64 * 1024 * 1024
FLOAT_RANGES = (1.0, 255.0, 65535.0)


class ImageError(Exception):
    """One input image could not be used (the message says why)."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))  # fmt: skip


def _check_regular(path: Path) -> None:
    """A FIFO or device given as an image is refused from its mode alone: opening a FIFO to read it blocks until a
    writer comes, and /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except OSError as exc:
        raise ImageError(f"cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ImageError("is a folder")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise ImageError(f"not a regular file ({kind})")


def natural_key(path: Path) -> list[object]:
    """Sort key that orders numbers by value: ``img_2`` before ``img_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


def _pattern_root(item: str) -> tuple[Path, str]:
    """Split a glob pattern into the folder before its first wildcard and the pattern below it."""
    parts = Path(item).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return Path(*parts[:fixed]) if fixed else Path("."), str(Path(*parts[fixed:]))


def expand(item: str) -> tuple[Path, list[Path]]:
    """One input (a file, a folder searched recursively, or a glob pattern) -> its root and image files.

    Patterns are matched by pathlib, which does not follow symbolic links into folders (glob's ``**`` does, and a
    link cycle makes it run forever).
    """
    path = Path(item)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        return path, sorted(files, key=natural_key)
    if path.exists():  # a file, or a FIFO or device: decode_image answers the latter with a row saying what it is
        return path.parent, [path]
    if glob.has_magic(item):
        root, pattern = _pattern_root(item)
        return root, sorted((p for p in root.glob(pattern) if p.is_file()), key=natural_key)
    return path, []


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders (recursively) and glob patterns into image paths.

    Returns:
        The image files in a stable, natural order (duplicates once), and the inputs that matched nothing.
    """
    found: list[Path] = []
    unmatched: list[str] = []
    for item in inputs:
        files = expand(item)[1]
        if files:
            found.extend(files)
        else:
            unmatched.append(item)
    seen: set[Path] = set()
    unique = [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]
    return unique, unmatched


def short_names(paths: list[Path], inputs: list[str]) -> dict[Path, str]:
    """How to show each path: relative to the folder or pattern root it was found under, else as given."""
    roots = [expand(item)[0] for item in inputs if Path(item).is_dir() or not Path(item).exists()]
    names = {}
    for path in paths:
        root = next((root for root in roots if path.is_relative_to(root) and root != Path(".")), None)
        names[path] = display_name(path.relative_to(root) if root is not None else path)
    return names


def uint8_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] -> float32 [..., 3, H, W] in [0, 1]: anomalib's ``read_image`` arithmetic (float32
    divided by 255), so a batch converted here equals the same files decoded by ``load_image`` bit for bit."""
    return np.ascontiguousarray(np.moveaxis(images, -1, -3)).astype(np.float32) / np.float32(255.0)


def as_float(image: np.ndarray) -> np.ndarray:
    """One decoded image (``decode_image``'s uint8 [H, W, 3] or float32 [3, H, W]) as float32 [3, H, W]."""
    return uint8_to_float(image) if image.dtype == np.uint8 else image


def _decoded_pixels(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] for 8-bit images; float32 [3, H, W] in [0, 1] for 16-bit and float ones."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return _gray_to_rgb(gray)
    if image.mode == "I":
        # 16-bit PNGs often decode as 32-bit "I"; their values span 0..65535 (a fixed scale, never the content's).
        gray = np.asarray(image, dtype=np.float32)
        return _gray_to_rgb(np.clip(gray / 65535.0, 0, 1))
    if image.mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        low, high = float(gray.min()), float(gray.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ImageError("the image holds NaN or infinite pixel values")
        scale = next((limit for limit in FLOAT_RANGES if high <= limit), None)
        if low < 0 or scale is None:
            raise ImageError(f"float pixel values span {low:g}..{high:g}; expected [0, 1], [0, 255] or [0, 65535]")
        return _gray_to_rgb(gray / np.float32(scale))
    # Palette, grayscale, CMYK and alpha all go through PIL's RGB conversion, as anomalib's read_image does.
    return np.asarray(image.convert("RGB"))


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[None], 3, axis=0), dtype=np.float32)


def decode_image(path: Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image file to uint8 RGB [H, W, 3] (8-bit images) or float32 RGB [3, H, W] in [0, 1] (16-bit and
    float ones), or raise ImageError saying why not. The header is checked before any pixel is decoded."""
    path = Path(path)
    _check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in ALLOWED_FORMATS:
                    raise ImageError(f"unsupported image format {image.format}")
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"{width}x{height} pixels is over the limit of {max_pixels:,} (decompression bomb?)"
                    )
                if min(width, height) < MIN_SIDE:
                    raise ImageError(f"{width}x{height} is too small; both sides must be at least {MIN_SIDE} pixels")
                image.load()
                return _decoded_pixels(image)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a folder") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (or an unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image ({exc})") from None


def load_image(path: Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image file to float32 RGB [3, H, W] in [0, 1], or raise ImageError saying why not."""
    return as_float(decode_image(path, max_pixels=max_pixels))


def default_workers() -> int:
    """Decoding threads by default: one per core, up to 8 (Pillow's decoders release the GIL)."""
    return max(1, min(8, os.cpu_count() or 1))


def decode_files(paths: list[Path], workers: int) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """(index, decoded image or None, why not) for every path in input order, decoded ``workers`` at a time.

    At most ``2 * workers`` decodes run ahead of the consumer, so memory stays flat over any number of files.
    """
    if workers <= 1:
        for index, path in enumerate(paths):
            try:
                yield index, decode_image(path), None
            except ImageError as exc:
                yield index, None, str(exc)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    pending: deque[tuple[int, Future[np.ndarray]]] = deque()
    queued = iter(enumerate(paths))
    try:
        for index, path in itertools.islice(queued, 2 * workers):
            pending.append((index, pool.submit(decode_image, path)))
        while pending:
            index, future = pending.popleft()
            for following, path in itertools.islice(queued, 1):
                pending.append((following, pool.submit(decode_image, path)))
            try:
                yield index, future.result(), None
            except ImageError as exc:
                yield index, None, str(exc)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: the decodes under way finish, the rest never start


def load_batch(paths: list[Path]) -> np.ndarray:
    """Decode same-sized images into one [N, 3, H, W] batch (for calibration and evaluation sets)."""
    arrays = []
    for path in paths:
        try:
            arrays.append(load_image(path))
        except ImageError as exc:
            raise UserError(f"{path}: {exc}") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images of different sizes cannot form one batch: {sorted(shapes)}")
    return np.stack(arrays)
