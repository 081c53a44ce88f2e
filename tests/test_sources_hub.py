"""Hub recipes on local copies laid out exactly like the hub, and hub failures simulated at the hub client.

Nothing here touches the network: a local ``source.path`` skips the hubs, and the gated / offline tests make
``huggingface_hub`` / ModelScope's ``HubApi`` raise what the real services raise, so the real ``datasets`` and
``MsDataset.load`` code turns them into the errors our messages must explain.
"""

from __future__ import annotations

import importlib.util
import json

import datasets
import httpx
import pyarrow.parquet as pq
import pytest
import requests
import yaml
import zstandard
from huggingface_hub.errors import GatedRepoError
from tests.conftest import jpeg_bytes, png_bytes, read_jsonl_dir, tar_bytes

import mmdata
from mmdata.cli import main
from mmdata.errors import SourceError
from mmdata.sources import hf as hf_source
from mmdata.sources.modelscope_loader import as_hf_dataset

needs_modelscope = pytest.mark.skipif(importlib.util.find_spec("modelscope") is None,
                                      reason="pip install 'mmdata[modelscope]'")
TUTORIAL_PROMPT = "你是一个LaText OCR助手,目标是读取用户输入的照片,转换成LaTex公式。"
MEDTRINITY_PROMPT = "<image>图片中的诊断结果是怎样?"


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep ``datasets``' cache and the hub token out of the user's home; the hubs' TCP check says "reachable", so
    the failures below come from the hub clients themselves (tests that want "offline" patch the check)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setattr(hf_source, "hub_unreachable", lambda hub: None)


def write_hub_copy(root, configs: dict[str, dict[str, datasets.Dataset]]):
    """A local copy in hub layout: README.md declaring the configs, ``<config>/<split>-00000-of-00001.parquet``."""
    card = {"configs": [{"config_name": name, "data_files": [{"split": split, "path": f"{name}/{split}-*"}
                                                             for split in splits]}
                        for name, splits in configs.items()]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\n" + yaml.safe_dump(card) + "---\n", encoding="utf-8")
    for name, splits in configs.items():
        (root / name).mkdir(exist_ok=True)
        for split, ds in splits.items():
            ds.to_parquet(str(root / name / f"{split}-00000-of-00001.parquet"))
    return root


def records(result, name):
    return read_jsonl_dir(result.datasets[name])


# ----------------------------------------------------------------------------------------------- LaTeX_OCR


def test_latex_ocr_cli_reproduces_the_tutorial_on_the_hub_layout(latex_hub, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["build", "latex_ocr", "--set", f"source.path={latex_hub}", "--set", "source.subset=small",
                 "--set", f"output.dir={out}", "--quiet", "--num-proc", "1"])
    assert code == 0, capsys.readouterr().err
    table = pq.read_table(latex_hub / "small" / "train-00000-of-00001.parquet").to_pylist()
    train = read_jsonl_dir(out / "latex_ocr_train")
    val = read_jsonl_dir(out / "latex_ocr_val")
    assert (len(train), len(val)) == (46, 4)
    for record, row in zip(train + val, table, strict=True):  # pick: last -> rows 46..49 are the validation set, in order
        assert record["messages"] == [{"role": "user", "content": "<image>" + TUTORIAL_PROMPT},
                                      {"role": "assistant", "content": row["text"]}]
        assert (out / record["images"][0]).read_bytes() == row["image"]["bytes"]
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"latex_ocr_train", "latex_ocr_val"}
    manifest = json.loads((out / "mmdata_build.json").read_text())
    assert manifest["counts"]["by_split"] == {"train": 46, "val": 4}


def test_latex_ocr_subset_split_and_prompt_overrides(latex_hub, tmp_path):
    english = "You are a LaTeX OCR assistant. Read the formula in the image and write it as LaTeX."
    result = mmdata.build("latex_ocr", num_proc=1, **{
        "source.path": str(latex_hub), "source.subset": "human_handwrite_print", "source.split": "validation",
        "prompt": english, "split.val": "0", "output.dir": str(tmp_path / "o")})
    rows = pq.read_table(latex_hub / "human_handwrite_print" / "validation-00000-of-00001.parquet").to_pylist()
    got = records(result, "latex_ocr")
    assert [r["messages"][1]["content"] for r in got] == [row["text"] for row in rows]
    assert got[0]["messages"][0]["content"] == "<image>" + english


