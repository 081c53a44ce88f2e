"""Inputs as people really have them (issue 17, "First, do no harm"): every row is written or rejected with a reason
that names the fix, and no single row, caption or shard ends a build.

Each test builds real files in ``tmp_path`` through ``mmdata.build``; hub datasets are local copies in hub layout,
and "offline" is simulated at the hub check, never with the real network.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import datasets
import pandas as pd
import pytest
import yaml
import zstandard
from PIL import Image
from tests.conftest import jpeg_bytes, png_bytes, read_jsonl_dir, tar_bytes, write_recipe

import mmdata
from mmdata.errors import RecipeError, SourceError
from mmdata.sources import hf as hf_source
from mmdata.sources import open_source


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """``datasets``' cache inside tmp_path; the hubs' TCP check answers "reachable" unless a test says otherwise."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setattr(hf_source, "hub_unreachable", lambda hub: None)


def build(tmp_path: Path, source: dict, *, recipe_dir: Path | None = None, **extra):
    folder = recipe_dir or tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"name": "t", "source": source, "output": {"dir": str(tmp_path / "out")}, **extra}
    return mmdata.build(str(write_recipe(folder / "recipe.yaml", recipe)), num_proc=1)


def written(result, name: str = "t") -> list[dict]:
    return read_jsonl_dir(result.datasets[name]) if name in result.datasets else []


def rejects(result) -> list[dict]:
    path = result.output_dir / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def image_bytes(result, record: dict) -> list[bytes]:
    return [(result.output_dir / rel).read_bytes() for rel in record.get("images", [])]


def balanced(result) -> bool:
    c = result.counts
    return c["read"] == c["written"] + c["rejected"] + c.get("skipped", 0)


# ----------------------------------------------------------------------------------------------- 1. LLaVA JSON


def human_gpt(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.mark.parametrize("flavour", ["llava", "sharegpt4v", "llava_med"])
def test_llava_family_json_builds_with_no_fields(tmp_path, flavour):
    """LLaVA-Instruct, ShareGPT4V and LLaVA-Med say ``"image": "<relative path>"`` with ``<image>`` in the text
    (first or last); text-only turns of the mixes have neither. All of it builds with no ``fields:``."""
    folder = {"llava": "coco/train2017", "sharegpt4v": "sam/images", "llava_med": "pmc"}[flavour]
    (tmp_path / folder).mkdir(parents=True)
    pictures = {f"{folder}/{i}.jpg": jpeg_bytes(color=(i * 50, 9, 9)) for i in range(3)}
    for rel, data in pictures.items():
        (tmp_path / rel).write_bytes(data)
    records = [
        {"id": "a", "image": f"{folder}/0.jpg", "conversations": human_gpt("<image>\nWhat is on the table?", "Food.")},
        {"id": "b", "image": f"{folder}/1.jpg", "conversations": human_gpt("Describe the picture.\n<image>", "Sky.")
         + human_gpt("And the colour?", "Blue.")},
        {"id": "c", "conversations": human_gpt("Name a prime number.", "7")},  # text-only turn of the mix
        {"id": "d", "image": [f"{folder}/0.jpg", f"{folder}/2.jpg"],
         "conversations": human_gpt("<image><image>Compare them.", "Same table.")},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records), encoding="utf-8")
    result = build(tmp_path, {"type": "json", "path": "train.json"})
    got = {r["messages"][-1]["content"]: r for r in written(result)}
    assert result.counts["read"] == result.written == 4 and not rejects(result)
    assert got["Food."]["messages"][0]["content"] == "<image>\nWhat is on the table?"
    assert got["Blue."]["messages"][0]["content"] == "Describe the picture.\n<image>"  # kept where the user put it
    assert image_bytes(result, got["Blue."]) == [pictures[f"{folder}/1.jpg"]]
    assert "images" not in got["7"] or not got["7"]["images"]
    assert image_bytes(result, got["Same table."]) == [pictures[f"{folder}/0.jpg"], pictures[f"{folder}/2.jpg"]]


@pytest.mark.parametrize("key", ["messages", "conversations"])
def test_a_sharegpt_records_top_level_system_prompt_is_its_system_turn(tmp_path, key):
    """LLaMA-Factory's sharegpt keeps the system prompt beside the turns; it used to be dropped without a word."""
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    turns = [{"role": "user", "content": "<image>Findings?"}, {"role": "assistant", "content": "None."}]
    with_system = {key: turns, "system": "You are a radiologist.", "images": ["a.jpg"]}
    own_turn = {key: [{"role": "system", "content": "Own."}, *turns], "system": "Beside.", "images": ["a.jpg"]}
    (tmp_path / "d.json").write_text(json.dumps([with_system, own_turn]))
    result = build(tmp_path, {"type": "json", "path": "d.json"}, system="Recipe default.")
    assert [r["messages"][0] for r in written(result)] == [{"role": "system", "content": "You are a radiologist."},
                                                           {"role": "system", "content": "Own."}]


def test_explicit_image_field_on_llava_json_does_not_count_the_image_twice(tmp_path):
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.jsonl").write_text(json.dumps(
        {"image": "x.jpg", "conversations": human_gpt("<image>What?", "A square.")}) + "\n")
    result = build(tmp_path, {"type": "jsonl", "path": "d.jsonl"}, fields={"image": "image"})
    (record,) = written(result)
    assert len(record["images"]) == 1 and record["messages"][0]["content"] == "<image>What?"


def test_an_image_key_that_is_no_image_reference_stays_a_plain_key(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": 1234, "conversations": human_gpt("Hi", "Hello")}) + "\n")
    result = build(tmp_path, {"type": "jsonl", "path": "d.jsonl"})
    assert result.written == 1 and not written(result)[0].get("images")


@pytest.mark.parametrize("key", ["img", "image_path", "image_file", "picture", "file_name"])
def test_placeholder_mismatch_names_the_unmapped_image_key_and_the_fix(tmp_path, key):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p.png").write_bytes(png_bytes())
    records = [{"id": "r1", key: "imgs/p.png", "conversations": human_gpt("<image>What is it?", "A tile.")},
               {"id": "r2", "conversations": human_gpt("Text only?", "Yes.")}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    result = build(tmp_path, {"type": "json", "path": "d.json"})
    (reject,) = rejects(result)
    assert reject["id"] == "r1" and reject["reason"] == "image key not mapped"
    assert f"key {key!r} looks like the image" in reject["message"]
    assert f"fields.image: {key}" in reject["message"]
    assert result.written == 1  # the text-only record is fine
    fixed = build(tmp_path, {"type": "json", "path": "d.json"}, fields={"image": key})
    assert fixed.written == 2 and not rejects(fixed)


def test_a_list_of_image_paths_under_another_key_suggests_fields_images(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(color=(1, 2, 3)))
    (tmp_path / "d.jsonl").write_text(json.dumps(
        {"pictures": ["a.jpg", "b.jpg"], "messages": [{"role": "user", "content": "<image><image>Same?"},
                                                      {"role": "assistant", "content": "No."}]}) + "\n")
    result = build(tmp_path, {"type": "jsonl", "path": "d.jsonl"})
    assert "fields.images: pictures" in rejects(result)[0]["message"]
    assert build(tmp_path, {"type": "jsonl", "path": "d.jsonl"}, fields={"images": "pictures"}).written == 1


def test_csv_prompt_with_placeholder_and_unmapped_image_column_names_it(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.csv").write_text("image_path,text\na.jpg,x^2\n")
    result = build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"answer": "text"}, prompt="<image>Read it.")
    assert "fields.image: image_path" in rejects(result)[0]["message"]


@pytest.mark.parametrize("mapped", [{"image": "imagepath"}, {}], ids=["misspelt fields.image", "default image"])
def test_a_prompt_over_a_csv_whose_image_column_is_not_mapped_never_writes_text_only_records(tmp_path, mapped):
    """With a prompt and no placeholder, a misnamed image column used to give text-only records, exit code 0."""
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.csv").write_text("image_path,text\na.jpg,hello\n")
    result = build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"answer": "text", **mapped}, prompt="Read it.")
    (reject,) = rejects(result)
    assert reject["reason"] == "image key not mapped" and "fields.image: image_path" in reject["message"]
    assert result.written == 0


