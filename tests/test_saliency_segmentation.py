"""``saliency_segmentation``: GrabCut seeded by maps, against hand-made images and boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs import REGISTRY, LocalContext
from jobs.attribution.saliency_segmentation import SaliencySegmentation, box_iou, grabcut_mask
from tests.harness import gather, map_batches
from tests.test_backprop import ModuleNet, _randomise_bn


def square_image(size: int = 48, box: tuple[int, int, int, int] = (12, 16, 30, 36)) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.zeros((size, size, 3), np.uint8)
    image[...] = (30, 60, 200)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = (220, 40, 30)
    return np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)


def test_box_iou_by_hand():
    mask = np.zeros((4, 4), bool)
    mask[0:2, 0:2] = True  # 4 pixels
    assert box_iou(mask, [1, 0, 3, 2]) == pytest.approx(2 / 6)  # box x 1..2, y 0..1: 4 pixels, 2 shared
    assert box_iou(mask, [0, 0, 2, 2]) == 1.0
    assert np.isnan(box_iou(mask, [-1, -1, -1, -1]))


def test_grabcut_recovers_the_object_from_a_rough_map():
    box = (12, 16, 30, 36)
    image = square_image(box=box)
    heat = np.random.default_rng(1).random((48, 48)) * 0.3
    x0, y0, x1, y1 = box
    heat[y0:y1, x0:x1] += 0.2  # the object's edge is only a little above the background...
    heat[y0 + 3:y1 - 3, x0 + 3:x1 - 3] += 1.0  # ...the map picks out its middle
    mask, ran = grabcut_mask(image, heat)
    assert ran and box_iou(mask, box) > 0.9
    seeds = heat > np.quantile(heat, 0.95)
    assert box_iou(seeds, box) < 0.5  # GrabCut, not the seeds, found the object's extent
    again, _ = grabcut_mask(image, heat)
    assert np.array_equal(mask, again)  # seeded: the same mask every time


def test_a_flat_map_gives_no_mask():
    mask, ran = grabcut_mask(square_image(), np.zeros((48, 48)))
    assert not ran and not mask.any()


def test_float_rounding_at_a_threshold_does_not_move_a_seed():
    # Ties in exact arithmetic (an upsampled map's) that float rounding splits, at the
    # foreground quantile and at the median, as another batch size's rounding would.
    image = square_image(size=16)
    heat = np.random.default_rng(1).random((16, 16)) * 0.1  # distinct: the background quantile
    heat[2:14, 2:14] = 0.5  # 128 pixels: the median and the 0.9 quantile
    heat[6:10, 6:10] = 1.0  # 16 pixels: the foreground seeds
    nudged = heat.copy()
    nudged[heat == 0.5] += np.random.default_rng(0).normal(0, 1e-9, int((heat == 0.5).sum()))
    nudged[heat == 1.0] -= 1e-9 * np.arange(16)
    for min_seeds, grabcut in ((3, True), (300, False)):  # GrabCut runs; too few seeds: seeds alone
        mask, ran = grabcut_mask(image, heat, foreground=0.9, min_seeds=min_seeds)
        again, ran_again = grabcut_mask(image, nudged, foreground=0.9, min_seeds=min_seeds)
        assert ran == ran_again == grabcut and np.array_equal(mask, again)


def test_rows_aggregates_and_batch_independence():
    torch.manual_seed(0)
    model = _randomise_bn(ModuleNet()).eval()
    n = 5
    pixels = np.stack([square_image(size=16, box=(2 + i, 3, 10 + i, 12)) for i in range(n)])
    boxes = np.array([[2 + i, 3, 10 + i, 12] for i in range(n)])
    ids, labels = [f"i{i}" for i in range(n)], [0, 1, 0, 1, 2]
    entries = [REGISTRY["saliency"].Params.model_validate({"type": "saliency"}),
               REGISTRY["grad_cam"].Params.model_validate({"type": "grad_cam", "layer": "act2"})]
    params = SaliencySegmentation.Params.model_validate({"type": "saliency_segmentation", "min_seeds": 3})
    analysis = SaliencySegmentation(SaliencySegmentation(params).bind(entries))
    ctx = LocalContext(model=model, pixels=dict(zip(ids, pixels)), input_size=(16, 16))
    out = analysis.reduce(gather(map_batches(analysis, model, ids, pixels, labels, 2, boxes=boxes)), ctx)
    df = out.tables[""].to_pandas()
    rows = df[df.image_id.notna()]
    assert len(rows) == 2 * n and set(rows.method) == {"saliency", "grad_cam"}
    for r in rows.itertuples():
        h, w = int(r.height), int(r.width)
        mask = np.unpackbits(np.frombuffer(r.mask, np.uint8))[:h * w].reshape(h, w)
        assert r.iou == pytest.approx(box_iou(mask.astype(bool), boxes[ids.index(r.image_id)]), nan_ok=True)
        assert r.foreground == pytest.approx(mask.mean())
    agg = df[df.image_id.isna()]
    overall = agg[agg.label.isna()].set_index("method")
    for method in ("saliency", "grad_cam"):
        assert overall.loc[method, "iou"] == pytest.approx(rows[rows.method == method].iou.mean())
        assert overall.loc[method, "n"] == n
    assert set(agg[agg.method == "saliency"].label.dropna()) == {0, 1, 2}
    # One image at a time gives the same masks.
    one = SaliencySegmentation(analysis.params)
    alone = gather(map_batches(one, model, ids, pixels, labels, 1, boxes=boxes)).read("").to_pandas()
    merged = alone.sort_values(["method", "image_id"]).reset_index(drop=True)
    batched = rows.sort_values(["method", "image_id"]).reset_index(drop=True)
    assert list(merged["mask"]) == list(batched["mask"])
