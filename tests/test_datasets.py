"""Datasets: each kind lists the same images with stable ids; decoding and its errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, UnidentifiedImageError

from pipeline.datasets import list_dataset
from pipeline.decode import decode_image, read_bytes
from pipeline.demo import CLASSES, ensure_shapes, render
from pipeline.errors import UserError
from pipeline.manifest import (
    ImageFolderDataset,
    ListDataset,
    ParquetDataset,
    Preprocess,
    ShapesDataset,
    WebDatasetDataset,
)

from .conftest import make_images

PRE = Preprocess(resize=32, crop=32)


def decoded(index) -> dict[str, np.ndarray]:
    t = index.table
    data = read_bytes(t.column("ref").to_pylist(), t.column("source").to_pylist(),
                      t.column("offset").to_pylist(), t.column("size").to_pylist())
    return {i: decode_image(d, PRE.resize, PRE.crop) for i, d in zip(t.column("image_id").to_pylist(), data)}


@pytest.fixture
def folder(tmp_path) -> Path:
    make_images(tmp_path / "f", classes=2, per_class=3)
    return tmp_path / "f"


def test_image_folder(folder):
    index = list_dataset(ImageFolderDataset(kind="image_folder", root=folder))
    assert index.table.column("image_id").to_pylist() == [
        "class0/000.png", "class0/001.png", "class0/002.png", "class1/000.png", "class1/001.png", "class1/002.png"]
    assert index.table.column("label").to_pylist() == [0, 0, 0, 1, 1, 1]
    assert index.label_names == ["class0", "class1"]
    pixels = decoded(index)
    assert np.array_equal(pixels["class1/002.png"], np.asarray(Image.open(folder / "class1/002.png").convert("RGB")))


def test_sample_and_limit_are_seeded(folder):
    spec = dict(kind="image_folder", root=folder)
    a = list_dataset(ImageFolderDataset(**spec, sample={"n": 4, "seed": 3})).table.column("image_id").to_pylist()
    b = list_dataset(ImageFolderDataset(**spec, sample={"n": 4, "seed": 3})).table.column("image_id").to_pylist()
    c = list_dataset(ImageFolderDataset(**spec, sample={"n": 4, "seed": 4})).table.column("image_id").to_pylist()
    assert a == b and len(a) == 4 and a == sorted(a)
    assert a != c
    limited = list_dataset(ImageFolderDataset(**spec, limit=2)).table.column("image_id").to_pylist()
    assert limited == ["class0/000.png", "class0/001.png"]


def test_fingerprint_tracks_selection(folder):
    full = list_dataset(ImageFolderDataset(kind="image_folder", root=folder))
    again = list_dataset(ImageFolderDataset(kind="image_folder", root=folder))
    part = list_dataset(ImageFolderDataset(kind="image_folder", root=folder, limit=3))
    assert full.fingerprint == again.fingerprint != part.fingerprint


def test_list_text_and_csv(folder, tmp_path):
    (tmp_path / "list.txt").write_text("f/class0/001.png\n# a comment\n\nf/class1/000.png\n")
    index = list_dataset(ListDataset(kind="list", path=tmp_path / "list.txt"))
    assert index.table.column("image_id").to_pylist() == ["f/class0/001.png", "f/class1/000.png"]
    assert index.table.column("label").to_pylist() == [-1, -1]
    (tmp_path / "list.csv").write_text("path,label,image_id\nf/class0/001.png,0,a\nf/class1/000.png,1,b\n")
    index = list_dataset(ListDataset(kind="list", path=tmp_path / "list.csv"))
    assert index.table.column("image_id").to_pylist() == ["a", "b"]
    assert index.table.column("label").to_pylist() == [0, 1]
    assert np.array_equal(decoded(index)["b"], np.asarray(Image.open(folder / "class1/000.png")))


def test_parquet_bytes_and_paths(folder, tmp_path):
    files = sorted(folder.rglob("*.png"))
    ids = [f"img-{i}" for i in range(len(files))]
    pq.write_table(pa.table({"id": ids, "y": [i % 2 for i in range(len(files))],
                             "image": [f.read_bytes() for f in files]}), tmp_path / "b.parquet", row_group_size=2)
    index = list_dataset(ParquetDataset(kind="parquet", path=tmp_path / "b.parquet", id_column="id", label_column="y"))
    assert index.table.column("image_id").to_pylist() == ids
    pixels = decoded(index)
    for i, f in zip(ids, files):
        assert np.array_equal(pixels[i], np.asarray(Image.open(f).convert("RGB")))
    # Hugging Face style struct column, no id column: ids are "<file>#<row>".
    pq.write_table(pa.table({"img": [{"bytes": f.read_bytes(), "path": f.name} for f in files]}),
                   tmp_path / "h.parquet")
    index = list_dataset(ParquetDataset(kind="parquet", path=tmp_path / "h.parquet", image_column="img"))
    assert index.table.column("image_id").to_pylist()[:2] == ["h.parquet#0", "h.parquet#1"]
    t = index.table
    data = read_bytes(t.column("ref").to_pylist(), t.column("source").to_pylist(), t.column("offset").to_pylist(),
                      t.column("size").to_pylist(), parquet_column="img")
    assert data[3] == files[3].read_bytes()
    # Paths, relative to the Parquet file's folder.
    pq.write_table(pa.table({"p": [str(f.relative_to(tmp_path)) for f in files]}), tmp_path / "p.parquet")
    index = list_dataset(ParquetDataset(kind="parquet", path=tmp_path / "p.parquet", path_column="p"))
    assert np.array_equal(decoded(index)["p.parquet#5"], np.asarray(Image.open(files[5])))


def test_parquet_missing_column_is_named(tmp_path):
    pq.write_table(pa.table({"image": [b""]}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match="dataset.label_column: column 'cls'"):
        list_dataset(ParquetDataset(kind="parquet", path=tmp_path / "x.parquet", label_column="cls"))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset(folder, tmp_path):
    files = sorted(folder.rglob("*.png"))
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "s0.tar", [m for i, f in enumerate(files[:3])
                                              for m in [(f"k{i}.png", f.read_bytes()), (f"k{i}.cls", b"%d" % (i % 2))]])
    write_tar(tmp_path / "shards" / "s1.tar", [(f"k{i}.jpg", f.read_bytes()) for i, f in enumerate(files[3:], 3)])
    index = list_dataset(WebDatasetDataset(kind="webdataset", path=tmp_path / "shards"))
    assert index.table.column("image_id").to_pylist() == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert index.table.column("label").to_pylist() == [0, 1, 0, -1, -1, -1]
    pixels = decoded(index)
    for i, f in enumerate(files):
        assert np.array_equal(pixels[f"k{i}"], np.asarray(Image.open(f).convert("RGB")))


def test_webdataset_truncated_member_is_a_read_error(folder, tmp_path):
    files = sorted(folder.rglob("*.png"))
    write_tar(tmp_path / "s.tar", [(f"k{i}.png", f.read_bytes()) for i, f in enumerate(files)])
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: len(data) // 2])
    index = list_dataset(WebDatasetDataset(kind="webdataset", path=tmp_path / "s.tar"))
    t = index.table
    out = read_bytes(t.column("ref").to_pylist(), t.column("source").to_pylist(),
                     t.column("offset").to_pylist(), t.column("size").to_pylist())
    assert any(isinstance(o, Exception) and "truncated" in str(o) for o in out) or index.errors


def test_decode_converts_modes_and_sizes():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)

    def enc(img: Image.Image, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt)
        return buf.getvalue()

    # Shorter side to 32, then a 32x32 center crop.
    out = decode_image(enc(Image.fromarray(rgb)), 32, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert decode_image(enc(Image.fromarray(rgb[:, :, 0])), 32, 32).shape == (32, 32, 3)  # grayscale
    assert decode_image(enc(Image.fromarray(rgb).convert("P")), 32, 32).shape == (32, 32, 3)  # palette
    g16 = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))
    out16 = decode_image(enc(g16), 32, 32)
    assert abs(int(out16[-1, -1, 0]) - round(61380 / 65535 * 255)) <= 1  # scaled, not clipped at 255
    with pytest.raises(ValueError, match="empty file"):
        decode_image(b"", 32, 32)
    with pytest.raises(UnidentifiedImageError):
        decode_image(b"not an image at all", 32, 32)
    assert decode_image(enc(Image.fromarray(rgb[:1, :1])), 32, 32).shape == (32, 32, 3)  # 1x1 is upscaled
    assert decode_image(enc(Image.fromarray(rgb)), resize=[20, 30]).shape == (20, 30, 3)


def test_shapes_dataset_is_deterministic(tmp_path):
    root = ensure_shapes(tmp_path / "s", n=12, size=32, seed=5)
    index = list_dataset(ShapesDataset(kind="shapes", root=root, n=12, size=32, seed=5))
    assert index.label_names == CLASSES
    assert len(index) == 12
    boxes = dict(zip(index.extra.column("image_id").to_pylist(), index.extra.column("box").to_pylist()))
    for i in range(12):
        arr, label, box = render(i, 5, 32)
        image_id = f"{CLASSES[label]}/{i:05d}.png"
        assert boxes[image_id] == box
        assert np.array_equal(np.asarray(Image.open(root / image_id)), arr)
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    first = (root / "_SUCCESS").stat().st_mtime_ns
    ensure_shapes(root, n=12, size=32, seed=5)  # cached: not rewritten
    assert (root / "_SUCCESS").stat().st_mtime_ns == first


@pytest.mark.parametrize("hw,resize,crop", [((40, 50), 32, 32), ((50, 40), 256, 224), ((300, 200), 256, 224),
                                            ((20, 30), 32, 32), ((33, 31), [24, 28], None), ((7, 9), None, 16)])
def test_resize_and_crop_match_torchvision(hw, resize, crop):
    from torchvision import transforms as T

    rgb = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    steps = ([T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True)] if resize else []) + (
        [T.CenterCrop(crop)] if crop else [])
    want = np.asarray(T.Compose(steps)(Image.fromarray(rgb)))
    assert np.array_equal(decode_image(buf.getvalue(), resize, crop), want)
