"""Bytes on disk of a SLAKE-shaped build: each distinct image stored once (content-addressed) vs once per record.

SLAKE has ~640 images under ~14k questions; VQA-RAD and PathVQA repeat images the same way. This generates that
shape (seeded: 640 JPEGs of 384x384, 14,000 question rows in JSON Lines that name them by path), builds it with
``images: copy``, and reports the bytes of ``images/`` next to what one copy per record takes (the sum of every
record's image size: what a writer that names images by record position stores).

    python benchmarks/images_once.py [--images 640] [--questions 14000] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image

import mmdata


def make_slake_shaped(root: Path, images: int, questions: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (root / "imgs").mkdir(parents=True)
    for i in range(images):
        buf = io.BytesIO()
        Image.effect_noise((384, 384), 20 + i % 60).convert("RGB").save(buf, format="JPEG", quality=85)
        (root / "imgs" / f"xmlab{i}.jpg").write_bytes(buf.getvalue())
    with open(root / "train.jsonl", "w") as f:
        for q in range(questions):
            image = f"imgs/xmlab{rng.randrange(images)}.jpg"
            f.write(json.dumps({"qid": q, "images": [image], "messages": [
                {"role": "user", "content": f"<image>Which organ is shown in question {q}?"},
                {"role": "assistant", "content": rng.choice(["Lung", "Liver", "Brain", "Heart"])}]}) + "\n")
    recipe = {"name": "slake_shaped", "source": {"type": "jsonl", "path": "train.jsonl"},
              "output": {"dir": str(root / "out")}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--questions", type=int, default=14000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = make_slake_shaped(Path(tmp), args.images, args.questions)
        started = time.perf_counter()
        result = mmdata.build(str(recipe), num_proc=args.workers)
        seconds = time.perf_counter() - started
        stored = sum(p.stat().st_size for p in (result.output_dir / "images").rglob("*") if p.is_file())
        files = sum(1 for p in (result.output_dir / "images").rglob("*") if p.is_file())
        per_record = 0
        for part in sorted(result.datasets["slake_shaped"].glob("*.jsonl")):
            for line in part.read_text().splitlines():
                per_record += sum((result.output_dir / p).stat().st_size for p in json.loads(line)["images"])
    print(f"| {args.questions} questions on {args.images} images | {result.written} records | {files} files, "
          f"{stored / 1e6:.1f} MB | {per_record / 1e6:.1f} MB | {per_record / stored:.1f}x less | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
