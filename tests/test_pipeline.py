"""End-to-end builds: what lands on disk, what is rejected and why, and the counts that tie them together."""

import json
import os
import re
import shutil

import pytest
from tests.conftest import LLAMAFACTORY_INFO, jpeg_bytes, read_jsonl_dir, write_recipe

import mmdata
from mmdata.cli import main
from mmdata.errors import BuildError, DatasetInfoError, RecipeError

TUTORIAL_RECIPE = """\
name: latex_ocr_csv
description: LaTeX OCR pairs from a CSV with columns image_path,text
source:
  type: csv
  path: latex_ocr_train.csv
fields:
  image: image_path
  answer: text
prompt: "你是一个LaText OCR助手,目标是读取用户输入的照片,转换成LaTex公式。"
split:
  val: 1
  seed: 42
output:
  dir: out/latex_ocr_csv
  format: sharegpt
"""


@pytest.fixture
def tutorial_recipe(csv_dataset):
    path = csv_dataset / "recipe.yaml"
    path.write_text(TUTORIAL_RECIPE, encoding="utf-8")
    return path


def test_tutorial_recipe_builds_as_written(tutorial_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(tutorial_recipe), "--quiet"]) == 0
    out = tmp_path / "out" / "latex_ocr_csv"  # output.dir is relative to the current directory
    assert sorted(p.name for p in out.iterdir()) == [
        ".dataset_info.json.lock", ".mmdata", "dataset_info.json", "images", "latex_ocr_csv_train", "latex_ocr_csv_val", "mmdata_build.json",
        "rejects.jsonl"]
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"latex_ocr_csv_train", "latex_ocr_csv_val"}
    train = read_jsonl_dir(out / info["latex_ocr_csv_train"]["file_name"])
    val = read_jsonl_dir(out / info["latex_ocr_csv_val"]["file_name"])
    assert (len(train), len(val)) == (3, 1)
    for record in train + val:
        assert record["messages"][0]["content"].startswith("<image>你是一个LaText OCR助手")
        assert (out / record["images"][0]).is_file()  # relative to dataset_info.json's folder
    summary = capsys.readouterr().out
    assert "read 6  written 4  rejected 2" in summary


def test_set_output_dir_elsewhere(tutorial_recipe, tmp_path):
    target = tmp_path / "elsewhere"
    assert main(["build", str(tutorial_recipe), "--quiet", "--set", f"output.dir={target}"]) == 0
    assert (target / "dataset_info.json").is_file() and (target / "images").is_dir()


def test_bad_rows_go_to_rejects_with_reasons(tutorial_recipe, tmp_path):
    result = mmdata.build(str(tutorial_recipe), output__dir=str(tmp_path / "o"), num_proc=1)
    assert (result.read, result.written, result.rejected) == (6, 4, 2)
    assert result.counts["rejected_by_reason"] == {"image file not found": 1, "image unreadable": 1}
    rejects = [json.loads(line) for line in (result.output_dir / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["position"] for r in rejects) == [4, 5]
    assert any("missing.jpg" in r["message"] for r in rejects)
    assert any("corrupt.jpg" in r["message"] for r in rejects)


def test_strict_fails_and_registers_nothing(tutorial_recipe, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(BuildError, match="--strict: 2 record"):
        mmdata.build(str(tutorial_recipe), output__dir=str(out), strict=True, num_proc=1)
    assert not (out / "dataset_info.json").exists()
    assert main(["build", str(tutorial_recipe), "--quiet", "--strict", "--set", f"output.dir={out}"]) == 4


def test_merge_into_llamafactory_dataset_info_keeps_every_entry(tutorial_recipe, tmp_path):
    if not LLAMAFACTORY_INFO.is_file():
        pytest.skip("shared LLaMA-Factory fixture not present")
    lf_data = tmp_path / "LLaMA-Factory" / "data"
    lf_data.mkdir(parents=True)
    shutil.copy(LLAMAFACTORY_INFO, lf_data / "dataset_info.json")
    before = json.loads((lf_data / "dataset_info.json").read_text())
    result = mmdata.build(str(tutorial_recipe), output__dir=str(lf_data / "latex"),
                          output__dataset_info=str(lf_data / "dataset_info.json"), num_proc=1)
    after = json.loads((lf_data / "dataset_info.json").read_text())
    assert len(before) >= 100
    assert {k: after[k] for k in before} == before and list(after)[: len(before)] == list(before)
    assert after["latex_ocr_csv_train"]["file_name"] == "latex/latex_ocr_csv_train"
    record = read_jsonl_dir(lf_data / "latex" / "latex_ocr_csv_train")[0]
    assert record["images"][0].startswith("latex/images/")
    assert (lf_data / record["images"][0]).is_file()  # relative to LLaMA-Factory's media_dir (= dataset_dir)
    assert result.dataset_info == lf_data / "dataset_info.json"


def test_refuses_to_replace_a_different_entry_without_overwrite(tutorial_recipe, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"latex_ocr_csv_train": {"file_name": "mine.json"}}))
    with pytest.raises(DatasetInfoError, match="--overwrite"):
        mmdata.build(str(tutorial_recipe), output__dir=str(out), num_proc=1)
    result = mmdata.build(str(tutorial_recipe), output__dir=str(out), output__overwrite=True, num_proc=1)
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["latex_ocr_csv_train"]["file_name"] == "latex_ocr_csv_train" and result.written == 4


