"""examples/: every example runs offline into tmp_path and writes what its README says it writes.

Each example's script runs once per module (a fixture), from a scratch working directory, with its output folder in
tmp_path and the hub libraries forced offline; the tests then read the real outputs. A README's "## Output" block
lists paths relative to the output folder: each must exist, and nothing else may appear at the top of the folder.
The example folders themselves must be left untouched.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.conftest import REPO, read_jsonl_dir

import mmdata
from mmdata.lfconfig import llamafactory_argument_names

EXAMPLES = REPO / "examples"
NAMES = ["medtrinity_to_llamafactory", "latex_ocr_train_predict", "custom_csv", "mixture_image_and_text",
         "llamafactory_multi_gpu", "python_api"]
TRAIN_MODULES = ("torch", "transformers", "peft", "torchvision", "sacrebleu")


def mmdata_command() -> str:
    script = Path(sys.executable).parent / "mmdata"
    return str(script) if script.exists() else f"{shlex.quote(sys.executable)} -m mmdata.cli"


def example_files(name: str) -> dict[str, tuple[int, int]]:
    folder = EXAMPLES / name
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def run_example(name: str, workdir: Path, *args: str, timeout: int = 600) -> str:
    """Run ``examples/NAME/run.sh`` (or ``run.py``) with ``args`` from ``workdir``; return its stdout."""
    folder = EXAMPLES / name
    script = folder / "run.sh"
    command = ["bash", str(script)] if script.exists() else [sys.executable, str(folder / "run.py")]
    env = {**os.environ, "MMDATA": mmdata_command(), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLCONFIGDIR": str(workdir / ".mpl")}
    before = example_files(name)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    done = subprocess.run([*command, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"{name}: {time.monotonic() - start:.1f} s")
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert example_files(name) == before, f"{name} wrote into examples/{name}"
    return done.stdout


def readme_outputs(name: str) -> list[str]:
    """The paths listed in the ```text block under "## Output" of the example's README."""
    text = (EXAMPLES / name / "README.md").read_text(encoding="utf-8")
    section = text.split("## Output", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def assert_outputs_match_readme(name: str, out: Path) -> None:
    listed = readme_outputs(name)
    missing = [p for p in listed if not (out / p).exists()]
    assert not missing, f"{name}: README lists {missing}, not written"
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {p.split("/")[0] for p in listed}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def assert_llamafactory_keys(folder: Path) -> None:
    """Every key of every YAML is an argument of the pinned LLaMA-Factory (train, or export for merge.yaml)."""
    names = llamafactory_argument_names()
    for path in sorted(folder.glob("*.yaml")):
        command = "export" if path.name == "merge.yaml" else "train"
        unknown = set(load_yaml(path)) - names[command]
        assert not unknown, f"{path.name}: not `llamafactory-cli {command}` arguments: {unknown}"


def manifest(build: Path) -> dict:
    return json.loads((build / "mmdata_build.json").read_text(encoding="utf-8"))


def assert_validates(build: Path, stdout: str) -> None:
    assert "OK: 0 error(s), 0 warning(s), 0 note(s)" in stdout
    report = mmdata.validate(str(build / "dataset_info.json"))
    assert report.ok and not report.problems


# ------------------------------------------------------------------------------------------------ the folder


def test_every_example_has_a_readme_a_script_and_an_index_entry():
    index = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    found = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert found == sorted(NAMES)
    for name in NAMES:
        readme = (EXAMPLES / name / "README.md").read_text(encoding="utf-8")
        script = EXAMPLES / name / ("run.sh" if (EXAMPLES / name / "run.sh").exists() else "run.py")
        assert script.exists(), name
        runner = "bash" if script.suffix == ".sh" else "python"
        assert f"{runner} examples/{name}/{script.name}" in readme and f"({name}/)" in index, name
        if script.suffix == ".sh":
            assert "set -euo pipefail" in script.read_text(encoding="utf-8")
            assert '"${MMDATA:-mmdata}"' in script.read_text(encoding="utf-8")
        assert readme_outputs(name), f"{name}: README has no ## Output block"


def test_default_output_folder_is_under_the_current_directory(tmp_path):
    run_example("custom_csv", tmp_path)
    assert (tmp_path / "out" / "custom_csv" / "build" / "dataset_info.json").is_file()


# ------------------------------------------------------------------------------------------------ medtrinity


@pytest.fixture(scope="module")
def medtrinity(tmp_path_factory):
    out = tmp_path_factory.mktemp("medtrinity") / "out"
    return out, run_example("medtrinity_to_llamafactory", out.parent / "cwd", str(out))


def test_medtrinity_builds_the_builtin_recipe_offline(medtrinity):
    import pyarrow.parquet as pq

    out, stdout = medtrinity
    assert_outputs_match_readme("medtrinity_to_llamafactory", out)
    build = out / "build"
    counts = manifest(build)["counts"]
    assert (counts["read"], counts["written"], counts["rejected"]) == (24, 24, 0)
    assert counts["by_split"] == {"train": 20, "val": 4}
    assert_validates(build, stdout)
    table = pq.read_table(out / "hub/UCSC-VLAA--MedTrinity-25M/25M_demo/train-00000-of-00001.parquet").to_pylist()
    records = read_jsonl_dir(build / "medtrinity_demo_train") + read_jsonl_dir(build / "medtrinity_demo_val")
    assert sorted(r["messages"][1]["content"] for r in records) == sorted(row["caption"] for row in table)
    assert {r["messages"][0]["content"] for r in records} == {"<image>图片中的诊断结果是怎样?"}
    written = sorted((build / r["images"][0]).read_bytes() for r in records)
    assert written == sorted(row["image"]["bytes"] for row in table)  # original JPEG bytes, copied


def test_medtrinity_llamafactory_yamls_and_commands(medtrinity):
    out, stdout = medtrinity
    build = out / "build"
    assert_llamafactory_keys(build)
    train, predict, merge = (load_yaml(build / f) for f in ("train_lora.yaml", "predict.yaml", "merge.yaml"))
    assert train["dataset_dir"] == predict["dataset_dir"] == str(build)
    info = json.loads((build / "dataset_info.json").read_text(encoding="utf-8"))
    assert train["dataset"] == "medtrinity_demo_train" and train["eval_dataset"] == "medtrinity_demo_val"
    assert predict["eval_dataset"] == "medtrinity_demo_val" and {train["dataset"], train["eval_dataset"]} <= set(info)
    assert train["model_name_or_path"] == "Qwen/Qwen2-VL-2B-Instruct" and train["template"] == "qwen2_vl"
    assert merge["adapter_name_or_path"] == predict["adapter_name_or_path"] == train["output_dir"]
    commands = [line for line in (out / "llamafactory_commands.sh").read_text().splitlines() if line[:1] != "#"]
    assert commands == [f"llamafactory-cli train {build}/train_lora.yaml", f"llamafactory-cli train {build}/predict.yaml",
                        f"llamafactory-cli export {build}/merge.yaml"]
    assert all(line in stdout for line in commands)


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def latex_run(tmp_path_factory):
    for module in TRAIN_MODULES:
        pytest.importorskip(module)
    out = tmp_path_factory.mktemp("latex") / "out"
    return out, run_example("latex_ocr_train_predict", out.parent / "cwd", str(out))


def test_latex_training_logs_a_finite_loss_every_step(latex_run):
    out, stdout = latex_run
    assert_outputs_match_readme("latex_ocr_train_predict", out)
    assert_validates(out / "build", stdout)
    state = json.loads((out / "run" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 8 and len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < losses[0], losses  # lr 1e-2 on 36 samples: it learns something
    assert "loss by step: 1: " in stdout
    record = json.loads((out / "run" / "mmdata_train.json").read_text())
    assert record["data"]["train"] == {"kept": 36, "dropped": {}}
    assert (out / "run" / "adapter_model.safetensors").stat().st_size > 0


def test_latex_predictions_metrics_and_export(latex_run):
    from transformers import AutoProcessor

    out, stdout = latex_run
    rows = [json.loads(line) for line in (out / "predict" / "generated_predictions.jsonl").read_text().splitlines()]
    labels = [r["messages"][-1]["content"] for r in read_jsonl_dir(out / "build" / "latex_ocr_sample_val")]
    assert len(rows) == 4 and [r["label"] for r in rows] == labels
    assert all(set(r) == {"prompt", "predict", "label"} for r in rows)
    metrics = json.loads((out / "predict" / "metrics.json").read_text())
    assert metrics["count"] == 4 and {"exact_match", "cer", "bleu", "rouge_l"} <= set(metrics)

    merged = out / "merged"
    files = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert files & {"chat_template.jinja", "chat_template.json"}, files
    assert files & {"processor_config.json", "preprocessor_config.json"}, files
    processor = AutoProcessor.from_pretrained(merged)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "hi"}]}], tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>hi" in text and text.endswith("<|im_start|>assistant\n")
    assert f"exported {merged}: " in stdout


# ------------------------------------------------------------------------------------------------ custom CSV


@pytest.fixture(scope="module")
def custom_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("csv") / "out"
    return out, run_example("custom_csv", out.parent / "cwd", str(out))


def test_custom_csv_builds_every_good_row_and_rejects_the_missing_image(custom_csv):
    import csv

    out, stdout = custom_csv
    assert_outputs_match_readme("custom_csv", out)
    build = out / "build"
    counts = manifest(build)["counts"]
    assert (counts["read"], counts["written"], counts["rejected"]) == (13, 12, 1)
    assert counts["rejected_by_reason"] == {"image file not found": 1} and counts["by_split"] == {"train": 10, "val": 2}
    rejects = [json.loads(line) for line in (build / "rejects.jsonl").read_text().splitlines()]
    assert [(r["position"], r["reason"]) for r in rejects] == [(12, "image file not found")]
    assert "read 13  written 12  rejected 1" in stdout
    assert_validates(build, stdout)
    with open(out / "my_dataset" / "train.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    records = read_jsonl_dir(build / "my_formulas_train") + read_jsonl_dir(build / "my_formulas_val")
    assert sorted(r["messages"][1]["content"] for r in records) == sorted(row["text"] for row in rows[:12])
    assert {r["messages"][0]["content"] for r in records} == {"<image>Write the LaTeX formula shown in the image."}
    assert (out / "my_dataset" / "recipe.yaml").read_text() == (EXAMPLES / "custom_csv" / "recipe.yaml").read_text()


# ------------------------------------------------------------------------------------------------ mixture


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixture") / "out"
    return out, run_example("mixture_image_and_text", out.parent / "cwd", str(out))


def test_mixture_holds_image_and_text_only_records(mixture):
    out, stdout = mixture
    assert_outputs_match_readme("mixture_image_and_text", out)
    build = out / "build"
    counts = manifest(build)["counts"]
    assert counts["by_source"] == {"latex_chat": 12, "latex_ocr_sample": 30}
    assert counts["by_split"] == {"train": 38, "val": 4} and counts["rejected"] == 0
    assert_validates(build, stdout)
    records = read_jsonl_dir(build / "ocr_and_chat_train") + read_jsonl_dir(build / "ocr_and_chat_val")
    text_only = [r for r in records if not r["images"]]
    with_image = [r for r in records if r["images"]]
    assert len(text_only) == 12 and len(with_image) == 30
    assert all(r["messages"][0] == {"role": "system", "content": "You answer questions about LaTeX briefly."}
               for r in text_only)
    assert all(len(r["images"]) == 1 and (build / r["images"][0]).is_file() for r in with_image)
    # interleaved by seed, not one dataset after the other
    positions = [i for i, r in enumerate(read_jsonl_dir(build / "ocr_and_chat_train")) if not r["images"]]
    assert positions[-1] - positions[0] + 1 > len(positions), positions


# ------------------------------------------------------------------------------------------------ multi-GPU


@pytest.fixture(scope="module")
def multi_gpu(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_gpu") / "out"
    return out, run_example("llamafactory_multi_gpu", out.parent / "cwd", str(out))


@pytest.mark.parametrize("folder, stage, model", [("zero2_7b", 2, "Qwen/Qwen2-VL-7B-Instruct"),
                                                  ("zero3_72b", 3, "Qwen/Qwen2-VL-72B-Instruct")])
def test_multi_gpu_yamls_use_deepspeed_and_are_llamafactory_arguments(multi_gpu, folder, stage, model):
    out, _ = multi_gpu
    assert_outputs_match_readme("llamafactory_multi_gpu", out)
    configs = out / folder
    assert_llamafactory_keys(configs)
    train, predict, merge = (load_yaml(configs / f) for f in ("train_lora.yaml", "predict.yaml", "merge.yaml"))
    ds = configs / f"ds_z{stage}_config.json"
    assert train["deepspeed"] == str(ds) and json.loads(ds.read_text())["zero_optimization"]["stage"] == stage
    assert "deepspeed" not in predict and predict["do_predict"] and predict["predict_with_generate"]
    assert train["model_name_or_path"] == predict["model_name_or_path"] == merge["model_name_or_path"] == model
    assert train["output_dir"] == str(out / "saves" / folder / "lora_sft") == predict["adapter_name_or_path"]
    assert predict["eval_dataset"] == train["eval_dataset"] == "latex_ocr_sample_val"
    assert train["dataset_dir"] == str(out / "build")


def test_multi_gpu_commands(multi_gpu):
    out, stdout = multi_gpu
    commands = [line for line in (out / "llamafactory_commands.sh").read_text().splitlines() if line[:1] != "#"]
    assert commands == [f"FORCE_TORCHRUN=1 NPROC_PER_NODE=8 llamafactory-cli train {out}/zero2_7b/train_lora.yaml",
                        f"FORCE_TORCHRUN=1 NPROC_PER_NODE=8 llamafactory-cli train {out}/zero3_72b/train_lora.yaml",
                        f"llamafactory-cli train {out}/zero3_72b/predict.yaml",
                        f"llamafactory-cli export {out}/zero3_72b/merge.yaml"]
    assert all(line in stdout for line in commands)
    assert not (out / "saves").exists()  # nothing trained


# ------------------------------------------------------------------------------------------------ Python API


def test_python_api_notebook(tmp_path):
    out = tmp_path / "out"
    stdout = run_example("python_api", tmp_path / "cwd", str(out))
    assert_outputs_match_readme("python_api", out)
    counts = json.loads(re.search(r"^counts: (.*)$", stdout, re.M).group(1))
    assert (counts["read"], counts["written"], counts["rejected"]) == (20, 20, 0)
    assert counts["by_split"] == {"train": 18, "val": 2}
    assert manifest(out / "latex")["counts"]["written"] == 20
    assert f"{len(mmdata.list_recipes())} built-in recipes" in stdout
    assert "up to date: True" in stdout and "validate ok: True" in stdout
    assert "unknown key 'max_sample'; did you mean 'max_samples'?" in stdout
