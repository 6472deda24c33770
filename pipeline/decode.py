"""Reading and decoding images: bytes -> PIL -> preprocessed uint8 (H, W, 3).

This module imports neither torch nor torchvision, so the CPU tasks that decode start in
a fraction of the time a model worker takes and are already feeding it when it is ready.
Resize and center crop follow torchvision's conventions exactly (shorter side to ``resize``,
``int()`` for the longer; crop offsets rounded; zero padding when the crop is larger),
computed with PIL's antialiased bilinear filter as torchvision does for PIL images.
Normalisation happens on the model's device (see ``normalize``).
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict

import numpy as np
from PIL import Image

# Refuse images over this many pixels before decoding them (decompression bombs).
MAX_PIXELS = 89_478_485  # PIL's own warning threshold

Size = int | list[int] | tuple[int, int] | None


def output_size(resize: Size, crop: Size) -> tuple[int, int] | None:
    """(H, W) every preprocessed image has, when the settings fix it."""
    for v in (crop, resize if isinstance(resize, (list, tuple)) else None):
        if v is not None:
            return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
    return None


def read_bytes(
    refs: list[str], sources: list[str], offsets: list[int], sizes: list[int], parquet_column: str | None = "image"
) -> list[bytes | Exception]:
    """The encoded bytes of each image (or the exception that stopped reading it).

    ``parquet_column``: the column holding the images of ``parquet`` rows; None where there are
    none (a Parquet dataset that lists file paths has no image column)."""
    out: list[bytes | Exception] = [b""] * len(refs)
    by_parquet: dict[str, list[int]] = defaultdict(list)
    for i, (ref, src, off, size) in enumerate(zip(refs, sources, offsets, sizes)):
        try:
            if ref == "file":
                with open(src, "rb") as f:
                    out[i] = f.read()
            elif ref == "tar":
                with open(src, "rb") as f:
                    f.seek(off)
                    data = f.read(size)
                if len(data) != size:
                    raise OSError(f"truncated tar member: {len(data)} of {size} bytes in {src}")
                out[i] = data
            elif ref == "parquet":
                by_parquet[src].append(i)
            else:
                raise ValueError(f"unknown ref {ref!r}")
        except Exception as e:  # noqa: BLE001 -- recorded per image
            out[i] = e
    for src, idx in by_parquet.items():
        try:
            if parquet_column is None:
                raise ValueError(f"{src}: rows of a Parquet file, but no image column to read them from")
            _read_parquet_rows(src, parquet_column, idx, offsets, out)
        except Exception as e:  # noqa: BLE001
            for i in idx:
                out[i] = e
    return out


def _read_parquet_rows(src: str, column: str, idx: list[int], offsets: list[int], out: list) -> None:
    """Fill ``out[i]`` with the image bytes at row ``offsets[i]`` of ``src``, row group by row group."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    wanted: dict[int, list[int]] = defaultdict(list)
    for i in idx:
        wanted[int(np.searchsorted(starts, offsets[i], side="right") - 1)].append(i)
    for group, items in wanted.items():
        values = pf.read_row_group(group, columns=[column]).column(0)
        for i in items:
            v = values[offsets[i] - int(starts[group])].as_py()
            if isinstance(v, dict):  # {"bytes": ..., "path": ...}, the Hugging Face image struct
                v = v.get("bytes")
            if not isinstance(v, (bytes, bytearray)):
                raise ValueError(f"row {offsets[i]} of {src}: column {column!r} holds {type(v).__name__}, "
                                 "not image bytes")
            out[i] = bytes(v)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit greys are scaled, not clipped; alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _resize(img: Image.Image, size: int | list[int] | tuple[int, int]) -> Image.Image:
    w, h = img.size
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        if short == size:
            return img
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = int(size[0]), int(size[1])
        if (new_h, new_w) == (h, w):
            return img
    return img.resize((new_w, new_h), Image.Resampling.BILINEAR)