def test_a_blank_question_beside_an_image_is_a_reject(tmp_path):
    """A blank question used to pass as the bare ``<image>`` turn when the row had an image (and was rejected as
    an empty user turn when it had none)."""
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.csv").write_text('image,question,answer\na.jpg,,yes\na.jpg,"   ",no\na.jpg,Is it?,yes\n')
    result = build(tmp_path, {"type": "csv", "path": "d.csv"},
                   fields={"image": "image", "question": "question", "answer": "answer"})
    assert [r["reason"] for r in rejects(result)] == ["empty question", "empty question"]
    assert [r["messages"][0]["content"] for r in written(result)] == ["<image>Is it?"]


@pytest.mark.parametrize("prompt", ["Q {text:d}", "{text!r}", "{text:.2f}", "{text:{text}}", "{}"])
def test_a_prompt_placeholder_with_a_format_spec_is_a_recipe_error(tmp_path, prompt):
    """Each used to reject every row as an internal error (a bug to report), or quote the text (``!r``)."""
    (tmp_path / "d.csv").write_text("image,text\na.jpg,hello\n")
    with pytest.raises(RecipeError, match="not a plain column name"):
        build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"answer": "text"}, prompt=prompt)


def test_hf_sharegpt_shape_reads_a_singular_image_column(tmp_path):
    """The ``hf`` source's ``shape`` uses the JSON rules: a LLaVA-style parquet with an ``image`` column builds."""
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": [{"from": datasets.Value("string"),
                                                     "value": datasets.Value("string")}]})
    ds = datasets.Dataset.from_dict({
        "id": ["q1", "q2"], "image": [{"bytes": png_bytes(), "path": None}, None],
        "conversations": [human_gpt("What colour is it?\n<image>", "Blue."), human_gpt("Text only.", "Fine.")]},
        features=features)
    copy = tmp_path / "llava_copy"
    copy.mkdir()
    ds.to_parquet(str(copy / "train-00000-of-00001.parquet"))
    result = build(tmp_path, {"type": "hf", "path": str(copy), "shape": "sharegpt"})
    got = written(result)
    assert result.written == 2 and got[0]["messages"][0]["content"] == "What colour is it?\n<image>"
    assert image_bytes(result, got[0]) == [png_bytes()] and not got[1].get("images")


# ----------------------------------------------------------------------------------------------- 2. labels


def labelled_dataset() -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"]),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=["indoor", "outdoor"])),
                                  "meta": {"kind": datasets.ClassLabel(names=["photo", "drawing"])}})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": jpeg_bytes(color=(i * 60, 0, 0)), "path": None} for i in range(3)],
        "label": [1, 0, -1], "tags": [[0, 1], [1], []], "meta": [{"kind": 0}, {"kind": 1}, {"kind": 0}]},
        features=features)


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_class_labels_are_names_also_in_lists_and_structs(tmp_path, streaming):
    copy = tmp_path / "pets"
    copy.mkdir()
    labelled_dataset().to_parquet(str(copy / "train-00000-of-00001.parquet"))
    source = open_source("hf", {"path": str(copy), "streaming": streaming}, tmp_path)
    rows = list(source.rows())
    assert [r["label"] for r in rows] == ["dog", "cat", None]  # -1 is HF's "no label"
    assert [r["tags"] for r in rows] == [["indoor", "outdoor"], ["outdoor"], []]
    assert [r["meta"]["kind"] for r in rows] == ["photo", "drawing", "photo"]
    result = build(tmp_path, {"type": "hf", "path": str(copy), "streaming": streaming},
                   fields={"image": "image", "answer": "label"}, prompt="Cat or dog?")
    assert [r["messages"][1]["content"] for r in written(result)] == ["dog", "cat"]
    assert [r["reason"] for r in rejects(result)] == ["invalid sample"]  # the unlabelled row: empty answer


def test_where_takes_a_class_label_name(tmp_path):
    copy = tmp_path / "pets"
    copy.mkdir()
    labelled_dataset().to_parquet(str(copy / "train-00000-of-00001.parquet"))
    result = build(tmp_path, {"type": "hf", "path": str(copy), "where": {"label": "dog"}},
                   fields={"image": "image", "answer": "label"}, prompt="Cat or dog?")
    assert [r["messages"][1]["content"] for r in written(result)] == ["dog"]
    assert result.counts["skipped"] == 2 and balanced(result)
    with pytest.raises(SourceError, match=r"'horse'\] is not a class name of that column \(cat, dog\)"):
        build(tmp_path, {"type": "hf", "path": str(copy), "where": {"label": "horse"}}, fields={"answer": "label"})


def write_images(root: Path, rels: list[str]) -> None:
    for i, rel in enumerate(rels):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg_bytes(color=(i * 20 % 255, 40, 40)))


LAYOUTS = {
    "classes": ["cat/1.jpg", "cat/2.jpg", "dog/3.jpg"],
    "split_and_classes": ["train/cat/1.jpg", "train/dog/2.jpg", "test/cat/3.jpg", "validation/dog/4.jpg"],
    "one_class": ["cat/1.jpg", "cat/2.jpg"],
    "mixed_depth": ["cat/1.jpg", "dog/small/2.jpg"],
    "flat": ["1.jpg", "2.jpg"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_imagefolder_labels_follow_the_hf_imagefolder_rule(tmp_path, layout):
    """Same layout, same answer as ``datasets``' own imagefolder: a label column or none, and the same names."""
    root = tmp_path / "pics"
    write_images(root, LAYOUTS[layout])
    hf = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "c"))
    hf_has_label = "label" in next(iter(hf.values())).features
    source = open_source("imagefolder", {"path": str(root)}, tmp_path)
    rows = list(source.rows())
    assert ("label" in rows[0]) == hf_has_label
    if hf_has_label:
        feature = next(iter(hf.values())).features["label"]
        want = sorted(feature.int2str(r["label"]) for split in hf.values() for r in split)
        assert sorted(r["label"] for r in rows) == want
    split_names = {r.get("__split__") for r in rows}
    assert split_names == ({"train", "validation", "test"} if layout == "split_and_classes" else {None})
    assert split_names - {None} <= set(hf)