@pytest.mark.parametrize("existing", ['{"a": {"file_name": "one.json"}, "a": {"file_name": "two.json"}}', '{"a": ',
                                      "[]"], ids=["a key twice", "not JSON", "not an object"])
def test_a_dataset_info_mmdata_cannot_rewrite_whole_is_refused_before_anything_is_written(tutorial_recipe, tmp_path,
                                                                                           existing):
    """A key written twice: rewriting the file kept only the last entry, the other was dropped without a word."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "dataset_info.json").write_text(existing)
    with pytest.raises(DatasetInfoError, match="appears twice|not valid JSON|not an object"):
        mmdata.build(str(tutorial_recipe), output__dir=str(out), num_proc=1)
    assert (out / "dataset_info.json").read_text() == existing
    assert sorted(p.name for p in out.iterdir()) == ["dataset_info.json"]  # refused before any data was written


def test_json_array_and_alpaca_output(tutorial_recipe, tmp_path):
    result = mmdata.build(str(tutorial_recipe), output__dir=str(tmp_path / "o"), output__file_format="json",
                          output__format="alpaca", system="You read formulas.", num_proc=1)
    info = json.loads((result.output_dir / "dataset_info.json").read_text())
    entry = info["latex_ocr_csv_train"]
    assert entry["file_name"] == "latex_ocr_csv_train.json" and entry["formatting"] == "alpaca"
    # no record has history, so none is declared (LLaMA-Factory raises KeyError on a declared column nobody has)
    assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                                "images": "images"}
    records = json.loads((result.output_dir / "latex_ocr_csv_train.json").read_text())
    assert len(records) == 3 and records[0]["system"] == "You read formulas."
    assert records[0]["instruction"].startswith("<image>")


def test_split_fraction_and_test_split(tmp_path):
    formulas = [f"x_{{{i}}}" for i in range(20)]
    recipe = {"name": "s", "source": {"type": "synthetic_latex", "formulas": formulas},
              "fields": {"image": "image", "answer": "text"}, "prompt": "p",
              "split": {"val": 0.25, "test": 2, "seed": 7}, "output": {"dir": str(tmp_path / "o")}}
    result = mmdata.build(str(write_recipe(tmp_path / "r.yaml", recipe)), num_proc=1)
    assert result.counts["by_split"] == {"train": 13, "val": 5, "test": 2}
    assert set(result.datasets) == {"s_train", "s_val", "s_test"}
    answers = [r["messages"][1]["content"] for name in result.datasets for r in read_jsonl_dir(result.datasets[name])]
    assert sorted(answers) == sorted(formulas)  # every row in exactly one split


@pytest.mark.parametrize("split, empty, says", [
    ({"val": 0.01}, "val", "split.val: 0.01 of 20 written records rounds to 0"),
    ({"val": 0.3, "group_by": "image"}, "val", "split.val: 0.3 asks for 6 of 20 records, but split.group_by keeps"),
    ({"val": 15, "test": 5}, "train", "split.val and split.test took all 20 written records"),
])
def test_a_split_that_comes_out_empty_is_a_warning_naming_the_fix(tmp_path, split, empty, says):
    """Each used to build silently without the split (and `mmdata llamafactory` then predicted on train)."""
    formulas = [f"z_{{{i}}}" for i in range(20)]
    source = ({"type": "synthetic_latex", "formulas": formulas} if "group_by" not in split else
              {"type": "json", "path": "d.json"})
    if "group_by" in split:  # twenty questions about one image: no group fits in val
        (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
        (tmp_path / "d.json").write_text(json.dumps([{"images": ["a.jpg"], "messages": [
            {"role": "user", "content": f"<image>q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(20)]))
    recipe = {"name": "s", "source": source, "prompt": "p", "split": split, "output": {"dir": str(tmp_path / "o")}}
    with pytest.warns(mmdata.BuildWarning, match=f"no record went to {empty}: {re.escape(says)}"):
        result = mmdata.build(str(write_recipe(tmp_path / "r.yaml", recipe)), num_proc=1)
    assert empty not in result.counts["by_split"] and result.written == 20
    clean = mmdata.build(str(write_recipe(tmp_path / "r2.yaml", {**recipe, "split": {"val": 2},
                                                                   "output": {"dir": str(tmp_path / "o2")}})),
                         num_proc=1)
    assert "unfilled_splits" not in clean.counts and not clean.warnings


@pytest.mark.parametrize("split", [{"val": 4}, {"val": 0.2, "group_by": "image"}])
def test_every_row_rejected_with_a_split_says_so_not_that_the_split_is_too_big(tmp_path, split):
    """The split's "asks for 4 val records but only 0 were written" hid why nothing was written."""
    recipe = {"name": "s", "source": {"type": "synthetic_latex", "formulas": ["a", "b", "c"]},
              "prompt": "Read {formula}", "split": split, "output": {"dir": str(tmp_path / "o")}}
    with pytest.warns(mmdata.BuildWarning, match="no record was written: all 3 were rejected .prompt uses {formula}"):
        mmdata.build(str(write_recipe(tmp_path / "r.yaml", recipe)), num_proc=1)


