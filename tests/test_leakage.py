"""``mmdata check-leakage``: its counts equal a brute-force comparison of the files, for a plain row-split build (records
read and images hashed) and for a build that stored its fingerprints; ``--against`` other datasets; exit codes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import read_jsonl_dir, write_recipe
from tests.test_dedup import make_vqa_source, recipe

import mmdata
from mmdata.cli import main
from mmdata.dedup import FINE_PER_BIT, normalize_text, perceptual_hash, popcount
from mmdata.leakage import check_leakage
from mmdata.recipes import NEAR_THRESHOLD


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("leaky")
    make_vqa_source(folder, images=30, questions=3, near_every=2, repeats=6, seed=11)
    return folder


@pytest.fixture(scope="module")
def row_split(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("row") / "out"
    mmdata.build(str(recipe(source, "rows", split={"val": 0.2, "test": 0.1})), output__dir=str(out), num_proc=1)
    return out


def brute_force(build: Path) -> dict[str, int]:
    """Leaking val/test records, counted from the files alone: image bytes, normalised text, and near copies by
    their definition (64-bit pHashes within the threshold and 256-bit ones within 5x), pair by pair."""
    info = json.loads((build / "dataset_info.json").read_text())
    records = {name.rsplit("_", 1)[-1]: read_jsonl_dir(build / entry["file_name"]) for name, entry in info.items()}

    def text(rec: dict) -> tuple:
        return tuple((m["role"], normalize_text(m["content"])) for m in rec["messages"])

    def digest(rel: str) -> str:
        return hashlib.sha256((build / rel).read_bytes()).hexdigest()

    train = records["train"]
    train_bytes = {digest(rel) for rec in train for rel in rec["images"]}
    train_hashes = np.array([perceptual_hash(build / rel) for rec in train for rel in rec["images"]], dtype=np.uint64)

    def near(rel: str) -> bool:
        h = np.array(perceptual_hash(build / rel), dtype=np.uint64)
        coarse = popcount(train_hashes[:, 0] ^ h[0]) <= NEAR_THRESHOLD
        fine = popcount(train_hashes[:, 1:] ^ h[1:]).sum(axis=1) <= FINE_PER_BIT * NEAR_THRESHOLD
        return bool((coarse & fine).any())

    train_texts = {text(rec) for rec in train}
    counts = {"exact_image": 0, "near_image": 0, "text": 0}
    for rec in records.get("val", []) + records.get("test", []):
        counts["exact_image"] += any(digest(rel) in train_bytes for rel in rec["images"])
        counts["near_image"] += any(near(rel) for rel in rec["images"])
        counts["text"] += text(rec) in train_texts
    return counts


def test_check_leakage_of_a_row_split_build_equals_a_brute_force_count(row_split):
    report = check_leakage(row_split, near=True)
    expected = brute_force(row_split)
    within = report["within"]
    assert {kind: within[kind] for kind in expected} == expected
    assert expected["exact_image"] > 0 and expected["near_image"] > expected["exact_image"]  # the data does leak
    assert within["checked"] == report["records"]["val"] + report["records"]["test"]
    example = within["examples"]["exact_image"][0]
    assert example["record"]["split"] in ("val", "test") and example["matches"]["split"] == "train"
    assert example["record"]["images"] and example["record"]["images"][0] == example["matches"]["images"][0]


def test_a_build_with_stored_fingerprints_reports_the_same_as_the_brute_force(source, tmp_path):
    result = mmdata.build(str(recipe(source, "stored", dedup="exact", split={"val": 0.2, "test": 0.1})),
                          output__dir=str(tmp_path / "o"), num_proc=2)
    assert (result.output_dir / "fingerprints.npz").is_file()
    expected = brute_force(result.output_dir)
    stored = check_leakage(result.output_dir)  # from fingerprints.npz: nothing read or hashed
    assert {kind: stored["within"][kind] for kind in ("exact_image", "text")} == \
        {kind: expected[kind] for kind in ("exact_image", "text")} and "near_image" not in stored["within"]
    assert "position" in stored["within"]["examples"]["exact_image"][0]["record"]  # input rows are stored
    with_near = check_leakage(result.output_dir, near=True)  # no pHashes stored: computed from the files
    assert {kind: with_near["within"][kind] for kind in expected} == expected
    manifest = json.loads(result.manifest.read_text())
    assert manifest["leakage"] == {"exact_image": expected["exact_image"], "text": expected["text"]}
    assert result.leakage == manifest["leakage"]


def test_group_by_image_build_has_no_exact_leak_and_says_so(source, tmp_path):
    result = mmdata.build(str(recipe(source, "g", split={"val": 0.2, "test": 0.1, "group_by": "image"})),
                          output__dir=str(tmp_path / "o"), num_proc=1)
    assert check_leakage(result.output_dir)["within"]["exact_image"] == 0 == result.leakage["exact_image"]


def test_against_another_build_and_a_dataset_info_entry(source, row_split, tmp_path):
    bench = mmdata.build(str(recipe(source, "bench", max_samples=12)), output__dir=str(tmp_path / "bench"),
                         num_proc=1)
    by_build = check_leakage(row_split, against=[str(bench.output_dir)])
    by_info = check_leakage(row_split, against=[f"{bench.output_dir / 'dataset_info.json'}#bench"])
    result, same = by_build["against"][0], by_info["against"][0]
    assert result["exact_image"] == same["exact_image"] > 0 and result["datasets"] == ["bench"]
    bench_images = {rel for rec in read_jsonl_dir(bench.datasets["bench"]) for rel in rec["images"]}
    info = json.loads((row_split / "dataset_info.json").read_text())
    ours = [rec for entry in info.values() for rec in read_jsonl_dir(row_split / entry["file_name"])]
    assert result["exact_image"] == sum(any(rel in bench_images for rel in rec["images"]) for rec in ours)


def test_cli_prints_a_report_and_fails_on_leaks_only_when_asked(row_split, tmp_path, capsys):
    assert main(["check-leakage", str(row_split)]) == 0
    out = capsys.readouterr().out
    assert "val/test vs train" in out and "exact image" in out
    assert main(["check-leakage", str(row_split), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["leaks"] > 0
    assert main(["check-leakage", str(row_split), "--fail-on-leak"]) == 7
    assert "leaking record(s)" in capsys.readouterr().err
    assert main(["check-leakage", str(tmp_path)]) == 8  # not a build: one line, no traceback, not "leaks found"
    assert main(["check-leakage", str(row_split / "dataset_info.json")]) == 8
    assert "is a file; pass the build folder" in capsys.readouterr().err


def test_report_of_a_dedup_build_shows_duplicate_clusters_side_by_side(source, tmp_path):
    from mmdata.report import write_report

    spec = {"name": "rep", "source": {"type": "jsonl", "path": "data.jsonl"}, "dedup": "near",
            "output": {"dir": str(tmp_path / "o"), "shard_size": 10}}
    mmdata.build(str(write_recipe(source / "rep.yaml", spec)), num_proc=1)
    page = write_report(tmp_path / "o", samples=2, max_records=50).read_text()
    stats = json.loads((tmp_path / "o" / "report" / "stats.json").read_text())["duplicates"]
    assert "<h2>Duplicates" in page and page.count('class="dup kept"') == len(stats["shown"]) > 0
    biggest = stats["shown"][0]
    assert biggest["copies"] == stats["largest"] - 1 and biggest["kept"]["images"]
    assert all(c["copies"] <= biggest["copies"] for c in stats["shown"])


def test_a_reference_with_nothing_readable_is_an_error_and_a_partly_readable_one_says_so(source, row_split, tmp_path,
                                                                                        capsys):
    """A benchmark copied without its images (or without its data files, or an empty registry) compared nothing:
    it must not pass as "no leak found" (exit 8, in check-leakage and, before the source is read, in a build's
    dedup.against); a reference with some images missing is compared and says how many were left out."""
    import shutil

    bench = mmdata.build(str(recipe(source, "bench", max_samples=12)), output__dir=str(tmp_path / "bench"),
                         num_proc=1).output_dir
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    shutil.copytree(bench / "bench", no_images / "bench")
    shutil.copy(bench / "dataset_info.json", no_images / "dataset_info.json")
    assert main(["check-leakage", str(row_split), "--against", str(no_images / "dataset_info.json"),
                 "--fail-on-leak"]) == 8
    assert "none of its" in capsys.readouterr().err
    no_files = tmp_path / "no_files"
    no_files.mkdir()
    shutil.copy(bench / "dataset_info.json", no_files / "dataset_info.json")
    (tmp_path / "empty.json").write_text("{}")
    for reference in (no_files / "dataset_info.json", tmp_path / "empty.json"):
        assert main(["check-leakage", str(row_split), "--against", str(reference)]) == 8
        assert "nothing to compare against" in capsys.readouterr().err

    partly = tmp_path / "partly"
    shutil.copytree(bench, partly)
    images = sorted((partly / "images").rglob("*.*"))
    images[0].unlink()
    report = check_leakage(row_split, against=[str(partly / "dataset_info.json")])
    assert report["against"][0]["unreadable_images"] >= 1
    assert main(["check-leakage", str(row_split), "--against", str(partly / "dataset_info.json")]) == 0
    assert "could not be read and were left out" in capsys.readouterr().out

    build = recipe(source, "guarded", dedup={"mode": "image", "against": [str(no_files / "dataset_info.json")]})
    with pytest.raises(mmdata.MmdataError, match="nothing to compare against"):
        mmdata.build(str(build), output__dir=str(tmp_path / "guarded"), num_proc=1)
    assert not (tmp_path / "guarded").exists()  # refused before the source was read
    build = recipe(source, "warned", dedup={"mode": "image", "against": [str(partly / "dataset_info.json")]})
    with pytest.warns(mmdata.BuildWarning, match="dedup.against could not be read"):
        result = mmdata.build(str(build), output__dir=str(tmp_path / "warned"), num_proc=1)
    assert result.counts["unreadable_reference_images"] >= 1


def test_threshold_outside_the_recipe_range_is_refused_at_parse_time(row_split, capsys):
    for value in ("-5", "33", "96"):
        with pytest.raises(SystemExit) as exit_info:
            main(["check-leakage", str(row_split), "--near", "--threshold", value])
        assert exit_info.value.code == 2
        assert "must be 0-32" in capsys.readouterr().err