def test_imagefolder_class_folders_build_a_classification_set(tmp_path):
    root = tmp_path / "pics"
    write_images(root, LAYOUTS["split_and_classes"] + ["stray.jpg"])
    result = build(tmp_path, {"type": "imagefolder", "path": "pics"}, prompt="Which animal is this?")
    answers = [r["messages"][1]["content"] for r in written(result)]
    assert answers == ["cat", "dog", "dog", "cat"]  # train, then validation, then test; sorted within a split
    (stray,) = rejects(result)
    assert stray["id"] == "stray.jpg" and stray["reason"] == "image outside the split folders"
    assert result.counts["read"] == 5 and balanced(result)
    only_test = open_source("imagefolder", {"path": str(root), "split": "test"}, tmp_path)
    assert [(r["file_name"], r["__split__"]) for r in only_test.rows()] == [("test/cat/3.jpg", "test")]


def test_imagefolder_split_folders_go_to_their_build_splits(tmp_path):
    write_images(tmp_path / "pics", LAYOUTS["split_and_classes"])
    result = build(tmp_path, {"type": "imagefolder", "path": "pics"}, prompt="Which animal?",
                   split={"from_source": True})
    assert result.counts["by_split"] == {"train": 2, "val": 1, "test": 1}


def test_imagefolder_root_metadata_over_split_folders_names_each_rows_split(tmp_path):
    root = tmp_path / "pics"
    write_images(root, ["train/a.jpg", "test/b.jpg"])
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file_name": "train/a.jpg", "text": "alpha"}, {"file_name": "test/b.jpg", "text": "beta"}]) + "\n")
    rows = list(open_source("imagefolder", {"path": str(root)}, tmp_path).rows())
    assert [(r["text"], r.get("__split__")) for r in rows] == [("alpha", "train"), ("beta", "test")]


# ----------------------------------------------------------------------------------------------- 3. paths and CSV


def test_windows_paths_in_a_csv_resolve_or_say_why(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "imgs" / "b.jpg").write_bytes(jpeg_bytes(color=(1, 1, 1)))
    lines = ["image,text", "imgs\\a.jpg,first", ".\\imgs\\b.jpg,second", "imgs\\gone.jpg,third",
             "C:\\data\\imgs\\a.jpg,fourth", "..\\..\\etc\\hostname,fifth"]
    (tmp_path / "d.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    result = build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"image": "image", "answer": "text"},
                   prompt="p")
    got = {r["messages"][1]["content"]: r for r in written(result)}
    assert sorted(got) == ["first", "second"]
    assert image_bytes(result, got["first"]) == [(tmp_path / "imgs" / "a.jpg").read_bytes()]
    why = {r["position"]: r for r in rejects(result)}
    assert "uses backslashes" in why[2]["message"] and why[2]["reason"] == "image file not found"
    assert "Windows absolute path" in why[3]["message"] and why[3]["reason"] == "image file not found"
    assert why[4]["reason"] == "image path outside allowed roots"  # ..\..\ is still confined
    assert balanced(result)


def test_an_image_named_in_the_other_unicode_form_is_found_and_a_url_is_a_reject_saying_so(tmp_path):
    """A file saved on macOS (NFD "café") named in NFC by the record (or the reverse) looked missing; a URL was
    reported as a missing file under the image folder."""
    import unicodedata

    (tmp_path / unicodedata.normalize("NFD", "café.jpg")).write_bytes(jpeg_bytes())
    (tmp_path / unicodedata.normalize("NFC", "naïve.jpg")).write_bytes(jpeg_bytes(color=(1, 2, 3)))
    rows = [{"images": [unicodedata.normalize("NFC", "café.jpg")]}, {"images": [unicodedata.normalize("NFD", "naïve.jpg")]},
            {"images": ["https://example.com/a.jpg"]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({**r, "messages": [
        {"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A."}]}) + "\n" for r in rows))
    result = build(tmp_path, {"type": "jsonl", "path": "d.jsonl"})
    assert result.written == 2
    (reject,) = rejects(result)
    assert reject["reason"] == "image is a URL" and "download the images" in reject["message"]


def test_a_placeholder_in_an_answer_is_named_as_such(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.json").write_text(json.dumps([{"image": "a.jpg", "conversations": human_gpt(
        "<image>What is it?", "In the answer <image> a placeholder")}]))
    (reject,) = rejects(build(tmp_path, {"type": "json", "path": "d.json"}))
    assert "2 <image> placeholder(s) but 1 image(s) (1 of them in assistant text" in reject["message"]


def test_backslash_paths_in_json_too(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.png").write_bytes(png_bytes())
    (tmp_path / "d.jsonl").write_text(json.dumps(
        {"images": ["sub\\x.png"], "messages": [{"role": "user", "content": "<image>?"},
                                                {"role": "assistant", "content": "ok"}]}) + "\n")
    result = build(tmp_path, {"type": "jsonl", "path": "d.jsonl"})
    assert image_bytes(result, written(result)[0]) == [png_bytes()]


def test_absolute_paths_outside_are_rejected_with_the_exact_allowed_roots_line(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "imgs"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.jpg").write_bytes(jpeg_bytes())
    data = tmp_path / "project"
    data.mkdir()
    (data / "d.csv").write_text(f"image,text\n{elsewhere / 'a.jpg'},x\n")
    result = build(data, {"type": "csv", "path": "d.csv"}, fields={"image": "image", "answer": "text"}, prompt="p")
    first = rejects(result)[0]
    assert first["reason"] == "image path outside allowed roots"
    assert f"source.allowed_roots: [{os.path.realpath(elsewhere)}]" in first["message"]
    allowed = build(data, {"type": "csv", "path": "d.csv", "allowed_roots": [str(elsewhere)]},
                    fields={"image": "image", "answer": "text"}, prompt="p")
    assert allowed.written == 1


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"image,text\n", "no data rows"),
    (b"image,text\r\n\r\n", "no data rows"),
])
def test_a_csv_without_data_rows_is_an_error_naming_the_file(tmp_path, content, message):
    (tmp_path / "d.csv").write_bytes(content)
    with pytest.raises(SourceError, match=rf"d\.csv: {message}"):
        build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"answer": "text"}, prompt="p")


def test_excels_separator_hint_line_is_named_not_read_as_the_header(tmp_path):
    (tmp_path / "d.csv").write_text("sep=,\r\nimage,text\r\na.jpg,x\r\n")
    with pytest.raises(SourceError, match=r"d\.csv: the first line 'sep=,' is Excel's separator hint"):
        build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"answer": "text"}, prompt="p")


@pytest.mark.parametrize("sep, named", [(";", "semicolon"), ("\t", "tab")])
def test_a_csv_separated_by_another_character_names_the_delimiter_to_set(tmp_path, sep, named):
    """Excel in a comma-decimal locale writes ';' (and 'Unicode text' tabs): the whole header read as one column made
    every row a reject saying the recipe's fields were wrong; now one error names the delimiter to set."""
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.csv").write_text(f"\ufeffimage{sep}text\r\na.jpg{sep}une formule\r\n", encoding="utf-8")
    with pytest.raises(SourceError, match=re.escape(f"looks {named}-separated; set source.delimiter: {sep!r}")):
        build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"image": "image", "answer": "text"}, prompt="p")
    result = build(tmp_path, {"type": "csv", "path": "d.csv", "delimiter": sep},
                   fields={"image": "image", "answer": "text"}, prompt="p")
    assert [r["messages"][1]["content"] for r in written(result)] == ["une formule"]


