"""`mmdata llamafactory`: LLaMA-Factory YAMLs from a build, every key checked against the pinned LLaMA-Factory."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml
from tests.conftest import REPO

import mmdata
from mmdata.cli import main
from mmdata.lfconfig import (
    LF_IMAGE_MAX_PIXELS,
    LlamaFactoryConfigError,
    check_keys,
    llamafactory_argument_names,
    write_llamafactory_configs,
)
from mmdata.tokens import image_tokens


@pytest.fixture(scope="module")
def latex_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "latex"
    mmdata.build("latex_ocr_sample", quiet=True, output__dir=str(out))
    return out


def load(path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_train_predict_merge_yaml_from_a_build_with_val_split(latex_build, tmp_path):
    written = write_llamafactory_configs(latex_build, model="Qwen/Qwen2-VL-2B-Instruct", out_dir=tmp_path)
    assert [p.name for p in written] == ["train_lora.yaml", "predict.yaml", "merge.yaml"]
    train, predict, merge = (load(p) for p in written)

    assert train["stage"] == "sft" and train["finetuning_type"] == "lora" and train["template"] == "qwen2_vl"
    assert train["dataset_dir"] == str(latex_build.resolve())
    assert train["dataset"] == "latex_ocr_sample_train"
    assert train["eval_dataset"] == "latex_ocr_sample_val" and "val_size" not in train
    assert train["image_max_pixels"] == LF_IMAGE_MAX_PIXELS  # the recipe copies images: LLaMA-Factory's default
    assert train["cutoff_len"] % 128 == 0 and 128 <= train["cutoff_len"] <= 1024
    longest = json.loads((latex_build / "mmdata_build.json").read_text())["tokens"]["max"]
    assert train["cutoff_len"] - 128 < longest <= train["cutoff_len"]  # the build's longest record, rounded up
    assert "deepspeed" not in train

    assert predict["do_predict"] and predict["predict_with_generate"]
    assert predict["eval_dataset"] == "latex_ocr_sample_val"  # no test split: the val split is predicted
    assert predict["adapter_name_or_path"] == train["output_dir"]
    assert merge["adapter_name_or_path"] == train["output_dir"] and merge["template"] == "qwen2_vl"
    assert merge["export_dir"].endswith("lora_merged")


def test_every_generated_key_is_a_llamafactory_argument(latex_build, tmp_path):
    names = llamafactory_argument_names()
    assert names["llamafactory_version"] == "0.9.5"
    for path in write_llamafactory_configs(latex_build, out_dir=tmp_path, deepspeed=2):
        if path.suffix == ".yaml":
            command = "export" if path.name == "merge.yaml" else "train"
            assert set(load(path)) <= names[command], path.name


def test_test_split_is_predicted_and_no_split_uses_val_size(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(12)))
    for name, split in (("three", {"val": 2, "test": 3}), ("plain", {}), ("held", {"val": 8, "test": 4})):
        recipe = {"name": name, "source": {"type": "jsonl", "path": str(rows)}, "split": split,
                  "output": {"dir": str(tmp_path / name)}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mmdata.BuildWarning)  # "held" has no train split, on purpose
            mmdata.build(str(tmp_path / f"{name}.yaml"), quiet=True)

    write_llamafactory_configs(tmp_path / "three")
    assert load(tmp_path / "three" / "predict.yaml")["eval_dataset"] == "three_test"
    assert load(tmp_path / "three" / "train_lora.yaml")["eval_dataset"] == "three_val"
    with pytest.raises(LlamaFactoryConfigError, match="already holds a val split"):
        write_llamafactory_configs(tmp_path / "three", val_size=0.1)

    write_llamafactory_configs(tmp_path / "plain", val_size=0.1)
    train = load(tmp_path / "plain" / "train_lora.yaml")
    assert train["dataset"] == "plain" and train["val_size"] == 0.1 and "eval_dataset" not in train
    write_llamafactory_configs(tmp_path / "plain")
    assert "val_size" not in load(tmp_path / "plain" / "train_lora.yaml")
    # no held-out split: predict.yaml can only predict on train, and says so (it used to without a word)
    assert load(tmp_path / "plain" / "predict.yaml")["eval_dataset"] == "plain"
    assert "predicts on the training set" in (tmp_path / "plain" / "predict.yaml").read_text()
    assert "predicts on the training set" not in (tmp_path / "three" / "predict.yaml").read_text()
    with pytest.raises(LlamaFactoryConfigError, match="no train split to train on"):
        write_llamafactory_configs(tmp_path / "held")


def test_image_max_pixels_follows_the_recipe(tmp_path):
    out = tmp_path / "small"
    mmdata.build("latex_ocr_sample", quiet=True, output__dir=str(out), images__mode="convert",
                 images__max_pixels="40000")
    write_llamafactory_configs(out)
    assert load(out / "train_lora.yaml")["image_max_pixels"] == 40000


def test_deepspeed_zero_stages(latex_build, tmp_path):
    for stage in (0, 2, 3):
        written = write_llamafactory_configs(latex_build, out_dir=tmp_path / f"z{stage}", deepspeed=stage)
        ds = written[-1]
        assert ds.name == f"ds_z{stage}_config.json"
        assert json.loads(ds.read_text())["zero_optimization"]["stage"] == stage
        assert load(written[0])["deepspeed"] == str(ds)
        assert "deepspeed" not in load(written[1])  # predict_with_generate is incompatible with ZeRO-3
    with pytest.raises(LlamaFactoryConfigError, match="ZeRO stage"):
        write_llamafactory_configs(latex_build, out_dir=tmp_path, deepspeed=1)


def test_unknown_keys_are_refused_with_a_suggestion(latex_build, tmp_path):
    with pytest.raises(LlamaFactoryConfigError, match=r"'lora_rnak' \(did you mean 'lora_rank'"):
        write_llamafactory_configs(latex_build, out_dir=tmp_path, extra={"lora_rnak": 16})
    assert not (tmp_path / "train_lora.yaml").exists()  # nothing written when a key is wrong
    with pytest.raises(LlamaFactoryConfigError, match="llamafactory-cli export"):
        check_keys({"export_dir": "x", "do_train": True}, "export")


def test_set_replaces_or_adds_train_keys(latex_build, tmp_path):
    write_llamafactory_configs(latex_build, out_dir=tmp_path, extra={"save_steps": 50, "freeze_vision_tower": False})
    train = load(tmp_path / "train_lora.yaml")
    assert train["save_steps"] == 50 and train["freeze_vision_tower"] is False


def test_set_of_a_shared_key_changes_all_three_files_and_bad_values_are_refused(latex_build, tmp_path, monkeypatch):
    """--set template=... changed train_lora.yaml alone (predict and merge ran another template); --set val_size
    slipped past the --val-size check; numeric options were written as given (--cutoff-len -5) or dropped
    (--max-steps 0); a relative model folder was written relative."""
    write_llamafactory_configs(latex_build, out_dir=tmp_path, extra={"template": "qwen2_vl", "cutoff_len": 300})
    for name in ("train_lora.yaml", "predict.yaml"):
        assert load(tmp_path / name)["template"] == "qwen2_vl" and load(tmp_path / name)["cutoff_len"] == 300
    assert load(tmp_path / "merge.yaml")["template"] == "qwen2_vl"
    with pytest.raises(LlamaFactoryConfigError, match="--set val_size: the build already holds a val split"):
        write_llamafactory_configs(latex_build, out_dir=tmp_path / "v", extra={"val_size": 0.1})
    with pytest.raises(LlamaFactoryConfigError, match="--set output_dir: use --output-dir"):
        write_llamafactory_configs(latex_build, out_dir=tmp_path / "o", extra={"output_dir": "x"})
    for option, value in (("cutoff_len", -5), ("cutoff_len", 0), ("max_steps", 0), ("lora_rank", 0),
                          ("batch_size", 0), ("learning_rate", -1.0), ("val_size", 1.5)):
        with pytest.raises(LlamaFactoryConfigError, match=f"--{option.replace('_', '-')} {value}"):
            write_llamafactory_configs(latex_build, out_dir=tmp_path / "bad", **{option: value})
    assert not (tmp_path / "bad").exists()
    local = tmp_path / "models" / "mine"
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    monkeypatch.chdir(tmp_path)
    write_llamafactory_configs(latex_build, out_dir=tmp_path / "rel", model="./models/mine")
    assert all(load(tmp_path / "rel" / name)["model_name_or_path"] == str(local)
               for name in ("train_lora.yaml", "predict.yaml", "merge.yaml"))


def test_smoke_run_options(latex_build, tmp_path):
    write_llamafactory_configs(latex_build, out_dir=tmp_path, model="/models/tiny", max_steps=3, precision="fp32",
                               num_workers=1, cutoff_len=1024)
    train = load(tmp_path / "train_lora.yaml")
    assert train["model_name_or_path"] == "/models/tiny" and train["max_steps"] == 3
    assert train["logging_steps"] == 3  # so trainer_log.jsonl gets a loss within the run
    assert "bf16" not in train and "fp16" not in train and train["cutoff_len"] == 1024


def test_image_tokens_match_qwen2vl_in_llamafactory():
    # The conformance run checks this formula against LLaMA-Factory 0.9.5's input_ids for these sizes.
    assert image_tokens(28, 28) == 4          # upscaled to Qwen2-VL's min_pixels (56x56)
    assert image_tokens(300, 200) == 77       # 308x196 -> 22x14 patches -> /4
    assert image_tokens(1200, 900) == 768     # first downscaled to image_max_pixels (768*768) by LLaMA-Factory
    assert image_tokens(1200, 900, max_pixels=40000) == 48  # 230x173 -> 224x168 -> 16x12 patches -> /4


def test_not_a_build_folder(tmp_path):
    with pytest.raises(LlamaFactoryConfigError, match="mmdata_build.json"):
        write_llamafactory_configs(tmp_path)


def test_a_hand_edited_dataset_info_is_one_clear_error(latex_build, tmp_path):
    """Invalid JSON was a traceback; an entry whose file is gone gave configs that failed in LLaMA-Factory."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(latex_build, copy)
    info = json.loads((copy / "dataset_info.json").read_text())
    info["latex_ocr_sample_train"]["file_name"] = "nothere"
    (copy / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(LlamaFactoryConfigError, match="names file_name 'nothere', which does not exist"):
        write_llamafactory_configs(copy)
    (copy / "dataset_info.json").write_text('{"x": {')
    with pytest.raises(LlamaFactoryConfigError, match="not valid JSON"):
        write_llamafactory_configs(copy)


def test_a_local_model_folder_with_a_tokenizer_sets_cutoff_len_from_exact_counts(latex_build, tmp_path, capsys):
    """The estimate wrote cutoff_len 128 for records the tiny model's tokenizer counts to 190: truncated."""
    pytest.importorskip("torch")
    from mmdata.train.tiny import make_tiny_qwen2vl

    model = make_tiny_qwen2vl(tmp_path / "tiny")
    write_llamafactory_configs(latex_build, out_dir=tmp_path / "c", model=str(model))
    cutoff = load(tmp_path / "c" / "train_lora.yaml")["cutoff_len"]
    assert main(["validate", str(latex_build), "--model", str(model), "--cutoff-len", str(cutoff)]) == 0
    report = capsys.readouterr().out
    assert "counted with the tokenizer" in report and report.count(f"(0.0%) over cutoff_len {cutoff}") == 2


def test_cli(latex_build, tmp_path, capsys):
    rc = main(["llamafactory", str(latex_build), "--out-dir", str(tmp_path), "--deepspeed", "3", "--max-steps", "5",
               "--set", "save_steps=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "train_lora.yaml" in out and "ds_z3_config.json" in out
    assert load(tmp_path / "train_lora.yaml")["save_steps"] == 2
    assert main(["llamafactory", str(tmp_path / "nope")]) != 0


def test_argument_names_ship_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "llamafactory_args.json" in package_data["mmdata"], "add it to [tool.setuptools.package-data] mmdata = [...]"


@pytest.mark.parametrize("model, template", [
    ("qwen3_vl", "qwen3_vl"), ("qwen3_vl_nothink", "qwen3_vl_nothink"), ("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl_nothink"),
    ("Qwen/Qwen3-VL-8B-Thinking", "qwen3_vl"), ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_vl"), ("qwen2_5_vl", "qwen2_vl"),
    ("google/gemma-3-4b-it", "gemma3"), ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"),
])
def test_model_decides_template_and_cutoff(latex_build, tmp_path, model, template):
    """``--model`` (profile name or hub id) sets the template of all three YAMLs and the cutoff from that model's
    counts; every key still passes the pinned LLaMA-Factory's argument check."""
    from mmdata.lfconfig import measure_tokens, read_build, round_up
    from mmdata.profiles import resolve_model

    write_llamafactory_configs(latex_build, out_dir=tmp_path, model=model)
    train, predict, merge = (load(tmp_path / f) for f in ("train_lora.yaml", "predict.yaml", "merge.yaml"))
    assert train["template"] == predict["template"] == merge["template"] == template
    _, profile = resolve_model(model)
    expected = measure_tokens(read_build(latex_build), train["image_max_pixels"], profile)
    assert train["cutoff_len"] == round_up(expected.max_tokens)
    assert train["image_min_pixels"] == profile.lf.image_min_pixels


def test_build_with_a_model_counts_for_it_and_llamafactory_reuses_the_count(tmp_path):
    from tests.conftest import LATEX_OCR_HUB

    import mmdata
    from mmdata.lfconfig import measure_tokens, read_build

    if not LATEX_OCR_HUB.is_dir():
        pytest.skip("shared LaTeX_OCR fixture not present")
    budgets = {}
    for model in ("qwen2_vl", "qwen3_vl", "gemma3"):
        result = mmdata.build("latex_ocr", output__dir=str(tmp_path / model), source__path=str(LATEX_OCR_HUB),
                              source__subset="small", source__hub="hf", model=model, num_proc=1)
        assert result.tokens["model"] == model
        budgets[model] = result.tokens["max"]
        build = read_build(result.output_dir)
        from mmdata.profiles import get_profile
        assert measure_tokens(build, 768 * 768, get_profile(model)).source == "manifest"
        assert measure_tokens(build, 768 * 768, get_profile("internvl")).source == "measured"
    assert len(set(budgets.values())) == 3  # three models, three different budgets for the same records


def test_without_model_the_yamls_follow_the_builds_model_and_pixel_overrides_are_counted(tmp_path):
    """A build made for Qwen3-VL got Qwen2-VL's checkpoint and template when --model was left out; and
    `--set image_max_pixels=...` changed the YAMLs but kept the cutoff_len measured at the build's budget, so
    LLaMA-Factory would cut records inside their image tokens."""
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (1600, 1200), (90, 20, 20)).save(tmp_path / "imgs" / "big.png")
    rows = [{"messages": [{"role": "user", "content": "<image>What is it?"},
                          {"role": "assistant", "content": "A red square."}], "images": ["imgs/big.png"]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "q3", "model": "qwen3_vl",
                                                     "source": {"type": "jsonl", "path": "d.jsonl"},
                                                     "output": {"dir": str(tmp_path / "out")}}))
    build = mmdata.build(str(tmp_path / "r.yaml"), num_proc=1).output_dir
    train = load(write_llamafactory_configs(build, out_dir=tmp_path / "a")[0])
    assert train["template"] == "qwen3_vl" and "Qwen3-VL" in train["model_name_or_path"]
    bigger = load(write_llamafactory_configs(build, out_dir=tmp_path / "b",
                                             extra={"image_max_pixels": 1600 * 1200})[0])
    assert bigger["image_max_pixels"] == 1600 * 1200
    assert bigger["cutoff_len"] > train["cutoff_len"] + 1000  # ~1,875 image tokens instead of ~576
    with pytest.raises(LlamaFactoryConfigError, match="image_max_pixels"):
        write_llamafactory_configs(build, out_dir=tmp_path / "c", extra={"image_max_pixels": "big"})
