"""Write "your own" dataset: formula images drawn with Pillow and a CSV ``image_path,text`` that lists them.

Usage: ``python make_data.py DIR`` writes ``DIR/images/000.png`` ... and ``DIR/train.csv``: 12 good rows, then one
row whose image file does not exist (as in real CSVs), which the build rejects and lists in ``rejects.jsonl``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw

FORMULAS = [
    r"E = m c^{2}", r"a^{2} + b^{2} = c^{2}", r"\frac{a}{b} + \frac{c}{d}", r"\sqrt{x + 1}",
    r"\sum_{i=1}^{n} i", r"\int_{0}^{1} x^{2} d x", r"\alpha + \beta = \gamma", r"x_{1} + x_{2}",
    r"\lim_{n \to \infty} \frac{1}{n}", r"f ( x ) = \sin x", r"\mathbf{E} \cdot \mathbf{B}", r"\pi r^{2}",
]


def write_dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, formula in enumerate(FORMULAS):
        image = Image.new("RGB", (16 + 7 * len(formula), 32), "white")
        ImageDraw.Draw(image).text((8, 10), formula, fill="black")
        image.save(root / "images" / f"{i:03d}.png")
        rows.append({"image_path": f"images/{i:03d}.png", "text": formula})
    rows.append({"image_path": "images/missing.png", "text": r"y = k x"})  # no such file: becomes a reject
    with open(root / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image_path", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "train.csv"


if __name__ == "__main__":
    print(write_dataset(Path(sys.argv[1] if len(sys.argv) > 1 else "my_dataset")))