def test_a_repeated_csv_column_name_is_refused(tmp_path):
    (tmp_path / "d.csv").write_text("image,text,text\na.jpg,one,two\n")
    with pytest.raises(SourceError, match=r"d\.csv: the header repeats column name\(s\) 'text'"):
        build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"answer": "text"}, prompt="p")


@pytest.mark.parametrize("encoding, text", [
    ("utf-8-sig", "résumé 简历"), ("gb18030", "公式二"), ("utf-16", "Zoë 公式"), ("cp1252", "café"),
])
def test_windows_made_csv_crlf_bom_and_code_pages(tmp_path, encoding, text):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.csv").write_bytes(f"image,text\r\na.jpg,{text}\r\n".encode(encoding))
    source = {"type": "csv", "path": "d.csv", **({"encoding": "cp1252"} if encoding == "cp1252" else {})}
    result = build(tmp_path, source, fields={"image": "image", "answer": "text"}, prompt="p")
    assert [r["messages"][1]["content"] for r in written(result)] == [text]


def test_a_western_csv_is_not_misread_as_chinese(tmp_path):
    """cp1252 bytes for "résumé" also decode as GB18030: auto refuses with the fix instead of writing mojibake."""
    (tmp_path / "d.csv").write_bytes("image,text\r\na.jpg,résumé déjà vu\r\n".encode("cp1252"))
    with pytest.raises(SourceError, match=r"d\.csv: neither UTF-8 nor GB18030.*source\.encoding: cp1252"):
        build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"image": "image", "answer": "text"}, prompt="p")


def test_a_utf8_csv_with_one_damaged_character_is_refused_at_that_byte_not_read_as_chinese(tmp_path):
    """GB18030 decodes nearly any bytes: a UTF-8 Chinese file cut inside its last character used to be written whole
    as mojibake (这是 -> 杩欐槸), exit code 0."""
    text = "".join(f"a.jpg,这是第{i}只小猫\n" for i in range(4)).encode()
    (tmp_path / "d.csv").write_bytes(b"image,text\n" + text[:-3] + b"\n")
    with pytest.raises(SourceError, match=rf"d\.csv: UTF-8 text, but not valid UTF-8 at byte {11 + len(text) - 4} "
                                          r"\(line 5\)"):
        build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"image": "image", "answer": "text"}, prompt="p")


@pytest.mark.parametrize("encoding", ["auto", "cp1252"])
def test_a_csv_with_a_utf8_bom_and_a_stray_code_page_byte_is_refused(tmp_path, encoding):
    """Excel's "CSV UTF-8" with one pasted cp1252 byte. Read as cp1252 (what the hint used to lead to) the BOM
    became part of the first column's name, the mapped image column went missing and every record lost its image."""
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbfimage,text\r\na.jpg,caf\xe9\r\na.jpg,ok\r\n")
    source = {"type": "csv", "path": "d.csv", **({"encoding": encoding} if encoding != "auto" else {})}
    message = "not valid UTF-8 at byte 24 \\(line 2\\)" if encoding == "auto" else "starts with a UTF-8 byte-order mark"
    with pytest.raises(SourceError, match=message):
        build(tmp_path, source, fields={"image": "image", "answer": "text"}, prompt="p")


# ----------------------------------------------------------------------------------------------- 4. in memory


@pytest.fixture
def frame(tmp_path, monkeypatch):
    """A notebook's DataFrame: images as a path (relative to the current directory), bytes, PIL and an HF dict."""
    monkeypatch.chdir(tmp_path)
    Path("imgs").mkdir()
    Path("imgs/a.jpg").write_bytes(jpeg_bytes())
    pil = Image.new("RGB", (8, 6), (5, 200, 5))
    return pd.DataFrame({
        "image": ["imgs/a.jpg", png_bytes(), pil, {"bytes": jpeg_bytes(color=(0, 0, 250)), "path": None},
                  "imgs/missing.jpg"],
        "question": ["What?", "Which?", "Colour?", "Hue?", "Lost?"],
        "caption": ["a red box", "a blue tile", "green", "blue", "never written"],
        "score": [1, 2, 3, 4, 5],
    })


def test_a_dataframe_builds_and_rebuilds_up_to_date(tmp_path, frame):
    result = mmdata.build(frame, output__dir="out", fields__answer="caption", num_proc=1)
    got = written(result, "dataset")
    assert result.counts["read"] == 5 and result.written == 4
    assert [r["messages"] for r in got][0] == [{"role": "user", "content": "<image>What?"},
                                               {"role": "assistant", "content": "a red box"}]
    assert image_bytes(result, got[0]) == [Path("imgs/a.jpg").read_bytes()]
    assert image_bytes(result, got[1]) == [png_bytes()]
    assert Image.open(result.output_dir / got[2]["images"][0]).getpixel((0, 0)) == (5, 200, 5)
    assert [r["reason"] for r in rejects(result)] == ["image file not found"]
    again = mmdata.build(frame.copy(), output__dir="out", fields__answer="caption", num_proc=1)
    assert again.up_to_date
    changed = frame.copy()
    changed.loc[0, "caption"] = "a crimson box"
    rebuilt = mmdata.build(changed, output__dir="out", fields__answer="caption", num_proc=1)
    assert not rebuilt.up_to_date and written(rebuilt, "dataset")[0]["messages"][1]["content"] == "a crimson box"


def test_a_dataframe_integer_column_with_a_missing_cell_is_written_as_integers(tmp_path, monkeypatch):
    """pandas stores ``[3, NaN, 2]`` as floats: the answers used to be written "3.0" and "2.0"."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    Path("a.jpg").write_bytes(jpeg_bytes())
    df = pd.DataFrame({"image": ["a.jpg"] * 4, "question": ["How many?"] * 4, "answer": [3, np.nan, 2, 10**12],
                       "ratio": [0.5, 2.0, 1.0, 3.0]})
    result = mmdata.build(df, output__dir="out", num_proc=1)
    assert [r["messages"][1]["content"] for r in written(result, *result.datasets)] == ["3", "2", "1000000000000"]
    both = mmdata.build(df, output__dir="out2", fields__answer="ratio", num_proc=1)  # real floats stay floats
    assert [r["messages"][1]["content"] for r in written(both, *both.datasets)] == ["0.5", "2.0", "1.0", "3.0"]


def test_a_dataframe_builds_in_forked_workers_under_its_own_name(tmp_path, frame):
    result = mmdata.build(frame.iloc[:4], output__dir="out", fields__answer="caption", name="notebook",
                          output__shard_size=1, num_proc=2)
    assert result.written == 4 and set(result.datasets) == {"notebook"}


def test_a_hf_dataset_builds_with_label_names_and_rebuilds_up_to_date(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = labelled_dataset()
    result = mmdata.build(ds, output__dir="out", fields__answer="label", prompt="Cat or dog?", num_proc=1)
    assert [r["messages"][1]["content"] for r in written(result, "dataset")] == ["dog", "cat"]
    assert result.counts["read"] == 3 and result.rejected == 1
    assert mmdata.build(ds, output__dir="out", fields__answer="label", prompt="Cat or dog?", num_proc=1).up_to_date


def test_in_memory_data_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=r"build one, e\.g\. mmdata\.build\(data\['train'\]"):
        mmdata.build(datasets.DatasetDict({"train": labelled_dataset()}), output__dir="out")
    with pytest.raises(RecipeError, match="output__dir"):
        mmdata.build(pd.DataFrame({"question": ["q"], "answer": ["a"]}))
    with pytest.raises(RecipeError, match="got a builtins.list"):
        mmdata.build([{"question": "q"}], output__dir="out")


# ----------------------------------------------------------------------------------------------- 5. confinement


@pytest.fixture
def captioned(tmp_path):
    """Three captioned images; ``secret.txt`` lies outside the folder."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes())
        (folder / f"{name}.txt").write_text(f"caption {name}")
    (tmp_path / "secret.txt").write_text("API_KEY=hunter2")
    return folder