@pytest.mark.parametrize("filters, says", [({"min_answer_chars": 30, "max_answer_chars": 10}, "no record could pass"),
                                           ({"max_aspect_ratio": 0.5}, "greater than or equal to 1")])
def test_filters_no_record_could_pass_are_a_recipe_error(tmp_path, filters, says):
    recipe = {"name": "s", "source": {"type": "synthetic_latex", "formulas": ["a"]}, "filters": filters,
              "output": {"dir": str(tmp_path / "o")}}
    with pytest.raises(RecipeError, match=says):
        mmdata.build(str(write_recipe(tmp_path / "r.yaml", recipe)), num_proc=1)


def test_split_sizes_are_counts_or_shares_never_true(tmp_path):
    recipe = {"name": "s", "source": {"type": "synthetic_latex", "formulas": ["a"]}, "split": {"val": True},
              "output": {"dir": str(tmp_path / "o")}}
    with pytest.raises(RecipeError, match="not true/false"):
        mmdata.build(str(write_recipe(tmp_path / "r.yaml", recipe)), num_proc=1)


def test_split_last_takes_the_tail(tmp_path):
    formulas = [f"y_{{{i}}}" for i in range(10)]
    recipe = {"name": "s", "source": {"type": "synthetic_latex", "formulas": formulas},
              "prompt": "p", "split": {"val": 3, "pick": "last"}, "output": {"dir": str(tmp_path / "o")}}
    result = mmdata.build(str(write_recipe(tmp_path / "r.yaml", recipe)), num_proc=1)
    val = [r["messages"][1]["content"] for r in read_jsonl_dir(result.datasets["s_val"])]
    assert val == formulas[-3:]


def test_filters_reject_with_reason(tmp_path):
    recipe = {"name": "f", "source": {"type": "synthetic_latex", "formulas": ["a", "a + b + c + d"]},
              "prompt": "p", "filters": {"min_answer_chars": 3}, "output": {"dir": str(tmp_path / "o")}}
    result = mmdata.build(str(write_recipe(tmp_path / "r.yaml", recipe)), num_proc=1)
    assert result.counts["rejected_by_reason"] == {"filtered: answer shorter than min_answer_chars": 1}
    assert result.written == 1


