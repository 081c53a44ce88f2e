"""Each built-in source on real files: what rows it yields and what a build makes of them."""

import json

import datasets
import pytest
from tests.conftest import jpeg_bytes, png_bytes, read_jsonl_dir, write_recipe

import mmdata
from mmdata.errors import RecipeError, SourceError
from mmdata.sources import open_source


def build(tmp_path, source, **extra):
    recipe = {"name": "t", "source": source, "output": {"dir": str(tmp_path / "out")}, **extra}
    return mmdata.build(str(write_recipe(tmp_path / "recipe.yaml", recipe)), num_proc=1)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gb18030"])
def test_csv_encodings_are_detected(tmp_path, encoding):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "d.csv").write_text("图片,答案\na.jpg,这是一个公式\n", encoding=encoding)
    result = build(tmp_path, {"type": "csv", "path": "d.csv"}, fields={"image": "图片", "answer": "答案"},
                   prompt="读取公式")
    records = read_jsonl_dir(result.datasets["t"])
    assert records[0]["messages"][1]["content"] == "这是一个公式"
    assert records[0]["messages"][0]["content"] == "<image>读取公式"


def test_csv_relative_paths_resolve_against_the_csv_folder(tmp_path):
    data = tmp_path / "nested" / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "x.png").write_bytes(png_bytes())
    (data / "d.csv").write_text("image_path,text\nimg/x.png,hello\n")
    result = build(tmp_path, {"type": "csv", "path": "nested/data/d.csv"}, fields={"image": "image_path",
                                                                                    "answer": "text"}, prompt="p")
    record = read_jsonl_dir(result.datasets["t"])[0]
    written = result.output_dir / record["images"][0]
    assert written.read_bytes() == (data / "img" / "x.png").read_bytes()


def test_csv_ragged_rows_give_a_clear_error(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n1,2,3\n")
    source = open_source("csv", {"path": "d.csv"}, tmp_path)
    with pytest.raises(SourceError, match=r"d.csv: cannot parse"):
        list(source.rows())


def test_json_shapes(tmp_path):
    (tmp_path / "0.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "1.jpg").write_bytes(jpeg_bytes(color=(1, 2, 3)))
    records = [
        {"messages": [{"role": "user", "content": "<image>what"}, {"role": "assistant", "content": "red"}],
         "images": ["0.jpg"]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "identity_1", "conversations": [{"role": "user", "value": "1.jpg"},
                                               {"role": "assistant", "value": "E = mc^2"}]},
        {"instruction": "translate", "input": "chat", "output": "猫", "system": "be exact",
         "history": [["q1", "a1"]]},
        {"instruction": "<image>describe", "output": "a square", "images": ["0.jpg"]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    result = build(tmp_path, {"type": "json", "path": "d.json"})
    assert result.counts == {**result.counts, "read": 5, "written": 5, "rejected": 0}
    out = read_jsonl_dir(result.datasets["t"])
    # text-only among image records: an empty images list keeps the column uniform for LLaMA-Factory's loader
    assert out[1] == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                      "images": []}
    assert out[2]["messages"][0]["content"] == "<image>" and len(out[2]["images"]) == 1
    assert [m["role"] for m in out[3]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert out[3]["messages"][3]["content"] == "translate\nchat"
    assert out[4]["messages"][0]["content"] == "<image>describe"


def test_json_image_path_layout_gets_the_recipe_prompt(tmp_path):
    (tmp_path / "0.jpg").write_bytes(jpeg_bytes())
    rows = [{"id": "identity_1", "conversations": [{"role": "user", "value": "./0.jpg"},
                                                   {"role": "assistant", "value": "x^2"}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = build(tmp_path, {"type": "jsonl", "path": "d.jsonl"}, prompt="OCR this")
    record = read_jsonl_dir(result.datasets["t"])[0]
    assert record["messages"][0]["content"] == "<image>OCR this"


def test_json_bad_records_are_rejected_not_lost(tmp_path):
    rows = ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
            '{"messages": [{"role": "wizard", "content": "a"}]}', "not json", '{"foo": 1}']
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    result = build(tmp_path, {"type": "jsonl", "path": "d.jsonl"})
    assert (result.read, result.written, result.rejected) == (4, 1, 3)
    reasons = [json.loads(line)["message"] for line in (result.output_dir / "rejects.jsonl").read_text().splitlines()]
    assert any("wizard" in r for r in reasons) and any("invalid JSON" in r for r in reasons)


def test_json_object_top_level_is_a_clear_error(tmp_path):
    (tmp_path / "d.json").write_text('{"data": []}')
    with pytest.raises(SourceError, match="top level is an object"):
        list(open_source("json", {"path": "d.json"}, tmp_path).rows())


def test_imagefolder_with_txt_captions_and_metadata(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes())
    (folder / "a.txt").write_text("a red square\n")
    result = build(tmp_path, {"type": "imagefolder", "path": "imgs"}, prompt="Describe.")
    assert read_jsonl_dir(result.datasets["t"])[0]["messages"][1]["content"] == "a red square"

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "b.png").write_bytes(png_bytes())
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "caption": "blue"}) + "\n")
    rows = list(open_source("imagefolder", {"path": "meta"}, tmp_path).rows())
    assert rows == [{"file_name": "b.png", "caption": "blue", "image": "b.png"}]


def test_hf_source_keeps_original_image_bytes(tmp_path, latex_hub):
    result = build(tmp_path, {"type": "hf", "path": str(latex_hub), "subset": "small", "split": "validation"},
                   fields={"image": "image", "answer": "text"}, prompt="OCR")
    ds = datasets.load_dataset(str(latex_hub), "small", split="validation").cast_column(
        "image", datasets.Image(decode=False))
    records = read_jsonl_dir(result.datasets["t"])
    assert len(records) == len(ds) == 30
    for record, row in zip(records, ds, strict=True):
        assert record["messages"][1]["content"] == row["text"]
        assert (result.output_dir / record["images"][0]).read_bytes() == row["image"]["bytes"]


def test_synthetic_latex_renders_deterministic_pngs(tmp_path):
    source = open_source("synthetic_latex", {"formulas": ["a^2", "\\frac{1}{2}"], "count": 3}, tmp_path)
    rows = list(source.rows())
    again = list(open_source("synthetic_latex", {"formulas": ["a^2", "\\frac{1}{2}"], "count": 3}, tmp_path).rows())
    assert [r["text"] for r in rows] == ["a^2", "\\frac{1}{2}", "a^2"]
    assert rows[0]["image"].startswith(b"\x89PNG") and rows[0]["image"] == again[0]["image"]


def test_unknown_source_type_suggests_the_close_one(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'csv'"):
        open_source("csvv", {"path": "d.csv"}, tmp_path)