def all_output_text(result) -> str:
    return "\n".join(p.read_text(errors="replace") for p in result.output_dir.rglob("*")
                     if p.is_file() and p.suffix in (".jsonl", ".json"))


def test_a_caption_symlinked_outside_is_that_rows_reject_and_never_read(tmp_path, captioned):
    (captioned / "b.txt").unlink()
    (captioned / "b.txt").symlink_to(tmp_path / "secret.txt")
    result = build(tmp_path, {"type": "imagefolder", "path": "pics"}, prompt="Describe.")
    assert [r["messages"][1]["content"] for r in written(result)] == ["caption a", "caption c"]
    (reject,) = rejects(result)
    assert reject["id"] == "b.jpg" and reject["reason"] == "caption file outside allowed roots"
    assert "hunter2" not in all_output_text(result)
    allowed = build(tmp_path, {"type": "imagefolder", "path": "pics", "allowed_roots": [str(tmp_path)]},
                    prompt="Describe.")
    assert allowed.written == 3  # the recipe allowed that folder


@pytest.mark.parametrize("problem", ["not_utf8", "huge", "fifo"])
def test_a_bad_caption_file_is_that_rows_reject(tmp_path, captioned, problem):
    caption = captioned / "b.txt"
    if problem == "not_utf8":
        caption.write_bytes("caption \xe9".encode("latin-1"))
    elif problem == "huge":
        caption.write_bytes(b"x" * ((1 << 20) + 1))
    else:
        caption.unlink()
        os.mkfifo(caption)
    started = time.monotonic()
    result = build(tmp_path, {"type": "imagefolder", "path": "pics"}, prompt="Describe.")
    assert time.monotonic() - started < 60  # a FIFO caption must not block the build
    assert result.written == 2
    (reject,) = rejects(result)
    assert reject["id"] == "b.jpg" and reject["reason"] == "caption unreadable" and "b.txt" in reject["message"]


def test_metadata_file_symlinked_outside_is_a_source_error(tmp_path, captioned):
    (tmp_path / "outside.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "x"}) + "\n")
    (captioned / "metadata.jsonl").symlink_to(tmp_path / "outside.jsonl")
    with pytest.raises(SourceError, match=r"metadata file .*metadata\.jsonl' resolves outside the allowed folders"):
        build(tmp_path, {"type": "imagefolder", "path": "pics"}, prompt="Describe.")


def test_bad_metadata_lines_are_rejects_not_a_crash(tmp_path, captioned):
    lines = [json.dumps({"file_name": "a.jpg", "text": "alpha"}), "{not json", json.dumps({"text": "no file"}),
             json.dumps({"file_name": "c.jpg", "text": "gamma"})]
    (captioned / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    result = build(tmp_path, {"type": "imagefolder", "path": "pics"}, prompt="Describe.")
    assert [r["messages"][1]["content"] for r in written(result)] == ["alpha", "gamma"]
    assert [r["reason"] for r in rejects(result)] == ["bad metadata row", "bad metadata row"]
    assert "metadata.jsonl line 2: invalid JSON" in rejects(result)[0]["message"]
    assert result.counts["read"] == 4


def test_a_metadata_csv_from_windows_reads_with_true_line_numbers(tmp_path, captioned):
    """A cp1252 metadata.csv could not be read at all (no encoding option), and a caption spanning lines made every
    later reject name the wrong line."""
    (captioned / "metadata.csv").write_bytes(
        'file_name,text\r\na.jpg,"café\r\non two lines"\r\n,no file\r\nc.jpg,gamma,extra\r\nc.jpg,gamma\r\n,\r\n'
        .encode("cp1252"))
    with pytest.raises(SourceError, match="source.encoding: cp1252"):
        build(tmp_path, {"type": "imagefolder", "path": "pics"}, prompt="Describe.")
    result = build(tmp_path, {"type": "imagefolder", "path": "pics", "encoding": "cp1252"}, prompt="Describe.")
    assert [r["messages"][1]["content"] for r in written(result)] == ["café\r\non two lines", "gamma"]
    assert [r["message"].split(":")[0] for r in rejects(result)] == ["metadata.csv line 4", "metadata.csv line 5",
                                                                    "metadata.csv line 7"]  # ",": a row, no file_name
    assert "3 fields but the header has 2" in rejects(result)[1]["message"]


def test_a_json_file_symlinked_into_a_folder_source_is_refused(tmp_path):
    folder = tmp_path / "jsons"
    folder.mkdir()
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (folder / "a.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "private.jsonl").write_text(json.dumps(record) + "\n")
    (folder / "b.jsonl").symlink_to(tmp_path / "private.jsonl")
    with pytest.raises(SourceError, match=r"JSON file .*b\.jsonl' resolves outside .*source\.allowed_roots"):
        build(tmp_path, {"type": "jsonl", "path": "jsons"})
    assert build(tmp_path, {"type": "jsonl", "path": "jsons", "allowed_roots": [str(tmp_path)]}).written == 2


# ----------------------------------------------------------------------------------------------- 6. hf source


def hub_copy(root: Path, splits: dict[str, datasets.Dataset], config: str = "default") -> Path:
    card = {"configs": [{"config_name": config, "data_files": [{"split": s, "path": f"{config}/{s}-*"}
                                                               for s in splits]}]}
    (root / config).mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\n" + yaml.safe_dump(card) + "---\n")
    for split, ds in splits.items():
        ds.to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    return root


def qa(n: int, start: int = 0, **extra) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"q": [f"q{i}" for i in range(start, start + n)],
                                       "a": [f"a{i}" for i in range(start, start + n)], **extra})


QA_FIELDS = {"question": "q", "answer": "a"}


def test_a_local_copy_rewritten_in_place_builds_the_new_rows(tmp_path):
    copy = hub_copy(tmp_path / "copy", {"train": qa(2)})
    first = build(tmp_path, {"type": "hf", "path": str(copy)}, fields=QA_FIELDS)
    assert first.written == 2
    qa(3, start=10).to_parquet(str(copy / "default" / "train-00000-of-00001.parquet"))
    second = build(tmp_path, {"type": "hf", "path": str(copy)}, fields=QA_FIELDS)
    assert not second.up_to_date
    assert [r["messages"][1]["content"] for r in written(second)] == ["a10", "a11", "a12"]
    assert build(tmp_path, {"type": "hf", "path": str(copy)}, fields=QA_FIELDS).up_to_date


def test_rebuild_rereads_a_local_copy_changed_behind_the_stamps_back(tmp_path):
    """Same size, same mtime, other rows (a copy tool that keeps times): only ``rebuild`` can tell; it re-prepares."""
    copy = hub_copy(tmp_path / "copy", {"train": qa(2)})
    shard = copy / "default" / "train-00000-of-00001.parquet"
    assert build(tmp_path, {"type": "hf", "path": str(copy)}, fields=QA_FIELDS).written == 2
    stat = shard.stat()
    qa(2, start=5).to_parquet(str(shard))
    assert shard.stat().st_size == stat.st_size
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build(tmp_path, {"type": "hf", "path": str(copy)}, fields=QA_FIELDS).up_to_date
    recipe = tmp_path / "recipe.yaml"
    rebuilt = mmdata.build(str(recipe), num_proc=1, rebuild=True)
    assert [r["messages"][1]["content"] for r in written(rebuilt)] == ["a5", "a6"]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".jsonl", ".arrow"])
