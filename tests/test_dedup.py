"""Duplicates and grouped splits: what ``dedup`` drops (and nothing else), near copies found at the default threshold,
splits grouped by image or field without train/eval leaks, and the same bytes for any worker count and after kill -9.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tests.conftest import read_jsonl_dir, write_recipe
from tests.test_scale import tree

import mmdata
from mmdata.dedup import (
    FINE_PER_BIT,
    assign_groups,
    components,
    image_key_of_file,
    near_pairs,
    normalize_text,
    perceptual_hash,
    phash,
    popcount,
)
from mmdata.errors import RecipeError
from mmdata.recipes import NEAR_THRESHOLD

# ----------------------------------------------------------------------------------------------- data


def distinct_image(rng: random.Random, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A photo-like image of its own: a gradient and a few random shapes, or a smooth random texture."""
    w, h = size
    if rng.random() < 0.7:
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randrange(4, 10)):
            x, y = rng.randrange(w), rng.randrange(h)
            box = (x, y, x + rng.randrange(10, w // 2), y + rng.randrange(10, h // 2))
            color = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        return img
    noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)


def near_copy(img: Image.Image, rng: random.Random) -> Image.Image:
    """A resized, re-encoded or slightly cropped copy (what re-uploads and preprocessing do to an image)."""
    w, h = img.size
    kind = rng.choice(["resize", "reencode", "crop"])
    if kind == "resize":
        scale = rng.uniform(0.5, 0.8)
        img = img.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
    elif kind == "crop":
        dx, dy = max(1, int(w * rng.uniform(0.01, 0.02))), max(1, int(h * rng.uniform(0.01, 0.02)))
        img = img.crop((dx, dy, w - dx, h - dy))
    return Image.open(io.BytesIO(jpeg(img, quality=rng.randrange(60, 86))))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}]


def make_vqa_source(folder: Path, images: int = 40, questions: int = 3, near_every: int = 3, repeats: int = 4,
                    seed: int = 0) -> dict:
    """A VQA-shaped JSONL source: every image under ``questions`` questions; every ``near_every``-th image also has
    a resized/re-encoded copy under one more question; the first ``repeats`` rows repeated at the end, verbatim.
    Returns the ground truth (row positions)."""
    rng = random.Random(seed)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rows, truth = [], {"near_copies": [], "original_of": {}, "repeats": {}}
    for i in range(images):
        img = distinct_image(rng)
        (folder / "imgs" / f"{i}.jpg").write_bytes(jpeg(img))
        first = len(rows)
        for q in range(questions):
            rows.append({"id": f"img{i}-q{q}", "patient": f"p{i % 7}", "images": [f"imgs/{i}.jpg"],
                         "messages": conversation(f"Question {q} about image {i}?", f"Answer {q} for {i}.")})
        if i % near_every == 0:
            (folder / "imgs" / f"{i}_copy.jpg").write_bytes(jpeg(near_copy(img, rng)))
            truth["near_copies"].append(len(rows))
            truth["original_of"][len(rows)] = first
            rows.append({"id": f"img{i}-copy", "patient": f"p{i % 7}", "images": [f"imgs/{i}_copy.jpg"],
                         "messages": conversation(f"What else is in picture {i}?", f"Something {i}.")})
    for k in range(repeats):
        truth["repeats"][len(rows)] = k
        rows.append(dict(rows[k]))
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    truth["rows"] = len(rows)
    return truth


def recipe(folder: Path, name: str = "q", **extra) -> Path:
    spec = {"name": name, "source": {"type": "jsonl", "path": "data.jsonl"}, "fields": {"id": "id"},
            "output": {"dir": "out", "shard_size": 10}, **extra}
    return write_recipe(folder / f"{name}.yaml", spec)


def rejects(result) -> list[dict]:
    path = result.output_dir / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def split_records(result) -> dict[str, list[dict]]:
    return {split: read_jsonl_dir(path) for split, path in
            ((name.rsplit("_", 1)[-1] if name.rsplit("_", 1)[-1] in ("train", "val", "test") else "train", path)
             for name, path in result.datasets.items())}


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("vqa")
    return folder, make_vqa_source(folder)


# ----------------------------------------------------------------------------------------------- what is dropped


