"""``execution.decode: gpu``: JPEGs decoded and preprocessed on the model's device.

The decode tasks pass JPEG bytes through (:func:`pipeline.decode.decode_batch` with
``device_jpeg``); the model actor decodes them here with ``torchvision.io.decode_jpeg`` (nvJPEG
on a GPU, libjpeg-turbo on the CPU) and resizes and crops them as :mod:`pipeline.decode` does:
the same output sizes and crop offsets, zero padding included. Resizing is torchvision's
antialiased bilinear on uint8 tensors rather than PIL's, so pixels may differ from the CPU path
by interpolation rounding (a level or two of 255; more where nvJPEG's IDCT differs from
libjpeg-turbo's). A JPEG the device decoder refuses is decoded with PIL, as on the CPU path; one
PIL refuses too is an error row, with the message the CPU path gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.decode import Size, crop_offset, decode_image, output_size, resized_size


def preprocess_on_device(image: torch.Tensor, resize: Size, crop: Size) -> torch.Tensor:
    """uint8 (3, H, W) -> preprocessed uint8 (H', W', 3) on the same device: resize, center crop."""
    from torchvision.transforms.v2 import functional as F

    h, w = image.shape[-2:]
    if resize is not None:
        new_w, new_h = resized_size(w, h, resize)
        if (new_w, new_h) != (w, h):
            image = F.resize(image, [new_h, new_w], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
            h, w = new_h, new_w
    if crop is not None:
        left, top, cw, ch = crop_offset(w, h, crop)
        if (left, top, cw, ch) != (0, 0, w, h):
            # Zero padding where the crop reaches past the image (a negative offset), as PIL's path pads.
            out = image.new_zeros((image.shape[0], ch, cw))
            y0, x0 = max(0, top), max(0, left)
            y1, x1 = min(h, top + ch), min(w, left + cw)
            out[:, y0 - top:y1 - top, x0 - left:x1 - left] = image[:, y0:y1, x0:x1]
            image = out
    return image.permute(1, 2, 0)


def decode_on_device(data: Sequence[bytes], resize: Size, crop: Size, device: torch.device | str
                     ) -> list[torch.Tensor | Exception]:
    """Each JPEG of ``data`` as preprocessed uint8 (H, W, 3) pixels on ``device``, or the exception
    that stopped it (the device decoder and PIL both refused it, or it has the wrong size)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec's, with a warning per call.
    warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    decoded: list[torch.Tensor | None]
    try:  # one batched call (nvJPEG decodes a list at once); one bad image fails it all
        decoded = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)) if tensors else []
    except Exception:  # noqa: BLE001 -- then image by image, to find which
        decoded = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001 -- PIL tries it below
                decoded.append(None)
    expected = output_size(resize, crop)
    out: list[torch.Tensor | Exception] = []
    for raw, image in zip(data, decoded):
        try:
            if image is None:  # PIL, exactly as the CPU path: its pixels, or its error
                pixels = torch.from_numpy(np.ascontiguousarray(decode_image(raw, resize, crop))).to(device)
            else:
                pixels = preprocess_on_device(image, resize, crop)
            if expected is not None and tuple(pixels.shape[:2]) != expected:
                raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]} after preprocessing, expected "
                                 f"{expected[1]}x{expected[0]}")
            out.append(pixels)
        except Exception as e:  # noqa: BLE001 -- recorded per image
            out.append(e)
    return out