def test_a_single_local_data_file(tmp_path, suffix):
    ds = qa(3)
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        ds.to_parquet(str(path))
    elif suffix == ".csv":
        ds.to_csv(str(path), index=False)
    elif suffix in (".json", ".jsonl"):
        ds.to_json(str(path), lines=True)
    else:
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ds.data.schema) as writer:
            writer.write_table(ds.data.table)
    result = build(tmp_path, {"type": "hf", "path": path.name}, fields=QA_FIELDS)
    assert [r["messages"][1]["content"] for r in written(result)] == ["a0", "a1", "a2"]


@pytest.mark.parametrize("where", ["data.csv", "copy/data/train.csv"], ids=["one file", "hub-layout folder"])
def test_hf_over_csv_keeps_every_cell_as_the_text_in_the_file(tmp_path, where):
    """pandas' defaults, which ``datasets``' csv builder passes on, made "None"/"NA"/"null"/"N/A" empty answers
    (rejects) and "007" a "7.0" without a word; the csv source always read them as text."""
    answers = ["None", "NA", "null", "N/A", "007", "1.50"]
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("question,answer\n" + "".join(f"q{i},{a}\n" for i, a in enumerate(answers)))
    source = {"type": "hf", "path": where if where.endswith(".csv") and "/" not in where else "copy"}
    result = build(tmp_path, source, fields={"question": "question", "answer": "answer"})
    assert [r["messages"][1]["content"] for r in written(result)] == answers and not rejects(result)


def test_hf_over_a_csv_with_an_index_column_and_a_numeric_where(tmp_path):
    """df.to_csv() writes a blank first header (pandas reads it as "Unnamed: 0"): declaring the header names as
    they stand failed the whole build. A CSV read as text holds "2020": where year: 2020, or the text 2020 of a
    --set, matched nothing."""
    pd.DataFrame({"question": ["q1", "q2", "q3"], "answer": ["a", "b", "c"], "year": [2020, 2021, 2020]}).to_csv(
        tmp_path / "with_index.csv")
    result = build(tmp_path, {"type": "hf", "path": "with_index.csv", "where": {"year": 2020}},
                   fields={"question": "question", "answer": "answer"})
    assert [r["messages"][1]["content"] for r in written(result)] == ["a", "c"]
    recipe = write_recipe(tmp_path / "w.yaml", {"name": "t", "source": {"type": "hf", "path": "with_index.csv"},
                                                "fields": {"question": "question", "answer": "answer"},
                                                "output": {"dir": str(tmp_path / "w")}})
    loaded = mmdata.load_recipe(str(recipe), {"source.where.year": "2021"}, from_text=True)
    assert [r["messages"][1]["content"] for r in written(mmdata.build(loaded, num_proc=1))] == ["b"]


def test_offline_hub_auto_fails_fast_with_one_line_per_hub(tmp_path, monkeypatch):
    MsDataset = pytest.importorskip("modelscope.msdatasets").MsDataset  # noqa: N806

    def never(*args, **kwargs):
        raise AssertionError("no hub client may run when the hub is unreachable")

    monkeypatch.setattr(hf_source, "hub_unreachable", lambda hub: f"no connection to {hub}.example:443 within 3 s")
    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.setattr(MsDataset, "load", staticmethod(never))
    started = time.monotonic()
    with pytest.raises(SourceError) as info:
        mmdata.build("latex_ocr", output__dir=str(tmp_path / "o"), num_proc=1)
    assert time.monotonic() - started < 10
    lines = str(info.value).splitlines()
    assert lines[0] == "hub: auto tried both hubs and both failed:"
    assert lines[1].strip().startswith("modelscope: cannot reach the hub for dataset 'AI-ModelScope/LaTeX_OCR'")
    assert lines[2].strip().startswith("hf: cannot reach the hub for dataset 'linxy/LaTeX_OCR'")
    assert "latex_ocr_sample" in lines[3] and "source.path" in lines[3]


def test_offline_single_hub_is_one_line_with_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_source, "hub_unreachable", lambda hub: "no connection within 3 s")
    with pytest.raises(SourceError) as info:
        mmdata.build("vqa_rad", output__dir=str(tmp_path / "o"), num_proc=1)
    text = str(info.value)
    assert "\n" not in text and text.startswith("hf: cannot reach the hub for dataset 'flaviagiammarino/vqa-rad'")
    assert "latex_ocr_sample" in text and "source.path" in text


def test_hf_hub_offline_skips_the_check_so_the_cache_can_answer(tmp_path, monkeypatch):
    def checked(hub):
        raise AssertionError("HF_HUB_OFFLINE=1 must not be second-guessed")

    monkeypatch.setattr(hf_source, "hub_unreachable", checked)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="hf: cannot reach the hub"):  # the empty cache: datasets' own answer
        mmdata.build("vqa_rad", output__dir=str(tmp_path / "o"), num_proc=1)


def test_the_hub_check_is_one_tcp_connect(monkeypatch):
    """Against a local listening socket: reachable; against a closed port: the reason. No real network."""
    monkeypatch.undo()  # the real check
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hf_source.hub_unreachable("hf") is None
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert f"no connection to 127.0.0.1:{port}" in hf_source.hub_unreachable("hf")