def test_exact_drops_exactly_the_repeated_rows_and_keeps_every_question_of_an_image(vqa, tmp_path):
    folder, truth = vqa
    result = mmdata.build(str(recipe(folder, dedup="exact")), output__dir=str(tmp_path / "o"), num_proc=1)
    c = result.counts
    assert c["read"] == truth["rows"] == c["written"] + c["rejected"]
    assert c["rejected_by_reason"] == {"duplicate": len(truth["repeats"])}
    dropped = {r["position"]: r for r in rejects(result)}
    assert set(dropped) == set(truth["repeats"])
    ids = [json.loads(line)["id"] for line in (folder / "data.jsonl").read_text().splitlines()]
    for position, original in truth["repeats"].items():
        r = dropped[position]
        assert r["reason"] == "duplicate" and r["duplicate_of"] == original and r["id"] == ids[original]
        assert r["images"] and (result.output_dir / r["images"][0]).is_file()
    assert sum(len(v) for v in split_records(result).values()) == c["written"]
    manifest = json.loads(result.manifest.read_text())
    assert manifest["dedup"] == {"mode": "exact", "duplicates": len(truth["repeats"]), "leaks": 0}


def test_image_mode_keeps_the_first_record_of_each_image(vqa, tmp_path):
    folder, truth = vqa
    result = mmdata.build(str(recipe(folder, dedup="image")), output__dir=str(tmp_path / "o"), num_proc=1)
    images = 40 + len(truth["near_copies"])  # the copies are other bytes: kept by `image`
    assert result.written == images and result.rejected == truth["rows"] - images
    for r in rejects(result):
        assert r["duplicate_of"] < r["position"]
    kept = [rec["images"][0] for rec in read_jsonl_dir(result.datasets["q"])]
    assert len(kept) == len(set(kept)) == images


def test_text_mode_drops_the_same_conversation_up_to_case_and_spacing(tmp_path):
    rows = [{"messages": conversation("What organ  is this?", "The liver.")},
            {"messages": conversation("what organ is THIS?", "the liver.")},  # same, normalised
            {"messages": conversation("What organ is this?", "The spleen.")},
            {"messages": [{"role": "user", "content": "What organ is this?<image>"},
                          {"role": "assistant", "content": "The  Liver."}]}]
    for r in rows:
        r.setdefault("images", [])
        for m in r["messages"]:
            m["content"] = m["content"].replace("<image>", "")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = mmdata.build(str(recipe(tmp_path, dedup="text")), output__dir=str(tmp_path / "o"), num_proc=1)
    assert [(r["position"], r["duplicate_of"]) for r in rejects(result)] == [(1, 0), (3, 0)]
    assert normalize_text("Ｆｕｌｌ　width  <image>TEXT") == "full width text"


def test_near_finds_resized_and_reencoded_copies_with_precision_and_recall_over_95_percent(tmp_path):
    rng = random.Random(5)
    (tmp_path / "imgs").mkdir()
    rows, copies = [], set()
    originals = []
    for i in range(90):
        img = distinct_image(rng, (rng.randrange(120, 240), rng.randrange(100, 200)))
        originals.append(img)
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg(img))
        rows.append({"images": [f"imgs/{i}.jpg"], "messages": conversation(f"q{i}", f"a{i}")})
    for k in range(60):
        src = rng.randrange(90)
        (tmp_path / "imgs" / f"c{k}.jpg").write_bytes(jpeg(near_copy(originals[src], rng)))
        copies.add(len(rows))
        rows.append({"images": [f"imgs/c{k}.jpg"], "messages": conversation(f"copy {k}", f"b{k}")})
    order = list(range(90, 150))
    rng.shuffle(order)  # copies come after their originals, in any order among themselves
    rows = rows[:90] + [rows[i] for i in order]
    copies = set(range(90, 150))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = mmdata.build(str(recipe(tmp_path, dedup="near")), output__dir=str(tmp_path / "o"), num_proc=2)
    dropped = {r["position"] for r in rejects(result)}
    true_positive = len(dropped & copies)
    precision, recall = true_positive / max(1, len(dropped)), true_positive / len(copies)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert result.read == result.written + result.rejected
    manifest = json.loads(result.manifest.read_text())
    assert manifest["dedup"]["threshold"] == NEAR_THRESHOLD