@needs_modelscope
def test_modelscope_hub_returns_a_plain_dataset(latex_hub, tmp_path, monkeypatch):
    """hub: auto asks ModelScope first, with the mirror id; a hub dataset comes back as a plain datasets.Dataset."""
    from modelscope.msdatasets import MsDataset

    calls = []
    small = datasets.load_dataset(str(latex_hub), "small", split="train")

    def fake_load(dataset_name, **kwargs):
        calls.append((dataset_name, kwargs))
        return small

    monkeypatch.setattr(MsDataset, "load", staticmethod(fake_load))
    result = mmdata.build("latex_ocr", num_proc=1, output__dir=str(tmp_path / "o"))
    assert calls[0][0] == "AI-ModelScope/LaTeX_OCR"
    assert calls[0][1]["subset_name"] == "default" and calls[0][1]["split"] == "train"
    assert result.written == 50


@needs_modelscope
def test_modelscope_local_path_returns_a_wrapped_msdataset(latex_hub):
    from modelscope.msdatasets import MsDataset

    wrapped = MsDataset.load(str(latex_hub), subset_name="small", split="test")
    assert not isinstance(wrapped, datasets.Dataset)
    plain = as_hf_dataset(wrapped)
    assert isinstance(plain, datasets.Dataset) and len(plain) == 30
    assert as_hf_dataset(plain) is plain


@needs_modelscope
def test_auto_falls_back_to_hugging_face_when_modelscope_is_unreachable(latex_hub, tmp_path, monkeypatch):
    from modelscope.msdatasets import MsDataset

    def unreachable(*args, **kwargs):
        raise requests.ConnectionError("HTTPSConnectionPool(host='www.modelscope.cn'): Max retries exceeded")

    real_load = datasets.load_dataset
    asked = []

    def hf_load(path, **kwargs):
        asked.append(path)
        return real_load(str(latex_hub), kwargs.get("name") and "small", split=kwargs["split"])

    monkeypatch.setattr(MsDataset, "load", staticmethod(unreachable))
    monkeypatch.setattr(datasets, "load_dataset", hf_load)
    result = mmdata.build("latex_ocr", num_proc=1, output__dir=str(tmp_path / "o"))
    assert asked == ["linxy/LaTeX_OCR"] and result.written == 50


@needs_modelscope
def test_auto_reports_both_hubs_when_both_fail(monkeypatch, tmp_path):
    from modelscope.hub.api import HubApi
    from modelscope.hub.errors import NotExistError

    monkeypatch.setattr(HubApi, "get_endpoint_for_read", lambda self, *a, **k: "https://www.modelscope.cn")

    def not_there(self, *args, **kwargs):
        raise NotExistError("dataset AI-ModelScope/LaTeX_OCR not exist")

    monkeypatch.setattr(HubApi, "get_dataset_id_and_type", not_there)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError) as info:
        mmdata.build("latex_ocr", num_proc=1, output__dir=str(tmp_path / "o"))
    text = str(info.value)
    assert "hub: auto tried both hubs" in text
    assert "modelscope: dataset 'AI-ModelScope/LaTeX_OCR' was not found" in text
    assert "hf: cannot reach the hub for dataset 'linxy/LaTeX_OCR'" in text and "HF_HUB_OFFLINE=1" in text


# ----------------------------------------------------------------------------------------------- hub failures


def _gated(status: int):
    def download(self, repo_id, filename, **kwargs):
        url = f"https://huggingface.co/datasets/{repo_id}/resolve/main/{filename}"
        response = httpx.Response(status, request=httpx.Request("GET", url))
        raise GatedRepoError(f"{status} Client Error. Cannot access gated repo for url {url}.", response=response)

    return download