def where_copy(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """train: 7 rows, validation: 5; ``lang`` en/zh mixed so ``where: {lang: en}`` drops rows in both splits."""
    train_lang = ["zh", "en", "zh", "zh", "en", "en", "zh"]
    val_lang = ["en", "zh", "en", "zh", "zh"]
    copy = hub_copy(tmp_path / "copy", {"train": qa(7, lang=train_lang), "validation": qa(5, 100, lang=val_lang)})
    return copy, train_lang, val_lang


@pytest.mark.parametrize("streaming", [False, True])
def test_where_drops_are_counted_up_to_the_rows_read(tmp_path, streaming):
    copy, train_lang, val_lang = where_copy(tmp_path)
    langs = train_lang + val_lang
    params = {"path": str(copy), "split": ["train", "validation"], "where": {"lang": "en"}, "streaming": streaming}
    source = open_source("hf", params, tmp_path)
    kept = [i for i, lang in enumerate(langs) if lang == "en"]
    dropped = len(langs) - len(kept)
    for n in range(1, len(kept) + 1):
        rows = list(zip(range(n), source.rows(), strict=False))  # read n rows and stop, as max_samples does
        assert len(rows) == n
        before_nth = kept[n - 1] + 1 - n  # rows dropped before the n-th kept row
        if streaming:  # counted while reading: what was read so far
            assert source.skipped() == {"where": before_nth}, n
        else:  # by position: up to the n-th kept row, all of them once every row was taken
            assert source.skipped(n) == {"where": dropped if n == len(kept) else before_nth}, n
    assert len(list(source.rows())) == len(kept)  # read to the end
    assert source.skipped(None) == {"where": dropped}


def test_where_drops_make_the_build_balance(tmp_path):
    copy, train_lang, val_lang = where_copy(tmp_path)
    source = {"type": "hf", "path": str(copy), "split": ["train", "validation"], "where": {"lang": "en"}}
    result = build(tmp_path, source, fields=QA_FIELDS)
    assert result.counts["skipped"] == 7 and result.written == 5 and result.counts["read"] == 12
    limited = build(tmp_path, source, fields=QA_FIELDS, max_samples=2)  # kept rows 1 and 4: 3 drops before them
    assert limited.written == 2 and limited.counts["skipped"] == 3 and balanced(limited)


def test_a_mixture_counts_its_components_where_drops(tmp_path):
    copy, train_lang, val_lang = where_copy(tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    components = [
        {"name": "vqa", "count": 2, "fields": QA_FIELDS,
         "source": {"type": "hf", "path": str(copy), "split": ["train", "validation"], "where": {"lang": "en"}}},
        {"name": "chat", "count": 1, "source": {"type": "jsonl", "path": str(tmp_path / "d.jsonl")}}]
    result = build(tmp_path, {"type": "mixture", "components": components})
    assert result.written == 3 and result.counts["skipped"] == 3 and balanced(result)  # 3 drops before kept row 2


def test_a_list_of_splits_is_their_rows_in_order_each_with_its_split(tmp_path):
    copy = hub_copy(tmp_path / "copy", {"train": qa(3), "validation": qa(2, 10), "test": qa(2, 20)})
    source = open_source("hf", {"path": str(copy), "split": ["test", "train"]}, tmp_path)
    rows = list(source.rows())
    assert [(r["a"], r["__split__"]) for r in rows] == [("a20", "test"), ("a21", "test"), ("a0", "train"),
                                                        ("a1", "train"), ("a2", "train")]
    assert source.num_rows() == 5 and source.random_access
    assert list(source.read_rows(1, 4)) == rows[1:4]  # a range across the split boundary
    assert [(r["a"], r["__split__"]) for r in source.rows()] == [(r["a"], r["__split__"]) for r in rows]
    result = build(tmp_path, {"type": "hf", "path": str(copy), "split": ["train", "validation", "test"]},
                   fields=QA_FIELDS, split={"from_source": True})
    assert result.counts["by_split"] == {"train": 3, "val": 2, "test": 2}
    # one source split on purpose (an eval set): no "no record went to train" warning
    val_only = build(tmp_path / "v", {"type": "hf", "path": str(copy), "split": "validation"}, fields=QA_FIELDS,
                     split={"from_source": True})
    assert val_only.counts["by_split"] == {"val": 2} and not val_only.warnings


def test_rejects_say_where_the_row_is_file_and_line_or_hub_split(tmp_path):
    """``position`` counts rows across every file of a folder source (or every split): a reject without its file,
    line or split sent people counting records by hand."""
    data = tmp_path / "data"
    data.mkdir()
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (data / "a.json").write_text(json.dumps([good, {"foo": 1}]))
    (data / "b.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"foo": 2}) + "\n{broken\n")
    result = build(tmp_path, {"type": "json", "path": "data"})
    assert [(r["position"], r["where"], r["reason"]) for r in rejects(result)] == [
        (1, "a.json [1]", "bad record shape"), (3, "b.jsonl line 2", "bad record shape"),
        (4, "b.jsonl line 3", "invalid JSON")]
    copy = hub_copy(tmp_path / "copy", {"train": qa(2), "validation": qa(2, 10).map(
        lambda r: {"a": "" if r["a"] == "a11" else r["a"]})})
    split_result = build(tmp_path / "hub", {"type": "hf", "path": str(copy), "split": ["train", "validation"]},
                         fields=QA_FIELDS, split={"from_source": True})
    assert [(r["position"], r["split"]) for r in rejects(split_result)] == [(3, "validation")]


def test_a_missing_image_names_the_archive_beside_the_data(tmp_path):
    """SLAKE ships imgs.zip beside its JSON: every row was "image file not found", and the build blamed the recipe."""
    (tmp_path / "imgs.zip").write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    (tmp_path / "train.json").write_text(json.dumps([{"img_name": "xmlab1/source.jpg", "question": "q?",
                                                        "answer": "a"}]))
    result = build(tmp_path, {"type": "hf", "path": "train.json", "image_root": "imgs"},
                   fields={"image": "img_name", "question": "question", "answer": "answer"})
    assert "(imgs.zip lies near it: extract the images first)" in rejects(result)[0]["message"]


def test_builtin_recipes_with_hub_splits_build_from_a_local_copy(tmp_path):
    vqa = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                             "answer": datasets.Value("string")})

    def rows(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"image": [{"bytes": jpeg_bytes(), "path": None}] * n,
                                           "question": ["Is there a fracture?"] * n, "answer": ["no"] * n},
                                          features=vqa)

    copy = tmp_path / "flaviagiammarino--vqa-rad"
    (copy / "data").mkdir(parents=True)
    rows(3).to_parquet(str(copy / "data" / "train-00000-of-00001.parquet"))
    rows(2).to_parquet(str(copy / "data" / "test-00000-of-00001.parquet"))
    result = mmdata.build("vqa_rad", num_proc=1, **{"source.path": str(copy), "output.dir": str(tmp_path / "o")})
    assert result.counts["by_split"] == {"train": 3, "test": 2}


# ----------------------------------------------------------------------------------------------- 7. image_join


@pytest.fixture
def joined(tmp_path):
    """Metadata for 6 images; ``part_0.tar`` holds img_0..2 intact, ``part_1`` holds img_3..5 but is cut short."""
    images = {f"img_{i}.jpg": jpeg_bytes(size=(64, 64), color=(i * 40, 5, 5)) for i in range(6)}
    meta = tmp_path / "meta"
    meta.mkdir()
    datasets.Dataset.from_list([{"file_name": n, "caption": f"caption {n}"} for n in images]).to_parquet(
        str(meta / "train-00000-of-00001.parquet"))
    return meta, images


SHARD_CASES = {
    "tar": lambda data: data[:512 + 300],  # the first member's header and part of its bytes
    "tar.zst": lambda data: zstandard.ZstdCompressor().compress(data)[:-40],
    "tar.zst_unreadable": lambda data: zstandard.ZstdCompressor().compress(data)[:12],
    "tar_empty": lambda data: b"",
}


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_a_damaged_shard_is_named_and_its_rows_are_rejects(tmp_path, joined, case):
    meta, images = joined
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part_0.tar").write_bytes(tar_bytes({n: images[n] for n in ("img_0.jpg", "img_1.jpg", "img_2.jpg")}))
    damaged = shards / ("part_1.tar.zst" if case.startswith("tar.zst") else "part_1.tar")
    damaged.write_bytes(SHARD_CASES[case](tar_bytes({n: images[n] for n in ("img_3.jpg", "img_4.jpg", "img_5.jpg")})))
    result = build(tmp_path, {"type": "image_join", "path": str(meta), "image_root": "shards"},
                   fields={"image": "image", "answer": "caption", "id": "file_name"}, prompt="<image>Describe.")
    got = {r["messages"][1]["content"].removeprefix("caption ") for r in written(result)}
    assert {"img_0.jpg", "img_1.jpg", "img_2.jpg"} <= got
    for record in written(result):
        assert image_bytes(result, record) == [images[record["messages"][1]["content"].removeprefix("caption ")]]
    missing = rejects(result)
    assert missing and {r["id"] for r in missing} == {f"img_{i}.jpg" for i in range(6)} - got
    for reject in missing:
        assert reject["reason"] == "image missing" and str(damaged) in reject["message"]
        assert ("is empty" if case == "tar_empty" else "truncated or corrupt") in reject["message"]
    assert result.counts["read"] == 6 and balanced(result)


def test_image_join_image_root_is_relative_to_the_recipe_folder(tmp_path, joined):
    meta, images = joined
    recipes = tmp_path / "recipes"
    (tmp_path / "extracted").mkdir()
    for name, data in images.items():
        (tmp_path / "extracted" / name).write_bytes(data)
    (meta / "extracted").mkdir()  # the same name beside the metadata must not be what is read
    result = build(tmp_path, {"type": "image_join", "path": str(meta), "image_root": "../extracted"},
                   recipe_dir=recipes, fields={"image": "image", "answer": "caption"}, prompt="<image>Describe.")
    assert result.written == 6
    with pytest.raises(SourceError, match=r"source\.image_root is needed"):
        build(tmp_path, {"type": "image_join", "path": str(meta)}, fields={"answer": "caption"})


def test_image_join_over_several_splits_keeps_each_rows_split(tmp_path):
    images = {f"{s}_{i}.jpg": jpeg_bytes(color=(i * 9, 1, 1)) for s in ("train", "test") for i in range(2)}
    meta = hub_copy(tmp_path / "meta", {
        s: datasets.Dataset.from_list([{"file_name": f"{s}_{i}.jpg", "caption": f"{s} {i}"} for i in range(2)])
        for s in ("train", "test")})
    (tmp_path / "shard.tar").write_bytes(tar_bytes(images))
    source = {"type": "image_join", "path": str(meta), "split": ["train", "test"], "image_root": "shard.tar"}
    rows = list(open_source(source["type"], {k: v for k, v in source.items() if k != "type"}, tmp_path).rows())
    assert [(r["file_name"], r["__split__"]) for r in rows] == [(n, n.split("_")[0]) for n in images]
    result = build(tmp_path, source, fields={"image": "image", "answer": "caption"}, prompt="<image>Describe.",
                   split={"from_source": True})
    assert result.counts["by_split"] == {"train": 2, "test": 2}


def test_a_shard_symlinked_outside_the_image_root_is_refused(tmp_path, joined):
    meta, images = joined
    (tmp_path / "shards").mkdir()
    (tmp_path / "elsewhere.tar").write_bytes(tar_bytes(images))
    (tmp_path / "shards" / "part_0.tar").symlink_to(tmp_path / "elsewhere.tar")
    with pytest.raises(SourceError, match=r"image shard .*part_0\.tar' resolves outside the allowed folders"):
        build(tmp_path, {"type": "image_join", "path": str(meta), "image_root": "shards"},
              fields={"image": "image", "answer": "caption"}, prompt="<image>Describe.")


@pytest.mark.parametrize("file_name", ["train.json", "train.jsonl"])
def test_a_flat_slake_shaped_json_builds_when_its_columns_are_mapped(tmp_path, file_name):
    """SLAKE's train.json is a list of plain records (img_name, question, answer, q_lang...). With fields mapping
    the columns they build as CSV rows do (every row was rejected `bad record shape`, also with `shape: alpaca`);
    without the mapping the reject says which fields to set."""
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(color=(40 * i, 90, 120)))
        rows.append({"img_id": i, "img_name": f"imgs/{i}.jpg", "question": f"Which organ, {i}?",
                     "answer": f"Liver {i}", "q_lang": "en", "content_type": "Organ"})
    text = json.dumps(rows) if file_name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / file_name).write_text(text)
    mapped = build(tmp_path / "mapped", {"type": "json", "path": str(tmp_path / file_name)},
                   fields={"image": "img_name", "question": "question", "answer": "answer"})
    records = written(mapped)
    assert [r["messages"][1]["content"] for r in records] == ["Liver 0", "Liver 1", "Liver 2"]
    assert records[0]["messages"][0]["content"] == "<image>Which organ, 0?"
    assert image_bytes(mapped, records[2]) == [(tmp_path / "imgs" / "2.jpg").read_bytes()]
    unmapped = build(tmp_path / "unmapped", {"type": "json", "path": str(tmp_path / file_name)})
    assert unmapped.written == 0 and balanced(unmapped)
    assert {r["reason"] for r in rejects(unmapped)} == {"bad record shape"}
    assert "fields.answer" in rejects(unmapped)[0]["message"] and "img_name" in rejects(unmapped)[0]["message"]