def test_image_link_mode_hashes_the_bytes_so_two_paths_of_one_image_are_duplicates(tmp_path):
    (tmp_path / "imgs").mkdir()
    data = jpeg(distinct_image(random.Random(1)))
    (tmp_path / "imgs" / "a.jpg").write_bytes(data)
    (tmp_path / "imgs" / "b.jpg").write_bytes(data)
    rows = [{"images": [f"imgs/{n}.jpg"], "messages": conversation("q", "a")} for n in "ab"]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = mmdata.build(str(recipe(tmp_path, dedup="image", images={"mode": "link"})),
                          output__dir=str(tmp_path / "o"), num_proc=1)
    assert [(r["position"], r["duplicate_of"]) for r in rejects(result)] == [(1, 0)]
    assert image_key_of_file(tmp_path / "imgs" / "a.jpg") == image_key_of_file(tmp_path / "imgs" / "b.jpg")


def test_dropped_duplicates_never_fail_strict_or_max_rejected_but_real_rejects_still_do(vqa, tmp_path):
    folder, truth = vqa
    path = recipe(folder, "strict", dedup="exact", max_rejected=0)
    result = mmdata.build(str(path), output__dir=str(tmp_path / "o"), num_proc=1, strict=True)
    assert result.rejected == len(truth["repeats"]) and not result.warnings


def test_against_drops_the_records_that_repeat_another_dataset(vqa, tmp_path):
    folder, truth = vqa
    bench = mmdata.build(str(recipe(folder, "bench", max_samples=9)), output__dir=str(tmp_path / "bench"),
                         num_proc=1)
    result = mmdata.build(str(recipe(folder, "clean", dedup={"mode": "image", "against": [str(bench.output_dir)]})),
                          output__dir=str(tmp_path / "clean"), num_proc=1)
    leaks = [r for r in rejects(result) if r["reason"] == "leak"]
    # rows 0-8 show images 0, 1, 2 (and image 0's copy): every other row of those images leaks too
    bench_images = {rec["images"][0] for rec in read_jsonl_dir(bench.datasets["bench"])}
    kept_images = {rec["images"][0] for rec in read_jsonl_dir(result.datasets["clean"])}
    assert leaks and not bench_images & kept_images
    assert all(r["leaks_into"]["dataset"] == "bench" for r in leaks)
    assert result.counts["rejected_by_reason"]["leak"] == len(leaks)


# ----------------------------------------------------------------------------------------------- grouped splits


def train_and_held(result) -> tuple[list[dict], list[dict]]:
    records = split_records(result)
    return records["train"], records.get("val", []) + records.get("test", [])


def _source_images(records: list[dict]) -> set[int]:
    """The generated image (original or copy alike) each record shows, from its question."""
    return {int(re.search(r"(?:image|picture) (\d+)", rec["messages"][0]["content"]).group(1)) for rec in records}


def test_group_by_image_with_near_dedup_leaves_no_val_or_test_image_or_near_copy_in_train(vqa, tmp_path):
    folder, _ = vqa
    for extra in ({"dedup": "near", "split": {"val": 0.2, "test": 0.1, "group_by": "image"}},
                  {"split": {"val": 0.2, "test": 0.1, "group_by": "near"}}):  # every question kept
        result = mmdata.build(str(recipe(folder, **extra)), output__dir=str(tmp_path / extra["split"]["group_by"]),
                              num_proc=2)
        train, held = train_and_held(result)
        assert held and train
        out = result.output_dir
        train_hashes = np.array([perceptual_hash(out / rec["images"][0]) for rec in train], dtype=np.uint64)
        train_files = {rec["images"][0] for rec in train}
        for rec in held:
            assert rec["images"][0] not in train_files
            h = np.array(perceptual_hash(out / rec["images"][0]), dtype=np.uint64)
            near = (popcount(train_hashes[:, 0] ^ h[0]) <= NEAR_THRESHOLD) & \
                (popcount(train_hashes[:, 1:] ^ h[1:]).sum(axis=1) <= FINE_PER_BIT * NEAR_THRESHOLD)
            assert not near.any()
        # and by the ground truth: no image of val/test (original or planted copy) has a version in train
        assert not _source_images(train) & _source_images(held)
        manifest = json.loads(result.manifest.read_text())
        assert manifest["leakage"]["exact_image"] == manifest["leakage"]["near_image"] == 0
        assert result.read == result.written + result.rejected
    assert result.rejected == 0  # group_by: near alone drops nothing