def test_convert_mode_resizes_to_max_pixels(tmp_path):
    recipe = {"name": "c", "source": {"type": "synthetic_latex", "formulas": ["\\sum_{i=1}^{n} i^{2}"]},
              "prompt": "p", "images": {"mode": "convert", "max_pixels": 2000, "format": "jpeg"},
              "output": {"dir": str(tmp_path / "o")}}
    result = mmdata.build(str(write_recipe(tmp_path / "r.yaml", recipe)), num_proc=1)
    from PIL import Image

    record = read_jsonl_dir(result.datasets["c"])[0]
    assert record["images"][0].endswith(".jpg")
    with Image.open(result.output_dir / record["images"][0]) as img:
        assert img.width * img.height <= 2000 and img.mode == "RGB"


def test_link_mode_hard_links_source_files(tutorial_recipe, tmp_path):
    result = mmdata.build(str(tutorial_recipe), output__dir=str(tmp_path / "o"), images__mode="link", num_proc=1)
    record = read_jsonl_dir(result.datasets["latex_ocr_csv_train"])[0]
    written = result.output_dir / record["images"][0]
    assert os.stat(written).st_nlink == 2


def test_rerun_is_up_to_date_and_a_changed_recipe_rebuilds(tutorial_recipe, tmp_path):
    out = tmp_path / "o"
    first = mmdata.build(str(tutorial_recipe), output__dir=str(out), num_proc=1)
    again = mmdata.build(str(tutorial_recipe), output__dir=str(out), num_proc=1)
    assert again.up_to_date and not first.up_to_date and again.counts == first.counts
    changed = mmdata.build(str(tutorial_recipe), output__dir=str(out), prompt="new prompt", num_proc=1)
    assert not changed.up_to_date
    record = read_jsonl_dir(changed.datasets["latex_ocr_csv_train"])[0]
    assert record["messages"][0]["content"] == "<image>new prompt"


def _mixed_source(folder, rows=40):
    """JSONL in alpaca shape: every 5th record has an image, every 3rd a history turn; the rest are text-only."""
    from tests.conftest import jpeg_bytes

    (folder / "img.jpg").write_bytes(jpeg_bytes())
    records = []
    for i in range(rows):
        record = {"instruction": f"{'<image>' if i % 5 == 3 else ''}question {i}", "input": "", "output": f"a{i}"}
        if i % 5 == 3:
            record["images"] = ["img.jpg"]
        if i % 3 == 2:
            record["history"] = [[f"earlier {i}", f"reply {i}"]]
        records.append(record)
    (folder / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return write_recipe(folder / "mixed.yaml", {"name": "mixed", "source": {"type": "jsonl", "path": "mixed.jsonl"},
                                                "output": {"dir": str(folder / "out"), "shard_size": 2}})


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca"])
def test_mixed_image_and_text_records_load_in_any_shard_order(tmp_path, fmt):
    """datasets' JSON loader (LLaMA-Factory's) types columns from whichever shard it reads first (os.listdir order):
    every shard must have the same keys and start with a record whose lists are not empty."""
    from datasets import load_dataset

    result = mmdata.build(str(_mixed_source(tmp_path)), output__format=fmt, num_proc=1)
    (name, folder), = result.datasets.items()
    entry = json.loads(result.dataset_info.read_text())[name]
    keys = {"images", "history"} if fmt == "alpaca" else {"images"}
    assert set(entry["columns"]) >= keys
    shards = sorted(folder.glob("*.jsonl"))
    records = read_jsonl_dir(folder)
    assert len(records) == 40 and len(shards) > 1
    assert all(keys <= set(r) for r in records)
    for i, shard in enumerate(shards):
        lines = [json.loads(line) for line in shard.read_text().splitlines()]
        typed = lines if i == 0 else lines[:1]  # shard 0 starts at record 0; it holds a typed record in its first chunk
        assert any(all(r[k] for k in keys) for r in typed), shard.name
    for order in (shards, shards[::-1]):
        loaded = load_dataset("json", data_files=[str(p) for p in order], split="train",
                              cache_dir=str(tmp_path / "hf-cache"))
        assert len(loaded) == 40 and loaded.features["images"].feature.dtype == "string"
    report = mmdata.validate(result.dataset_info)
    assert report.ok, report.format_text()


def test_text_only_alpaca_declares_no_media_or_history(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n"
                                              for i in range(5)))
    recipe = write_recipe(tmp_path / "t.yaml", {"name": "t", "source": {"type": "jsonl", "path": "t.jsonl"},
                                                "output": {"dir": str(tmp_path / "out"), "format": "alpaca"}})
    result = mmdata.build(str(recipe), num_proc=1)
    (name, folder), = result.datasets.items()
    entry = json.loads(result.dataset_info.read_text())[name]
    assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}
    assert all(set(r) == {"instruction", "input", "output"} for r in read_jsonl_dir(folder))