def _center_crop(img: Image.Image, size: int | list[int] | tuple[int, int]) -> Image.Image:
    ch, cw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    w, h = img.size
    if (w, h) == (cw, ch):
        return img
    if cw > w or ch > h:  # zero-pad to at least the crop, centred, as torchvision does
        left, top = (cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0
        canvas = Image.new(img.mode, (max(w, cw), max(h, ch)))
        canvas.paste(img, (left, top))
        img, (w, h) = canvas, canvas.size
        if (w, h) == (cw, ch):
            return img
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def resized_size(w: int, h: int, size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """(width, height) after ``_resize``."""
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        if short == size:
            return w, h
        new_short, new_long = size, int(size * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    return int(size[1]), int(size[0])


def crop_offset(w: int, h: int, size: int | list[int] | tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of ``_center_crop`` in the (padded) frame; padding
    shows as a negative offset."""
    ch, cw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    pad_left, pad_top = ((cw - w) // 2 if cw > w else 0), ((ch - h) // 2 if ch > h else 0)
    w, h = max(w, cw), max(h, ch)
    return int(round((w - cw) / 2.0)) - pad_left, int(round((h - ch) / 2.0)) - pad_top, cw, ch


def transform_box(box, size: tuple[int, int], resize: Size, crop: Size) -> list[int]:
    """A box ``[x0, y0, x1, y1]`` (half-open pixels of the original ``size`` = (w, h)) in the
    preprocessed frame: scaled as the image is resized, shifted by the crop, clipped.

    Edges round outwards, so the box still covers the object. ``[-1] * 4`` when no box is
    given or nothing of it is left after the crop.

    >>> transform_box([10, 20, 30, 40], (100, 100), resize=50, crop=None)
    [5, 10, 15, 20]
    """
    if box is None or len(box) != 4 or min(box) < 0:
        return [-1] * 4
    w, h = size
    x0, y0, x1, y1 = (float(v) for v in box)
    if resize is not None:
        nw, nh = resized_size(w, h, resize)
        sx, sy = nw / w, nh / h
        x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        w, h = nw, nh
    if crop is not None:
        left, top, w, h = crop_offset(w, h, crop)
        x0, x1, y0, y1 = x0 - left, x1 - left, y0 - top, y1 - top
    out = [max(0, int(np.floor(x0 + 1e-9))), max(0, int(np.floor(y0 + 1e-9))),
           min(w, int(np.ceil(x1 - 1e-9))), min(h, int(np.ceil(y1 - 1e-9)))]
    return out if out[2] > out[0] and out[3] > out[1] else [-1] * 4


def decode_image(data: bytes, resize: Size = None, crop: Size = None) -> np.ndarray:
    """Encoded bytes -> preprocessed uint8 (H, W, 3): RGB, resize, center crop.

    >>> import io
    >>> buf = io.BytesIO()
    >>> Image.new("RGB", (320, 240)).save(buf, format="PNG")
    >>> decode_image(buf.getvalue(), resize=256, crop=224).shape
    (224, 224, 3)
    """
    return _decode(data, resize, crop)[0]


def _open(data: bytes) -> Image.Image:
    """The image, its header read (not yet decoded); refused when empty or too large."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img: Image.Image = Image.open(io.BytesIO(data))  # an ImageFile; converted copies are plain Images
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"image is {img.width}x{img.height}, over the {MAX_PIXELS:,}-pixel safety limit")
    return img


def _decode(data: bytes, resize: Size, crop: Size) -> tuple[np.ndarray, tuple[int, int]]:
    """Preprocessed pixels and the original (width, height)."""
    img = _open(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img.load()
    original = img.size
    img = _to_rgb(img)
    if resize is not None:
        img = _resize(img, resize)
    if crop is not None:
        img = _center_crop(img, crop)
    arr = np.asarray(img, dtype=np.uint8)
    expected = output_size(resize, crop)
    if expected is not None and arr.shape[:2] != expected:
        raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]} after preprocessing, expected "
                         f"{expected[1]}x{expected[0]}")
    return arr, original


# JPEG modes a device decoder turns into the RGB that PIL's conversion gives (CMYK and the
# like are left to PIL, whose colour conversion differs).
DEVICE_JPEG_MODES = ("RGB", "L")


def defer_jpeg(data: bytes, resize: Size, crop: Size) -> tuple[np.ndarray | None, tuple[int, int]]:
    """For decoding on the model's device: ``(None, original size)`` for a JPEG a device decoder
    takes (only its header is read here), otherwise ``(pixels, original size)`` decoded here."""
    img = _open(data)
    if img.format == "JPEG" and img.mode in DEVICE_JPEG_MODES:
        return None, img.size
    return _decode(data, resize, crop)


def decode_batch(batch: dict[str, np.ndarray], resize: Size, crop: Size,
                 parquet_column: str | None = "image", device_jpeg: bool = False) -> dict[str, np.ndarray]:
    """Read and decode a batch of index rows into uint8 pixels; failures become error rows.

    A ``box`` column (object boxes in original pixels) comes back in the preprocessed frame,
    as (N, 4) int64 with -1 rows where there is none. ``device_jpeg`` (``execution.decode: gpu``):
    JPEGs are left encoded, their bytes in an ``encoded`` column (``b""`` for every other row),
    for the model actor to decode on its device; other images are decoded here as always.
    """
    h, w = output_size(resize, crop) or (0, 0)
    has_boxes = "box" in batch
    boxes = np.full((len(batch["image_id"]), 4), -1, dtype=np.int64)
    n = len(batch["image_id"])
    data = read_bytes(list(batch["ref"]), list(batch["source"]), [int(o) for o in batch["offset"]],
                      [int(s) for s in batch["size"]], parquet_column)
    pixels = np.zeros((n, h, w, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    stages = np.full(n, "", dtype=object)
    encoded = np.full(n, b"", dtype=object)
    for i, item in enumerate(data):
        if isinstance(item, Exception):
            errors[i], stages[i] = f"{type(item).__name__}: {item}", "read"
            continue
        try:
            if device_jpeg:
                decoded, original = defer_jpeg(item, resize, crop)
                if decoded is None:
                    encoded[i] = item
                else:
                    pixels[i] = decoded
            else:
                pixels[i], original = _decode(item, resize, crop)
            if has_boxes:
                boxes[i] = transform_box(batch["box"][i], original, resize, crop)
        except Exception as e:  # noqa: BLE001 -- any undecodable image is recorded and skipped
            errors[i], stages[i] = f"{type(e).__name__}: {e}", "decode"
    out = {
        "image_id": np.asarray(batch["image_id"], dtype=object),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "pixels": pixels,
        "error": errors,
        "error_stage": stages,
    }
    if has_boxes:
        out["box"] = boxes
    if device_jpeg:
        out["encoded"] = encoded
    if "row" in batch:  # the dataset row of each image, carried through to the model actors
        out["row"] = np.asarray(batch["row"], dtype=np.int64)
    return out
