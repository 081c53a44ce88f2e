"""The LLaMA-Factory side of the conformance run: runs in the isolated venv; of mmdata it imports only the tiny-model
writer (``mmdata.train.tiny`` from the checkout's ``src/``), so the model is made by LLaMA-Factory's transformers.

    python lf_checks.py tiny MODEL_DIR [FAMILY]          write a tiny random model (qwen2_vl, qwen2_5_vl, qwen3_vl)
    python lf_checks.py load WORK MODEL_DIR [TEMPLATE]   load every dataset of WORK/expected.json through LLaMA-Factory
    python lf_checks.py trained OUTPUT_DIR    check a `llamafactory-cli train` output: adapter + finite loss
    python lf_checks.py predicted OUTPUT_DIR BUILD_DIR   one prediction per record of predict.yaml's eval_dataset

``load`` goes through LLaMA-Factory's own ``get_train_args`` -> ``load_tokenizer`` ->
``get_template_and_fix_tokenizer`` -> ``get_dataset`` (stage sft, template qwen2_vl or the one given), one dataset at
a time, and
asserts that every record came through (LLaMA-Factory drops malformed examples with only a warning) and that each
record's ``<|image_pad|>`` count equals what mmdata predicted for its images. Then it asserts that the deliberately
broken copy fails there, with LLaMA-Factory's own error message.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MISMATCH = "The number of images does not match the number of <image> tokens"


def make_tiny(model_dir: str, family: str = "qwen2_vl") -> None:
    sys.path.insert(0, str(REPO / "src"))
    from mmdata.train.tiny import make_tiny_model

    print(f"tiny {family}: {make_tiny_model(model_dir, family)}")


def lf_dataset(dataset_dir: str, name: str, model_dir: str, image_max_pixels: int, scratch: Path,
               template: str = "qwen2_vl"):
    """The tokenized train dataset LLaMA-Factory makes of ``name``, and its tokenizer."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args({
        "model_name_or_path": model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "dataset_dir": dataset_dir, "dataset": name, "template": template, "cutoff_len": 16384,
        "image_max_pixels": image_max_pixels, "overwrite_cache": True, "output_dir": str(scratch / "out"),
        "report_to": "none",
    })
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    return module["train_dataset"], tokenizer_module["tokenizer"]


def check_load(work: str, model_dir: str, template: str = "qwen2_vl") -> None:
    """Every dataset through LLaMA-Factory under ``template``; the expected ``<|image_pad|>`` counts are mmdata's for
    that model (``expected.json``: ``image_tokens`` for Qwen2-VL, ``image_tokens_<template>`` for the others)."""
    work = Path(work)
    expected = json.loads((work / "expected.json").read_text())
    key = "image_tokens" if template == "qwen2_vl" else f"image_tokens_{template}"
    failures = []
    for name, want in expected["datasets"].items():
        want = {**want, "image_tokens": want[key]}
        t0 = time.time()
        try:
            ds, tokenizer = lf_dataset(expected["dataset_dir"], name, model_dir, expected["image_max_pixels"], work,
                                       template)
        except Exception as e:  # report every dataset, not just the first failure
            print(f"  {name:<24} {want['split']:<5} FAIL LLaMA-Factory raised {type(e).__name__}: {str(e)[:300]}")
            failures.append(name)
            continue
        pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        got = [row["input_ids"].count(pad_id) for row in ds]
        trained = [sum(1 for label in row["labels"] if label != -100) for row in ds]
        problems = []
        if len(ds) != want["count"]:
            problems.append(f"{len(ds)} records came through, mmdata wrote {want['count']}")
        elif sorted(got) != sorted(want["image_tokens"]):  # a folder of shards loads in os.listdir order
            problems.append(f"<|image_pad|> per record: LLaMA-Factory {sorted(got)}, mmdata {sorted(want['image_tokens'])}")
        if not all(trained):
            problems.append("a record has no trainable (assistant) tokens")
        status = "FAIL " + "; ".join(problems) if problems else "ok"
        print(f"  {name:<24} {want['split']:<5} {len(ds):>3} records, {sum(got):>5} image tokens "
              f"({time.time() - t0:.1f}s) {status}", flush=True)
        if problems:
            failures.append(name)

    broken = expected["broken"]
    try:
        lf_dataset(broken["dataset_dir"], broken["name"], model_dir, expected["image_max_pixels"], work, template)
    except ValueError as e:
        if MISMATCH not in str(e):
            failures.append(f"broken dataset failed for another reason: {e}")
        print(f"conformance: {broken['name']} rejected by LLaMA-Factory as expected: {str(e)[:110]}...")
    else:
        failures.append("LLaMA-Factory accepted the broken dataset")
    if failures:
        sys.exit(f"conformance: FAILED: {failures}")
    print(f"conformance: all {len(expected['datasets'])} datasets load in LLaMA-Factory; broken one rejected")


def check_trained(output_dir: str) -> None:
    out = Path(output_dir)
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors", "trainer_log.jsonl")
               if not (out / f).is_file()]
    if missing:
        sys.exit(f"conformance: training wrote no {', '.join(missing)} in {out}")
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    if not losses or not all(math.isfinite(v) for v in losses):
        sys.exit(f"conformance: trainer_log.jsonl has no finite loss: {logs}")
    print(f"conformance: trained {logs[-1].get('current_steps')} steps, losses {losses}; adapter in {out}")


def check_predicted(output_dir: str, build_dir: str) -> None:
    import yaml

    names = yaml.safe_load((Path(build_dir) / "predict.yaml").read_text())["eval_dataset"].split(",")
    datasets = json.loads((Path(build_dir) / "mmdata_build.json").read_text())["datasets"]
    want = sum(datasets[n]["count"] for n in names)
    path = Path(output_dir) / "generated_predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if len(rows) != want or not all({"prompt", "predict", "label"} <= set(r) for r in rows):
        sys.exit(f"conformance: {path}: {len(rows)} predictions with prompt/predict/label, expected {want}")
    print(f"conformance: {len(rows)} predictions for {', '.join(names)} in {path}")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"tiny": make_tiny, "load": check_load, "trained": check_trained, "predicted": check_predicted}[command](*rest)