def test_manifest_and_summary_carry_the_token_budget(tutorial_recipe, tmp_path, capsys):
    from PIL import Image

    from mmdata.tokens import record_tokens, token_counter

    out = tmp_path / "o"
    assert main(["build", str(tutorial_recipe), "--set", f"output.dir={out}", "--quiet", "--num-proc", "2"]) == 0
    assert "over cutoff_len 2048" in capsys.readouterr().out
    tokens = json.loads((out / "mmdata_build.json").read_text())["tokens"]
    counter = token_counter()
    lengths = []
    for name in ("latex_ocr_csv_train", "latex_ocr_csv_val"):
        for record in read_jsonl_dir(out / name):
            sizes = [Image.open(out / image).size for image in record["images"]]
            lengths.append(record_tokens([(m["role"], m["content"]) for m in record["messages"]], sizes, counter))
    assert tokens["records"] == len(lengths) == 4
    assert tokens["max"] == max(lengths) and tokens["over_cutoff"] == 0
    assert tokens["suggested_cutoff_len"] >= max(lengths) and tokens["max_answer"] > 0


def test_strict_fails_on_an_up_to_date_build_with_rejects(tutorial_recipe, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["build", str(tutorial_recipe), "--set", f"output.dir={out}", "--quiet", "--num-proc", "1"]
    assert main(args) == 0
    assert main([*args, "--strict"]) == BuildError.exit_code
    assert "--strict: 2 record(s) rejected" in capsys.readouterr().err


def test_rebuild_picks_up_an_image_edited_in_place(tutorial_recipe, tmp_path):
    from PIL import Image
    from tests.conftest import jpeg_bytes

    out = tmp_path / "o"
    first = mmdata.build(str(tutorial_recipe), output__dir=str(out), num_proc=1)
    (tutorial_recipe.parent / "images" / "corrupt.jpg").write_bytes(jpeg_bytes(size=(50, 40)))  # repaired
    assert mmdata.build(str(tutorial_recipe), output__dir=str(out), num_proc=1).up_to_date  # invisible to the fingerprint
    second = mmdata.build(str(tutorial_recipe), output__dir=str(out), num_proc=1, rebuild=True)
    assert not second.up_to_date and (first.written, second.written) == (4, 5)
    sizes = {Image.open(p).size for p in (out / "images").rglob("*.jpg")}
    assert (50, 40) in sizes


def test_merged_dataset_info_keeps_its_file_mode(tutorial_recipe, tmp_path):
    info = tmp_path / "lf" / "dataset_info.json"
    info.parent.mkdir()
    info.write_text("{}")
    info.chmod(0o664)
    mmdata.build(str(tutorial_recipe), output__dir=str(tmp_path / "o"), output__dataset_info=str(info), num_proc=1)
    assert info.stat().st_mode & 0o777 == 0o664 and "latex_ocr_csv_train" in json.loads(info.read_text())
    manifest = tmp_path / "o" / "mmdata_build.json"
    assert manifest.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_fails_when_every_record_is_rejected(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("image_path,text\nnope.jpg,x\nnada.jpg,y\n")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "r", "source": {"type": "csv", "path": "d.csv"},
                                                "fields": {"image": "image_path", "answer": "text"},
                                                "prompt": "{nonexistent} hi", "output": {"dir": str(tmp_path / "o")}})
    assert main(["build", str(recipe), "--quiet"]) == BuildError.exit_code
    err = capsys.readouterr().err
    assert "no record was written: all 2 were rejected" in err and "rejects.jsonl" in err
