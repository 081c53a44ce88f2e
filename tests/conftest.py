"""Shared fixtures: real files in tmp_path, the LaTeX_OCR hub fixture, small recipe writers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LATEX_OCR_HUB = SHARED / "fixtures" / "hub" / "linxy--LaTeX_OCR"
LLAMAFACTORY_INFO = SHARED / "fixtures" / "llamafactory" / "dataset_info.json"


def jpeg_bytes(size=(32, 24), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def png_bytes(size=(20, 20), color=(0, 120, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar archive holding ``members`` (name -> bytes), made in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def read_jsonl_dir(path: Path) -> list[dict]:
    """All records of a jsonl shard folder (sorted parts) or a JSON array file."""
    if path.is_dir():
        return [json.loads(line) for part in sorted(path.glob("*.jsonl")) for line in part.read_text().splitlines()]
    return json.loads(path.read_text())


@pytest.fixture
def latex_hub() -> Path:
    if not LATEX_OCR_HUB.is_dir():
        pytest.skip("shared LaTeX_OCR fixture not present")
    return LATEX_OCR_HUB


@pytest.fixture
def csv_dataset(tmp_path: Path) -> Path:
    """The LaTeX OCR tutorial's CSV layout: 4 good rows, one missing image, one corrupt image."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rows = ["image_path,text"]
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(color=(i * 40, 10, 10)))
        rows.append(f"images/{i}.jpg,\\frac {{ {i} }} {{ 2 }}")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage that is not a jpeg")
    rows.append("images/corrupt.jpg,x^2")
    rows.append("images/missing.jpg,y^2")
    (tmp_path / "data" / "latex_ocr_train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return tmp_path / "data"
