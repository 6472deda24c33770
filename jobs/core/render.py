"""Pictures for eyes: grids, strips, scatter plots and atlases from uint8 arrays (no files).

Arrangements of pixels (grids, strips, atlases, overlays) are PIL; plots and colormaps are
matplotlib's (its object API and Agg canvas, no display), the one plotting stack.

Every figure here is drawn from arrays the analyses also store raw; a PNG is never the only
copy of a result. Small inputs (CIFAR's 32 px) are enlarged by whole-pixel repetition, so a
pixel stays a pixel.

>>> grid([np.zeros((8, 8, 3), np.uint8)] * 4, cols=2).size
(22, 22)
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
EMPTY = (200, 200, 200)

# Ten colours that stay distinct (matplotlib's tab10); more labels cycle through them.
PALETTE = [tuple(int(round(255 * c)) for c in matplotlib.colormaps["tab10"](i)[:3]) for i in range(10)]
# Magnitudes: inferno (perceptually uniform); signed maps: RdBu reversed, white at zero.
SEQUENTIAL = matplotlib.colormaps["inferno"]
DIVERGING = matplotlib.colormaps["RdBu_r"]


def plain_text(text: object) -> str:
    """Text matplotlib draws as it is: a ``$`` would start mathtext.

    >>> print(plain_text("$5 off"))
    \\$5 off
    """
    return str(text).replace("$", r"\$")


def _picture(fig: Figure) -> Image.Image:
    """A matplotlib figure drawn on an Agg canvas, as an RGB image."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def enlarge(pixels: np.ndarray, min_side: int) -> np.ndarray:
    """Repeat every pixel a whole number of times so the shorter side reaches ``min_side``."""
    h, w = pixels.shape[:2]
    factor = max(1, -(-min_side // max(1, min(h, w))))
    if factor == 1:
        return pixels
    return pixels.repeat(factor, axis=0).repeat(factor, axis=1)


def grid(tiles: Sequence[np.ndarray | None], cols: int, pad: int = 2, cell: tuple[int, int] | None = None,
         min_side: int = 0) -> Image.Image:
    """Tiles (uint8 (h, w, 3)) in rows of ``cols``, top-left aligned in equal cells.

    ``cell`` (h, w) fixes the cell size (default: the largest tile); a ``None`` tile is an
    empty grey cell. With ``min_side``, tiles are enlarged by pixel repetition first.
    """
    tiles = [None if t is None else enlarge(np.asarray(t, np.uint8), min_side) for t in tiles]
    present = [t for t in tiles if t is not None]
    if cell is None:
        cell = (max((t.shape[0] for t in present), default=1), max((t.shape[1] for t in present), default=1))
    ch, cw = cell
    rows = max(1, -(-len(tiles) // cols))
    cols = max(1, min(cols, len(tiles)))
    canvas = np.empty((pad + rows * (ch + pad), pad + cols * (cw + pad), 3), np.uint8)
    canvas[:] = BACKGROUND
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        if tile is None:
            canvas[y:y + ch, x:x + cw] = EMPTY
        else:
            h, w = min(ch, tile.shape[0]), min(cw, tile.shape[1])
            canvas[y:y + h, x:x + w] = tile[:h, :w]
    return Image.fromarray(canvas)


def strip(tiles: Sequence[np.ndarray | None], pad: int = 2, min_side: int = 0) -> Image.Image:
    """One row of tiles (a query and its neighbours); a ``None`` tile is an empty grey cell."""
    return grid(tiles, cols=len(tiles), pad=pad, min_side=min_side)


def _unit(xy: np.ndarray) -> np.ndarray:
    """Coordinates scaled into [0, 1] per axis (a constant axis maps to 0.5)."""
    xy = np.asarray(xy, np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (xy - lo) / span
    out[:, hi <= lo] = 0.5
    return out


def scatter(xy: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None, size: int = 640,
            dot: int = 2) -> Image.Image:
    """A scatter plot of 2-D points coloured by integer label (-1: unlabelled, grey), with a
    legend of up to 40 classes; ``size`` px square plot area, ``dot`` px radius."""
    labels = np.asarray(labels)
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    classes = sorted(int(c) for c in np.unique(labels) if c >= 0)
    dpi = 100
    fig = Figure(figsize=((size + (130 if classes else 0)) / dpi, size / dpi), dpi=dpi)
    ax = fig.add_axes((0.02, 0.02, size / (size + (130 if classes else 0)) - 0.04, 0.96))
    area = (dot * 72 / dpi * 2) ** 2  # marker size in points^2 for a dot of that radius
    unlabelled = labels < 0 if len(labels) else np.zeros(0, bool)
    if unlabelled.any():
        ax.scatter(xy[unlabelled, 0], xy[unlabelled, 1], s=area, color=np.array(EMPTY) / 255, linewidths=0)
    for c in classes:
        name = names[c] if names is not None and c < len(names) else str(c)
        ax.scatter(xy[labels == c, 0], xy[labels == c, 1], s=area, color=np.array(PALETTE[c % len(PALETTE)]) / 255,
                   linewidths=0, label=plain_text(str(name)[:18]) if c in classes[:40] else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if classes:
        fig.legend(loc="upper right", fontsize=7, frameon=False, markerscale=3)
    return _picture(fig)


def atlas_cells(xy: np.ndarray, cells: int) -> dict[tuple[int, int], int]:
    """Which point fills each cell of a ``cells`` x ``cells`` grid laid over the embedding.

    Each point falls in one cell; a cell shows its point nearest the cell's centre (ties: the
    lower index), so the atlas is a deterministic function of the coordinates. Rows count
    from the top (largest y).
    """
    if not len(xy):
        return {}
    u = _unit(xy) * cells
    col = np.minimum(u[:, 0].astype(int), cells - 1)
    row = np.minimum((cells - u[:, 1]).astype(int), cells - 1)
    centre = np.stack([col + 0.5, cells - row - 0.5], axis=1)
    dist = ((u - centre) ** 2).sum(axis=1)
    order = np.lexsort((np.arange(len(xy)), dist))  # nearest first, then lower index
    chosen: dict[tuple[int, int], int] = {}
    for i in order:
        chosen.setdefault((int(row[i]), int(col[i])), int(i))
    return chosen


def atlas(thumbs: dict[tuple[int, int], np.ndarray], cells: int, cell: int = 32) -> Image.Image:
    """Thumbnails placed in a ``cells`` x ``cells`` grid (empty cells left white)."""
    canvas = Image.new("RGB", (cells * cell, cells * cell), BACKGROUND)
    for (r, c), pixels in thumbs.items():
        thumb = Image.fromarray(np.asarray(pixels, np.uint8)).resize((cell, cell), Image.Resampling.BILINEAR)
        canvas.paste(thumb, (c * cell, r * cell))
    return canvas


def colormap(values: np.ndarray, signed: bool = False) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (..., 3): inferno, or RdBu (reversed) when ``signed`` (0.5 = white).

    >>> colormap(np.array([0.0, 1.0])).tolist()
    [[0, 0, 4], [252, 255, 164]]
    """
    cmap = DIVERGING if signed else SEQUENTIAL
    v = np.clip(np.nan_to_num(np.asarray(values, np.float64), nan=0.0), 0.0, 1.0)
    return (cmap(v)[..., :3] * 255 + 0.5).astype(np.uint8)


def overlay(pixels: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, signed: bool = False,
            min_side: int = 128, alpha: float = 0.55) -> Image.Image:
    """An image, the heat map blended over it, and a colour bar from ``vmin`` (bottom) to ``vmax``.

    ``heat`` (H, W) is in the image's frame; values are scaled by [vmin, vmax] (recorded next
    to the picture's key, so the colours can be read back as numbers).
    """
    pixels = np.asarray(pixels, np.uint8)
    span = vmax - vmin if vmax > vmin else 1.0
    colours = colormap((np.asarray(heat, np.float64) - vmin) / span, signed).astype(np.float64)
    blended = (pixels * (1 - alpha) + colours * alpha + 0.5).astype(np.uint8)
    left, right = enlarge(pixels, min_side), enlarge(blended, min_side)
    h = left.shape[0]
    bar = colormap(np.linspace(1.0, 0.0, h)[:, None].repeat(10, axis=1), signed)
    pad, text_w = 4, 56
    canvas = Image.new("RGB", (left.shape[1] + right.shape[1] + 10 + text_w + 4 * pad, h + 2 * pad), BACKGROUND)
    canvas.paste(Image.fromarray(left), (pad, pad))
    canvas.paste(Image.fromarray(right), (2 * pad + left.shape[1], pad))
    x = 3 * pad + left.shape[1] + right.shape[1]
    canvas.paste(Image.fromarray(bar), (x, pad))
    draw = ImageDraw.Draw(canvas)
    draw.text((x + 10 + pad, pad), f"{vmax:.3g}", fill=(0, 0, 0))
    draw.text((x + 10 + pad, pad + h - 11), f"{vmin:.3g}", fill=(0, 0, 0))
    return canvas


def line_panels(x: Sequence[float], panels: dict[str, np.ndarray], series: Sequence[str], xlabel: str,
                title: str = "", limits: dict[str, tuple[float, float]] | None = None,
                panel_size: tuple[float, float] = (3.2, 2.6)) -> Image.Image:
    """Line plots side by side: one panel per entry of ``panels`` ((series, len(x)) values),
    one thin line per series and their mean in black; ``limits`` fixes a panel's y range
    (matplotlib's object API, no display needed)."""
    fig = Figure(figsize=(panel_size[0] * len(panels), panel_size[1] + (0.4 if title else 0)), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, values) in zip(axes, panels.items()):
        values = np.asarray(values, np.float64)
        for i, row in enumerate(values):
            ax.plot(x, row, lw=1, alpha=0.8, color=np.array(PALETTE[i % len(PALETTE)]) / 255,
                    label=series[i] if i < len(series) else None)
        if len(values) > 1:
            ax.plot(x, np.nanmean(values, axis=0), lw=2.2, color="black", label="mean")
        if limits and name in limits:
            ax.set_ylim(*limits[name])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if len(series) <= 10:
        axes[-1].legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    FigureCanvasAgg(fig)  # tight_layout needs the figure's canvas
    fig.tight_layout()
    return _picture(fig)


def signed_pixels(values: np.ndarray) -> np.ndarray:
    """A signed picture (3, h, w) -- a projection, a perturbation -- as Zeiler & Fergus draw their
    projections: grey for 0, scaled by its own largest |value|; uint8 (h, w, 3).

    >>> signed_pixels(np.array([[[-2.0, 0.0, 1.0]]] * 3))[0].tolist()
    [[0, 0, 0], [128, 128, 128], [191, 191, 191]]
    """
    values = np.asarray(values, np.float32)
    top = float(np.abs(values).max()) if values.size else 0.0
    shown = 0.5 + 0.5 * values / top if top > 0 else np.full_like(values, 0.5)
    return np.ascontiguousarray((np.clip(shown, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8))


def side_by_side(images: Sequence, min_side: int = 0) -> Image.Image:
    """Images (3, H, W) float in [0, 1] (tensors or arrays) in one row, e.g. original | result."""
    tiles = [(np.clip(np.asarray(im, np.float32), 0, 1).transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
             for im in images]
    return strip(tiles, min_side=min_side)