def test_group_by_field_keeps_each_value_in_one_split_and_sizes_come_close(vqa, tmp_path):
    folder, truth = vqa
    result = mmdata.build(str(recipe(folder, split={"val": 20, "test": 10, "group_by": "patient"})),
                          output__dir=str(tmp_path / "o"), num_proc=1)
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    patient_of = {json.dumps(r["messages"]): r["patient"] for r in rows}
    split_of_patient: dict[str, set] = {}
    for split, records in split_records(result).items():
        for rec in records:
            split_of_patient.setdefault(patient_of[json.dumps(rec["messages"])], set()).add(split)
    assert all(len(s) == 1 for s in split_of_patient.values())  # 7 patients, ~20 records each
    manifest = json.loads(result.manifest.read_text())
    assert manifest["grouped_split"] == {"by": "patient", "groups": 7, "asked": {"val": 20, "test": 10}}
    by_split = result.counts["by_split"]
    assert by_split.get("val", 0) <= 20 and by_split.get("test", 0) <= 10 and sum(by_split.values()) == truth["rows"]


def test_assign_groups_fills_val_and_test_exactly_when_small_groups_allow():
    groups = np.repeat(np.arange(300), np.random.default_rng(0).integers(1, 4, 300))
    positions = np.arange(len(groups))
    codes = assign_groups(groups, positions, 50, 30, seed=1)
    assert (codes == 1).sum() == 50 and (codes == 2).sum() == 30
    for g in np.unique(groups):
        assert len(set(codes[groups == g].tolist())) == 1
    assert np.array_equal(codes, assign_groups(groups, positions, 50, 30, seed=1))
    assert not np.array_equal(codes, assign_groups(groups, positions, 50, 30, seed=2))


def test_incompatible_split_and_dedup_options_are_refused_with_the_option_named(vqa):
    folder, _ = vqa
    for extra, message in (
        ({"split": {"from_source": True, "group_by": "image"}}, "cannot be combined with split.from_source"),
        ({"split": {"val": 2, "pick": "last", "group_by": "image"}}, "leave split.pick at random"),
        ({"split": {"group_by": "image"}}, "needs split.val or split.test"),
        ({"dedup": {"mode": "exact", "threshold": 4}}, "dedup.threshold only applies to mode near"),
        ({"dedup": "fuzzy"}, "dedup.mode"),
    ):
        with pytest.raises(RecipeError, match=message):
            mmdata.load_recipe(str(recipe(folder, "bad", **extra)))


def test_a_build_without_dedup_or_grouping_writes_what_it_wrote_before(vqa, tmp_path):
    folder, _ = vqa
    result = mmdata.build(str(recipe(folder, split={"val": 5})), output__dir=str(tmp_path / "o"), num_proc=1)
    manifest = json.loads(result.manifest.read_text())
    assert "dedup" not in manifest["recipe"] and "group_by" not in manifest["recipe"]["split"]
    assert not {"dedup", "leakage", "grouped_split"} & set(manifest)
    assert not (result.output_dir / "fingerprints.npz").exists()
    assert not (result.output_dir / ".mmdata" / "fingerprints").exists()


# ----------------------------------------------------------------------------------------------- same bytes


def test_one_and_two_workers_and_a_rebuild_write_identical_bytes(vqa, tmp_path):
    folder, _ = vqa
    path = recipe(folder, "same", dedup="near", split={"val": 0.2, "test": 0.1, "group_by": "image"})
    one = mmdata.build(str(path), num_proc=1, output__dir=str(tmp_path / "p1"))
    two = mmdata.build(str(path), num_proc=2, output__dir=str(tmp_path / "p2"))
    assert one.counts == two.counts and one.rejected
    assert tree(one.output_dir) == tree(two.output_dir) and "fingerprints.npz" in tree(one.output_dir)
    again = mmdata.build(str(path), num_proc=2, output__dir=str(tmp_path / "p2"), rebuild=True)
    assert tree(again.output_dir) == tree(one.output_dir)
    assert mmdata.build(str(path), num_proc=2, output__dir=str(tmp_path / "p2")).up_to_date