@pytest.mark.parametrize("status", [401, 403])
def test_gated_medtrinity_says_to_accept_the_terms(monkeypatch, tmp_path, capsys, status):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", _gated(status))
    code = main(["build", "medtrinity_demo", "--set", f"output.dir={tmp_path / 'o'}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == SourceError.exit_code and "\n" not in err
    assert "hf: dataset 'UCSC-VLAA/MedTrinity-25M' is gated" in err
    assert "Accept its terms on the dataset page (https://huggingface.co/datasets/UCSC-VLAA/MedTrinity-25M)" in err
    assert "HF_TOKEN" in err


def test_hf_token_from_the_environment_is_passed(monkeypatch, tmp_path):
    seen = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs, path=path)
        return datasets.Dataset.from_dict({"image": [jpeg_bytes()], "id": ["a"], "caption": ["c"]})

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    mmdata.build("medtrinity_demo", num_proc=1, output__dir=str(tmp_path / "o"))
    assert seen["token"] == "hf_secret" and seen["name"] == "25M_demo" and seen["path"] == "UCSC-VLAA/MedTrinity-25M"


@pytest.mark.parametrize("how", ["offline_mode", "connection_error"])
def test_unreachable_hugging_face_names_hub_dataset_and_ways_out(monkeypatch, tmp_path, how):
    import huggingface_hub

    if how == "offline_mode":
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    else:
        def refused(self, *args, **kwargs):
            raise requests.ConnectionError("HTTPSConnectionPool(host='huggingface.co'): Max retries exceeded")

        monkeypatch.setattr(huggingface_hub.HfApi, "hf_hub_download", refused)
    with pytest.raises(SourceError) as info:
        mmdata.build("vqa_rad", num_proc=1, output__dir=str(tmp_path / "o"))
    text = str(info.value)
    assert text.startswith("hf: cannot reach the hub for dataset 'flaviagiammarino/vqa-rad'")
    for way_out in ("source.path", "HF_ENDPOINT", "HF_HUB_OFFLINE=1"):
        assert way_out in text


@needs_modelscope
def test_unreachable_modelscope_names_its_way_out(monkeypatch, tmp_path):
    from modelscope.hub.api import HubApi

    def refused(self, *args, **kwargs):
        raise requests.ConnectionError("HTTPSConnectionPool(host='www.modelscope.cn'): Max retries exceeded")

    monkeypatch.setattr(HubApi, "get_endpoint_for_read", refused)
    with pytest.raises(SourceError) as info:
        mmdata.build("chinese_medical_dialogue", num_proc=1, output__dir=str(tmp_path / "o"))
    text = str(info.value)
    assert text.startswith("modelscope: cannot reach the hub for dataset 'xiaofengalg/Chinese-medical-dialogue'")
    assert "MODELSCOPE_CACHE" in text and "source.path" in text


# ----------------------------------------------------------------------------------------------- MedTrinity


def medtrinity_copy(tmp_path, full_rows=None):
    image = datasets.Features({"image": datasets.Image(), "id": datasets.Value("string"),
                               "caption": datasets.Value("string")})
    demo = datasets.Dataset.from_dict(
        {"image": [{"bytes": jpeg_bytes(color=(i * 60, 0, 0)), "path": None} for i in range(3)],
         "id": [f"demo-{i}" for i in range(3)],
         "caption": [f"The image is a CT scan of the chest; finding {i}." for i in range(3)]}, features=image)
    configs = {"25M_demo": {"train": demo}}
    if full_rows is not None:
        configs["25M_full"] = {"train": datasets.Dataset.from_list(full_rows)}
    return write_hub_copy(tmp_path / "UCSC-VLAA--MedTrinity-25M", configs)


def test_medtrinity_demo_on_a_local_copy(tmp_path):
    hub = medtrinity_copy(tmp_path)
    result = mmdata.build("medtrinity_demo", num_proc=1, **{"source.path": str(hub),
                                                            "output.dir": str(tmp_path / "o")})
    table = pq.read_table(hub / "25M_demo" / "train-00000-of-00001.parquet").to_pylist()
    got = records(result, "medtrinity_demo")
    assert len(got) == 3
    for record, row in zip(got, table, strict=True):
        assert record["messages"] == [{"role": "user", "content": MEDTRINITY_PROMPT},
                                      {"role": "assistant", "content": row["caption"]}]
        assert (result.output_dir / record["images"][0]).read_bytes() == row["image"]["bytes"]


@pytest.fixture
def medtrinity_full(tmp_path):
    """25M_full metadata (6 rows, one listed image missing from every shard) and two shards: tar.zst and tar."""
    images = {f"img_{i}.jpg": jpeg_bytes(color=(10, i * 40, 0)) for i in range(6)}
    rows = [{"file_name": name, "caption": f"caption of {name}", "source": "PMC" if i != 4 else "TCGA"}
            for i, name in enumerate(images)]
    hub = medtrinity_copy(tmp_path, rows)
    shards = hub / "25M_accessible"
    shards.mkdir()
    zst = zstandard.ZstdCompressor().compress(
        tar_bytes({"25M_accessible/img_3.jpg": images["img_3.jpg"], "./img_0.jpg": images["img_0.jpg"],
                   "unlisted.jpg": png_bytes()}))
    (shards / "part_000.tar.zst").write_bytes(zst)
    (shards / "part_001.tar").write_bytes(tar_bytes({"img_1.jpg": images["img_1.jpg"],
                                                     "img_4.jpg": images["img_4.jpg"],
                                                     "img_5.jpg": images["img_5.jpg"]}))
    return hub, images  # img_2.jpg is in no shard


def test_medtrinity_full_joins_tar_zst_shards_and_rejects_missing_images(medtrinity_full, tmp_path):
    hub, images = medtrinity_full
    result = mmdata.build("medtrinity_full", num_proc=1, **{
        "source.path": str(hub), "source.image_root": str(hub / "25M_accessible"), "output.dir": str(tmp_path / "o")})
    got = records(result, "medtrinity_full")
    # Shard order: part_000.tar.zst (img_3, img_0), then part_001.tar (img_1, img_4, img_5).
    assert [r["messages"][1]["content"] for r in got] == [f"caption of img_{i}.jpg" for i in (3, 0, 1, 4, 5)]
    for record in got:
        name = record["messages"][1]["content"].removeprefix("caption of ")
        assert (result.output_dir / record["images"][0]).read_bytes() == images[name]
    rejects = [json.loads(line) for line in (result.output_dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("img_2.jpg", "image missing")]
    assert result.counts["read"] == 6


def test_medtrinity_full_filters_by_source_and_reads_an_image_folder(medtrinity_full, tmp_path):
    hub, images = medtrinity_full
    folder = tmp_path / "extracted"
    folder.mkdir()
    for name, data in images.items():
        if name != "img_5.jpg":
            (folder / name).write_bytes(data)
    result = mmdata.build("medtrinity_full", num_proc=1, **{
        "source.path": str(hub), "source.image_root": str(folder), "source.where": {"source": ["PMC"]},
        "output.dir": str(tmp_path / "o")})
    got = records(result, "medtrinity_full")
    assert [r["messages"][1]["content"] for r in got] == [f"caption of img_{i}.jpg" for i in (0, 1, 2, 3)]
    assert result.counts["rejected_by_reason"] == {"image missing": 1}  # img_5; img_4 is TCGA, filtered out


# ----------------------------------------------------------------------------------------------- registry entries


def test_slake_json_with_image_folder_keeps_english_questions(tmp_path):
    copy = tmp_path / "BoKelvin--SLAKE"
    (copy / "imgs" / "xmlab1").mkdir(parents=True)
    (copy / "imgs" / "xmlab1" / "source.jpg").write_bytes(jpeg_bytes())
    rows = [{"img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Lung", "qid": 1,
             "q_lang": "en"},
            {"img_name": "xmlab1/source.jpg", "question": "哪个器官不正常?", "answer": "肺", "qid": 2, "q_lang": "zh"}]
    for k, split in enumerate(("train", "validation", "test")):
        (copy / f"{split}.json").write_text(json.dumps(rows * (k + 1), ensure_ascii=False), encoding="utf-8")
    result = mmdata.build("slake", num_proc=1, **{"source.path": str(copy), "output.dir": str(tmp_path / "o")})
    assert result.counts["by_split"] == {"train": 1, "val": 2, "test": 3}  # the hub's own splits, English only
    assert result.counts["skipped"] == 6  # the Chinese questions, left out by `where`
    got = records(result, "slake_train")
    assert [r["messages"] for r in got] == [[{"role": "user", "content": "<image>Which organ is abnormal?"},
                                             {"role": "assistant", "content": "Lung"}]]
    assert (result.output_dir / got[0]["images"][0]).read_bytes() == (copy / "imgs/xmlab1/source.jpg").read_bytes()


def test_sharegpt_rows_with_a_list_of_images(tmp_path):
    features = datasets.Features({
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        "images": datasets.List(datasets.Image())})
    ds = datasets.Dataset.from_dict({
        "conversations": [[{"from": "human", "value": "<image>Describe the pokemon."},
                           {"from": "gpt", "value": "A yellow electric mouse."}]],
        "images": [[{"bytes": png_bytes(), "path": None}]]}, features=features)
    copy = tmp_path / "pokemon"
    copy.mkdir()
    ds.to_parquet(str(copy / "train-00000-of-00001.parquet"))
    result = mmdata.build("pokemon_gpt4o_captions", num_proc=1, **{"source.path": str(copy),
                                                                   "output.dir": str(tmp_path / "o")})
    (record,) = records(result, "pokemon_gpt4o_captions")
    assert record["messages"] == [{"role": "user", "content": "<image>Describe the pokemon."},
                                  {"role": "assistant", "content": "A yellow electric mouse."}]
    assert (result.output_dir / record["images"][0]).read_bytes() == png_bytes()


def test_alpaca_text_only_dialogue_keeps_its_history(tmp_path):
    copy = tmp_path / "Chinese-medical-dialogue"
    copy.mkdir()
    row = {"instruction": "头痛怎么办?", "input": "", "output": "建议休息并就医。", "history": [["你好", "您好,请讲。"]]}
    (copy / "train.json").write_text(json.dumps([row], ensure_ascii=False), encoding="utf-8")
    result = mmdata.build("chinese_medical_dialogue", num_proc=1, **{"source.path": str(copy),
                                                                     "output.dir": str(tmp_path / "o")})
    (record,) = records(result, "chinese_medical_dialogue")
    assert record["messages"] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好,请讲。"},
                                  {"role": "user", "content": "头痛怎么办?"},
                                  {"role": "assistant", "content": "建议休息并就医。"}]
    assert not record.get("images")


def test_chartqa_keeps_the_first_label(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "query": datasets.Value("string"),
                                  "label": datasets.List(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(), "path": None}],
                                     "query": ["Which year is highest?"], "label": [["2019"]]}, features=features)
    copy = tmp_path / "ChartQA"
    (copy / "data").mkdir(parents=True)
    for split in ("train", "val", "test"):  # the hub's split names
        ds.to_parquet(str(copy / "data" / f"{split}-00000-of-00001.parquet"))
    result = mmdata.build("chartqa", num_proc=1, **{"source.path": str(copy), "output.dir": str(tmp_path / "o")})
    assert result.counts["by_split"] == {"train": 1, "val": 1, "test": 1}
    (record,) = records(result, "chartqa_val")
    assert record["messages"][1] == {"role": "assistant", "content": "2019"}
    assert record["messages"][0]["content"] == "<image>Which year is highest?"


def test_modelscope_without_the_package_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", None)  # import fails as if not installed
    with pytest.raises(SourceError, match=r"modelscope: .*pip install 'mmdata\[modelscope\]'"):
        mmdata.build("chinese_medical_dialogue", num_proc=1, output__dir=str(tmp_path / "o"))