def test_a_build_whose_every_image_is_missing_points_at_image_root_not_at_the_fields(tmp_path):
    """LLaVA's JSON in ann/ with the images in a sibling folder: every row is `image file not found`, and the message
    used to blame the recipe's field names."""
    data = tmp_path / "data"
    (data / "ann").mkdir(parents=True)
    (data / "coco").mkdir()
    (data / "coco" / "000.jpg").write_bytes(jpeg_bytes())
    rows = [{"id": "0", "image": "coco/000.jpg", "conversations": human_gpt("<image>\nWhat is it?", "A cat.")}]
    (data / "ann" / "llava.json").write_text(json.dumps(rows))
    with pytest.warns(mmdata.BuildWarning, match="source.image_root"):
        result = build(tmp_path / "b", {"type": "json", "path": str(data / "ann" / "llava.json")})
    assert result.written == 0 and "field name" not in result.problem
    fixed = build(tmp_path / "c", {"type": "json", "path": str(data / "ann" / "llava.json"), "image_root": str(data)})
    assert fixed.written == 1


def test_a_csv_reject_says_which_data_row_it_is(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.csv").write_text('image,text\r\na.jpg,"two\r\nlines"\r\nmissing.jpg,x\r\n')
    result = build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"image": "image", "answer": "text"},
                   prompt="p")
    assert [(r["position"], r["where"]) for r in rejects(result)] == [(1, "d.csv row 2")]


def test_a_dataframe_build_with_a_misspelled_output_key_names_the_typo(tmp_path):
    frame = pd.DataFrame({"question": ["q"], "answer": ["a"]})
    with pytest.raises(RecipeError, match=r"unknown key 'output.dri'; did you mean 'output.dir'"):
        mmdata.build(frame, output__dri=str(tmp_path / "o"))
    with pytest.raises(RecipeError, match="say where to write"):
        mmdata.build(frame)