def test_kill_9_mid_build_then_resume_is_byte_identical_with_dedup_and_grouped_split(tmp_path):
    src = tmp_path / "src"
    make_vqa_source(src, images=150, questions=4, seed=3)  # ~650 rows, 65 tasks
    path = recipe(src, "k", dedup="near", split={"val": 0.1, "test": 0.1, "group_by": "image"})
    reference = mmdata.build(str(path), num_proc=1, output__dir=str(tmp_path / "reference"))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mmdata.cli", "build", str(path), "--num-proc", "2", "--quiet",
               "--set", f"output.dir={out}"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = out / ".mmdata" / "done"
    while proc.poll() is None and len(list(done.glob("*.json")) if done.is_dir() else []) < 25:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "mmdata_build.json").exists() and not (out / "fingerprints.npz").exists()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert tree(out) == tree(reference.output_dir)
    shutil.rmtree(tmp_path / "reference")


def test_shards_merged_equal_a_single_build_with_dedup_and_grouped_split(vqa, tmp_path):
    from mmdata.cli import main

    folder, _ = vqa
    path = recipe(folder, "sh", dedup="exact", split={"val": 0.2, "group_by": "patient"})
    single = mmdata.build(str(path), num_proc=1, output__dir=str(tmp_path / "single"))
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        mmdata.build(str(path), num_proc=1, shard=(i, 2), output__dir=str(part))
    assert main(["merge", str(tmp_path / "merged"), *map(str, parts)]) == 0
    assert tree(tmp_path / "merged") == tree(single.output_dir)


def test_mixture_counts_per_source_lose_the_dropped_duplicates(tmp_path):
    rows = [{"instruction": f"question {i % 4}", "output": f"answer {i % 4}"} for i in range(10)]  # 6 repeats
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    components = [{"name": name, "source": {"type": "jsonl", "path": f"{name}.jsonl"}, "count": n}
                  for name, n in (("a", 10), ("b", 3))]
    spec = {"name": "mix", "source": {"type": "mixture", "seed": 7, "components": components}, "dedup": "text",
            "output": {"dir": str(tmp_path / "o"), "shard_size": 4}}
    result = mmdata.build(str(write_recipe(tmp_path / "mix.yaml", spec)), num_proc=1)
    assert result.written == 4 and result.rejected == 9
    assert sum(result.counts["by_source"].values()) == 4
    assert {r["source"] for r in rejects(result)} <= {"a", "b"} and len(rejects(result)) == 9


# ----------------------------------------------------------------------------------------------- the index itself


def test_near_pairs_equal_a_brute_force_search_for_every_threshold_and_plan(monkeypatch):
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64)
    flips = np.array([sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 14), replace=False))
                      for _ in range(200)], dtype=np.uint64)
    hashes = np.concatenate([base, base[rng.integers(0, 400, 200)] ^ flips])
    distance = popcount(hashes[:, None] ^ hashes[None, :])
    for threshold in (0, 3, 6, NEAR_THRESHOLD, 14):
        a, b = near_pairs(hashes, threshold)
        expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(distance <= threshold, 1)), strict=True)}
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == expected, threshold
    expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(distance <= 10, 1)), strict=True)}
    for plan in (([16] * 4, 2), ([11] * 4 + [10] * 2, 1), ([6] * 9 + [5] * 2, 0), ([22, 21, 21], 3),
                 ([17, 17, 15, 15], 2)):
        monkeypatch.setattr("mmdata.dedup._plan", lambda n, threshold, plan=plan: plan)  # the plans large n use
        a, b = near_pairs(hashes, 10)
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == expected, plan


def test_components_root_every_node_at_the_smallest_of_its_component():
    roots = components(8, np.array([5, 1, 3, 7]), np.array([6, 2, 2, 6]))
    assert roots.tolist() == [0, 1, 1, 1, 4, 5, 5, 5]


def test_phash_of_a_resized_copy_is_close_and_of_another_image_far():
    rng = random.Random(2)
    a, b = distinct_image(rng, (200, 150)), distinct_image(rng, (200, 150))
    small = jpeg(a.resize((100, 75)), quality=70)
    assert bin(phash(jpeg(a)) ^ phash(small)).count("1") <= NEAR_THRESHOLD
    assert bin(phash(jpeg(a)) ^ phash(jpeg(b))).count("1") > NEAR_THRESHOLD


