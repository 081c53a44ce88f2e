"""Build every dataset shape mmdata writes, with mmdata itself, for the LLaMA-Factory conformance run.

Runs in mmdata's own environment (``python conformance/make_fixtures.py WORK``) and writes under ``WORK``:

- ``source/``: a JSONL of conversations (single image, several images, text only, multi-turn with a system prompt)
  and the PNG/JPEG images they name, in sizes on both sides of LLaMA-Factory's ``image_max_pixels``;
- ``data/``: one ``dataset_info.json`` shared by four builds (sharegpt as JSONL shards with train/val/test,
  sharegpt as JSON arrays, alpaca, the built-in ``latex_ocr_sample``) and one entry that is not mmdata's;
- ``broken/``: a copy of a build with one record whose ``<image>`` count does not match its images;
- ``expected.json``: for every dataset, the record count and the ``<|image_pad|>`` tokens mmdata predicts per record
  (``mmdata.tokens.image_tokens``), which the LLaMA-Factory side (``lf_checks.py``) compares with what it got.

It also checks that ``mmdata validate`` rejects the broken copy (and accepts the good builds) before LLaMA-Factory
ever sees them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

import mmdata
from mmdata.lfconfig import BuildDatasets, read_build
from mmdata.lfdata import iter_dataset
from mmdata.profiles import get_profile
from mmdata.tokens import image_tokens

# (width, height): below, around and above LLaMA-Factory's default image_max_pixels (589824), odd aspect ratios.
SIZES = [(64, 48), (300, 200), (1200, 900), (90, 400), (28, 28), (800, 600)]
OTHER_ENTRY = "someone_elses_alpaca"


def make_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (w, h) in enumerate(SIZES):
        im = Image.new("RGB", (w, h), (255 - 30 * i, 40 * i % 256, 90))
        ImageDraw.Draw(im).rectangle([w // 4, h // 4, w // 2, h // 2], fill=(10, 200, 30))
        name = f"img{i}.{'jpg' if i % 2 else 'png'}"
        im.save(folder / name)
        names.append(name)
    return names


def make_source(root: Path) -> Path:
    """24 conversations cycling through the shapes mmdata must carry to LLaMA-Factory unchanged."""
    images = make_images(root / "images")
    records = []
    for i in range(24):
        kind = i % 4
        a, b = images[i % len(images)], images[(i + 1) % len(images)]
        if kind == 0:  # one image
            rec = {"messages": [{"role": "user", "content": "<image>What colour is the square?"},
                                {"role": "assistant", "content": f"Green, record {i}."}], "images": [f"images/{a}"]}
        elif kind == 1:  # two images, placeholders in the text
            rec = {"messages": [{"role": "user", "content": "Compare <image> with <image>."},
                                {"role": "assistant", "content": f"They differ in size ({i})."}],
                   "images": [f"images/{a}", f"images/{b}"]}
        elif kind == 2:  # text only
            rec = {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                {"role": "assistant", "content": str(2 * i)}]}
        else:  # multi-turn with a system prompt, images in two turns
            rec = {"messages": [{"role": "system", "content": "You are a careful radiologist."},
                                {"role": "user", "content": "<image>Describe this."},
                                {"role": "assistant", "content": "A red field with a green square."},
                                {"role": "user", "content": "And this one? <image>"},
                                {"role": "assistant", "content": f"The same pattern, larger ({i})."}],
                   "images": [f"images/{a}", f"images/{b}"]}
        rec["id"] = f"rec{i}"
        records.append(rec)
    path = root / "conversations.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    # Image records first, text-only ones last: with 10 rows per shard, one shard file holds no image at all.
    ordered = [r for r in records if "images" in r][:10] + [r for r in records if "images" not in r]
    (root / "mixed.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered),
                                      encoding="utf-8")
    # LLaVA-1.5 / ShareGPT4V layout: a JSON array, a singular "image", from/value turns, <image> where LLaVA puts it
    # (first or last), text-only turns mixed in; it must build with no `fields:` and keep every image record.
    llava = []
    for i, name in enumerate(sorted(images)[:9]):
        question = "<image>\nWhat is shown?" if i % 2 else "Describe this picture.\n<image>"
        llava.append({"id": f"llava-{i}", "image": f"images/{name}", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": f"Picture {i}."}]})
    llava.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."},
                                                        {"from": "gpt", "value": "Hi."}]})
    (root / "llava.json").write_text(json.dumps(llava, ensure_ascii=False), encoding="utf-8")
    return path


def recipe(root: Path, name: str, source: Path, data: Path, split: bool = True, **output) -> Path:
    spec = {
        "name": name,
        "source": {"type": "json" if source.suffix == ".json" else "jsonl", "path": str(source)},
        "split": {"val": 4, "test": 3, "seed": 1} if split else {},
        "output": {"dir": str(data / name), "dataset_info": str(data / "dataset_info.json"), **output},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


#: Templates the conformance run loads the builds under besides qwen2_vl, and the profile that counts for each.
OTHER_TEMPLATES = {"qwen3_vl": "qwen3_vl"}


def expected_for(build: BuildDatasets, image_max_pixels: int, processor: dict) -> dict[str, dict]:
    """Per dataset: record count and the image tokens mmdata predicts for each record, in file order: for Qwen2-VL
    (``image_tokens``, from :func:`mmdata.tokens.image_tokens`) and for every other template's model profile
    (``image_tokens_<template>``)."""
    out = {}
    for split, names in build.splits.items():
        for name in names:
            tokens, others = [], {t: [] for t in OTHER_TEMPLATES}
            for _turns, images, _videos in iter_dataset(build.dataset_dir / "dataset_info.json", name):
                n, n_other = 0, dict.fromkeys(OTHER_TEMPLATES, 0)
                for image in images:
                    with Image.open(build.dataset_dir / image) as im:
                        n += image_tokens(*im.size, max_pixels=image_max_pixels,
                                          processor_min_pixels=processor["min_pixels"],
                                          processor_max_pixels=processor["max_pixels"])
                        for template, profile in OTHER_TEMPLATES.items():
                            n_other[template] += get_profile(profile).image_tokens(*im.size, image_max_pixels)
                tokens.append(n)
                for template in OTHER_TEMPLATES:
                    others[template].append(n_other[template])
            count = build.manifest["datasets"][name]["count"]
            assert count == len(tokens), (name, count, len(tokens))
            out[name] = {"split": split, "count": count, "image_tokens": tokens,
                         **{f"image_tokens_{t}": v for t, v in others.items()}}
    return out


def run_validate(target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmdata.cli", "validate", str(target)], capture_output=True, text=True)


def check_validate(work: str) -> None:
    """``mmdata validate`` accepts the builds and rejects the broken copy, naming the ``<image>`` mismatch."""
    work = Path(work).resolve()
    data, broken = work / "data", work / "broken"
    good = run_validate(data / "dataset_info.json")
    bad = run_validate(broken / "dataset_info.json")
    print(f"mmdata validate (good builds): rc={good.returncode}")
    print(f"mmdata validate (broken copy): rc={bad.returncode}: {(bad.stdout + bad.stderr).strip()[-600:]}")
    assert good.returncode == 0, good.stdout + good.stderr
    assert bad.returncode != 0, "mmdata validate accepted a record whose <image> count does not match its images"
    assert "<image>" in bad.stdout + bad.stderr, "mmdata validate's message does not name the <image> mismatch"
    print("mmdata validate: accepts the builds, rejects the broken copy")


def main(work: str) -> None:
    work = Path(work).resolve()
    if work.exists():
        shutil.rmtree(work)
    src, data, recipes = work / "source", work / "data", work / "recipes"
    recipes.mkdir(parents=True)
    data.mkdir()
    # An entry that is not mmdata's: the builds must merge next to it, and LLaMA-Factory must still load it.
    (data / "other.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 3))
    (data / "dataset_info.json").write_text(json.dumps({OTHER_ENTRY: {"file_name": "other.json"}}, indent=2))

    source = make_source(src)
    builds = {
        "shapes_jsonl": recipe(recipes, "shapes_jsonl", source, data, file_format="jsonl", shard_size=10),
        "shapes_json": recipe(recipes, "shapes_json", source, data, file_format="json"),
        "shapes_alpaca": recipe(recipes, "shapes_alpaca", source, data, format="alpaca"),
        "mixed_shards": recipe(recipes, "mixed_shards", source.parent / "mixed.jsonl", data, split=False,
                               shard_size=10),
        "llava_json": recipe(recipes, "llava_json", source.parent / "llava.json", data, split=False),
    }
    results = {name: mmdata.build(str(path), quiet=True) for name, path in builds.items()}
    results["latex_ocr_sample"] = mmdata.build("latex_ocr_sample", quiet=True,
                                               output__dir=str(data / "latex_ocr_sample"),
                                               output__dataset_info=str(data / "dataset_info.json"))
    # The same sample in its own folder (default layout): the training run and the broken copy start from it.
    latex = mmdata.build("latex_ocr_sample", quiet=True, output__dir=str(work / "latex"))
    for name, result in {**results, "latex (own folder)": latex}.items():
        print(f"built {name}: {result.counts['written']} written, {result.counts['rejected']} rejected")
        assert result.counts["rejected"] == 0, (name, result.counts)

    info = json.loads((data / "dataset_info.json").read_text())
    assert OTHER_ENTRY in info, "mmdata dropped an entry it did not write from dataset_info.json"
    processor = {"min_pixels": 3136, "max_pixels": 12845056}  # tiny model = real Qwen2-VL preprocessor_config
    expected: dict[str, dict] = {OTHER_ENTRY: {"split": "train", "count": 3, "image_tokens": [0, 0, 0],
                                               **{f"image_tokens_{t}": [0, 0, 0] for t in OTHER_TEMPLATES}}}
    image_max_pixels = 589824  # LLaMA-Factory's default, which lf_checks.py uses
    for name in results:
        expected.update(expected_for(read_build(data / name), image_max_pixels, processor))

    # The broken copy: one record gets an <image> placeholder without an image.
    broken = work / "broken"
    shutil.copytree(work / "latex", broken)
    entry = json.loads((broken / "dataset_info.json").read_text())["latex_ocr_sample_train"]
    (broken / "dataset_info.json").write_text(json.dumps({"broken_mismatch": entry}, indent=2))
    part = sorted((broken / entry["file_name"]).iterdir())[0]
    lines = part.read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[1])
    rec["messages"][0]["content"] = "<image>" + rec["messages"][0]["content"]
    lines[1] = json.dumps(rec, ensure_ascii=False)
    part.write_text("\n".join(lines) + "\n", encoding="utf-8")

    (work / "expected.json").write_text(json.dumps({
        "dataset_dir": str(data), "image_max_pixels": image_max_pixels, "datasets": expected,
        "broken": {"dataset_dir": str(broken), "name": "broken_mismatch"},
        "train_build": str(work / "latex"),
    }, indent=1))
    print(f"fixtures: {len(expected)} datasets in {data}")


if __name__ == "__main__":
    if sys.argv[1] == "--validate":
        check_validate(sys.argv[2])
    else:
        main(sys.argv[1])