def test_images_with_almost_no_content_are_never_taken_for_each_others_near_copies(tmp_path):
    """Flat swatches and short words on blank pages: their DCT coefficients are noise or one blob, and distinct ones
    hashed alike (5 of 7 swatches, 19 of 20 pages were dropped). They are matched by their pixels now: distinct
    ones are kept (red and green too, one gray level apart), and a lossless copy of one (PNG -> BMP) is found."""
    from PIL import ImageDraw

    (tmp_path / "imgs").mkdir()
    rows = []
    colours = ["white", "#c8c8c8", "gray", "blue", "red", "green", "yellow"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (256, 256), colour).save(tmp_path / "imgs" / f"flat{i}.png")
        rows.append({"images": [f"imgs/flat{i}.png"], "messages": conversation("Which colour?", colour)})
    for i in range(12):
        page = Image.new("RGB", (512, 512), "white")
        ImageDraw.Draw(page).text((40, 40), f"WORD{i:04d}", fill="black")
        page.save(tmp_path / "imgs" / f"page{i}.png")
        rows.append({"images": [f"imgs/page{i}.png"], "messages": conversation("Transcribe.", f"WORD{i:04d}")})
    Image.open(tmp_path / "imgs" / "flat3.png").save(tmp_path / "imgs" / "flat3.bmp")
    rows.append({"images": ["imgs/flat3.bmp"], "messages": conversation("And this one?", "blue")})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = mmdata.build(str(recipe(tmp_path, dedup="near")), output__dir=str(tmp_path / "o"), num_proc=1)
    assert [(r["position"], r["duplicate_of"]) for r in rejects(result)] == [(len(rows) - 1, 3)]
    assert result.written == len(rows) - 1


def test_group_by_field_blank_cells_stand_alone_like_missing_values(tmp_path):
    """A CSV cannot write null: a blank (or spaces-only) group cell is "no value", so those rows do not all fall into
    one group (36 blank rows were one group and val got 4 of the 10 asked)."""
    (tmp_path / "imgs").mkdir()
    lines = ["image,question,answer,patient_id"]
    for i in range(40):
        Image.new("RGB", (32, 32), (i * 6, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
        patient = f"p{i}" if i < 4 else ("  " if i % 2 else "")
        lines.append(f"imgs/{i}.png,What is it?,Thing {i},{patient}")
    (tmp_path / "data.csv").write_text("\r\n".join(lines) + "\r\n")
    spec = {"name": "g", "source": {"type": "csv", "path": "data.csv"},
            "fields": {"image": "image", "question": "question", "answer": "answer"},
            "split": {"val": 10, "group_by": "patient_id"}, "output": {"dir": "out"}}
    result = mmdata.build(str(write_recipe(tmp_path / "g.yaml", spec)), output__dir=str(tmp_path / "o"), num_proc=1)
    assert result.counts["by_split"] == {"train": 30, "val": 10}
    assert json.loads(result.manifest.read_text())["grouped_split"]["groups"] == 40


def test_link_mode_leaves_no_temporary_name_when_records_share_an_image(tmp_path):
    """Renaming a temporary hard link onto another link of the same file does nothing (POSIX), which left one
    ``.tmp`` per repeat in images/ (304 of 469 files in a SLAKE-shaped build)."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg(distinct_image(random.Random(3))))
    rows = [{"images": ["imgs/a.jpg"], "messages": conversation(f"q{i}", f"a{i}")} for i in range(3)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = mmdata.build(str(recipe(tmp_path, images={"mode": "link"})), output__dir=str(tmp_path / "o"), num_proc=1)
    assert result.written == 3
    assert len([p for p in (tmp_path / "o" / "images").rglob("*") if p.is_file()]) == 1  # the image, once
    assert not list((tmp_path / "o").rglob("*.tmp"))


def test_a_build_whose_every_record_dedup_dropped_says_so_not_that_the_recipe_is_wrong(vqa, tmp_path):
    folder, _ = vqa
    bench = mmdata.build(str(recipe(folder, "bench")), output__dir=str(tmp_path / "bench"), num_proc=1)
    result = mmdata.build(str(recipe(folder, "again", dedup={"mode": "exact", "against": [str(bench.output_dir)]})),
                          output__dir=str(tmp_path / "again"), num_proc=1)
    assert result.written == 0 and "dedup dropped all" in result.problem and "recipe" not in result.problem
