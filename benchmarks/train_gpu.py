"""GPU benchmark of ``mmdata train`` against LLaMA-Factory's own trainer and the tutorial's Qwen2-VL LoRA script.

Model: the exact Qwen2-VL-2B-Instruct architecture with random bf16 weights and a tokenizer whose special tokens
have the real ids (no weights can be downloaded where this runs). Data: LaTeX-OCR-shaped (500x100 formula images,
~100-token answers) and MedTrinity-shaped (512x512 scans, ~150-word captions) sources, each turned into one real
``mmdata build`` that every contender trains on; ``mmdata llamafactory`` writes LLaMA-Factory's YAML for it.
Setting, equal for all: LoRA r=64, alpha=16, dropout 0.05 on q/k/v/o/gate/up/down; 16 samples per optimizer step;
gradient checkpointing; bf16; lr 1e-4 (linear schedule, no warm-up); the build's cutoff_len.

    python benchmarks/train_gpu.py prepare --root /tmp/bench --n 256
    python benchmarks/train_gpu.py peers --root /tmp/bench --out results \\
        --lf-python python3 --lf-path /tmp/lfsite            # LLaMA-Factory's packages, importable first
    torchrun --nproc_per_node 2 benchmarks/train_gpu.py dist --root /tmp/bench --backend ddp --out results

``peers`` runs, on one GPU, one after the other: LLaMA-Factory 0.9.5 (``lf_run.py``, its own process and
packages) without packing, with ``packing`` and with ``neat_packing``; mmdata padded and packed; the tutorial. Each
reports samples/s, real tokens/s, peak GPU memory (max allocated), MFU (``measure.py`` says what counts) and the
loss curve, and the table compares mmdata with LLaMA-Factory at the same packing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("mmdata") is None:  # not installed: the checkout's (built-in recipes need the install)
    sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import architecture_flops, step_clock, summarise  # noqa: E402

# Qwen/Qwen2-VL-2B-Instruct config.json (flat hub format); token ids are the real ones.
QWEN2VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}
# Qwen/Qwen3-VL-2B-Instruct config.json (the same special-token ids as Qwen2-VL).
QWEN3VL_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_vl_text", "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936},
    "vision_config": {
        "model_type": "qwen3_vl", "deepstack_visual_indexes": [5, 11, 17], "depth": 24,
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02,
        "intermediate_size": 4096, "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
# family -> (architecture, folder of its random model, 2-layer variant for trying the harness on a CPU)
FAMILIES = {
    "qwen2_vl": (QWEN2VL_2B, "qwen2vl-2b-random", {
        **QWEN2VL_2B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_window_layers": 2,
        "vision_config": {**QWEN2VL_2B["vision_config"], "depth": 2, "embed_dim": 64, "num_heads": 4,
                          "hidden_size": 256}}),
    "qwen3_vl": (QWEN3VL_2B, "qwen3vl-2b-random", {
        **QWEN3VL_2B,
        "text_config": {**QWEN3VL_2B["text_config"], "hidden_size": 256, "intermediate_size": 512,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
        "vision_config": {**QWEN3VL_2B["vision_config"], "deepstack_visual_indexes": [0, 1], "depth": 2,
                          "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 256}}),
}
EOS_ID, PAD_ID = 151645, 151643  # <|im_end|> ends every reply; the tutorial ends its labels with the pad id
MODEL_DIR = FAMILIES["qwen2_vl"][1]  # the tutorial's model
KINDS = ("latex", "med")
SAMPLES_PER_STEP = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LATEX_PROMPT = "Transcribe the formula in this image into LaTeX."
MED_PROMPT = "Describe this medical image in detail."

LATEX_PARTS = [r"\frac{a}{b}", r"x^{2}", r"\sum_{i=1}^{n}", r"\int_{0}^{\infty}", r"\alpha", r"\beta", r"\gamma",
               r"\sqrt{x+y}", r"\left(", r"\right)", r"+", r"-", r"=", r"\cdot", r"\mathbf{E}", r"e^{i\pi}",
               r"\lim_{x\to 0}", r"\sin\theta", r"\cos\theta", r"\log_{2}", r"\partial", r"\nabla", r"y_{k}"]
MED_WORDS = ("the image shows a computed tomography scan of the abdomen with contrast liver kidney spleen lesion "
             "region of interest located in the left upper quadrant hypodense mass measuring approximately "
             "centimeters with irregular margins and surrounding edema no evidence of free fluid vessels appear "
             "patent the findings suggest a benign cyst further evaluation recommended chest radiograph lung "
             "opacity consolidation pleural effusion cardiomegaly within normal limits tissue").split()


# ------------------------------------------------------------------------------------------------ preparation


def prepare(root: Path, n: int, small: bool = False, family: str = "qwen2_vl") -> None:
    """The random model, then per dataset: a JSONL source with images, its mmdata build (shared by the families),
    LLaMA-Factory's YAML for this family.

    ``small``: a 2-layer model with the same token ids and vision geometry, to try the harness on a CPU."""
    import torch

    from mmdata.train.tiny import write_random_model, write_tokenizer_and_processor

    config, folder, small_config = FAMILIES[family]
    model_dir = root / folder
    if not (model_dir / "model.safetensors.index.json").exists() and not (model_dir / "model.safetensors").exists():
        ids, _ = write_tokenizer_and_processor(model_dir, pad_vocab_to=151643, family=family)
        assert ids["<|image_pad|>"] == config["image_token_id"]
        write_random_model(model_dir, small_config if small else config, dtype=torch.bfloat16,
                           device="cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for kind in KINDS:
        _make_source(root / f"source_{kind}", kind, n, tok)
        _build(root, kind, family)


def _make_source(src: Path, kind: str, n: int, tok) -> None:
    from concurrent.futures import ProcessPoolExecutor

    if (src / "rows.jsonl").exists():
        return
    rng = random.Random(0)
    (src / "images").mkdir(parents=True, exist_ok=True)
    records, jobs = [], []
    for i in range(n):
        if kind == "latex":
            answer = ""
            while len(tok(answer).input_ids) < rng.randint(90, 110):
                answer += rng.choice(LATEX_PARTS) + " "
            answer = answer.strip()
            prompt = LATEX_PROMPT
        else:
            answer = " ".join(rng.choice(MED_WORDS) for _ in range(150)).capitalize() + "."
            prompt = MED_PROMPT
        image = f"images/{i:06d}.{'png' if kind == 'latex' else 'jpg'}"
        jobs.append((str(src / image), kind, answer, i))
        records.append({"messages": [{"role": "user", "content": "<image>" + prompt},
                                     {"role": "assistant", "content": answer}], "images": [image]})
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_draw, jobs, chunksize=32))
    with open(src / "rows.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _build(root: Path, kind: str, family: str) -> None:
    """``mmdata build`` of the source, then ``mmdata llamafactory`` (train_lora.yaml) for the family's random model."""
    import mmdata
    from mmdata.lfconfig import write_llamafactory_configs

    out = root / kind
    if not (out / "mmdata_build.json").exists():
        recipe = root / f"{kind}.yaml"
        recipe.write_text(json.dumps({"name": kind, "source": {"type": "jsonl", "path": f"source_{kind}/rows.jsonl"},
                                      "output": {"dir": str(out)}}))
        mmdata.build(str(recipe), num_proc=min(8, os.cpu_count() or 1))
    if not _lf_yaml(root, kind, family).exists():
        write_llamafactory_configs(out, model=str(root / FAMILIES[family][1]), out_dir=_lf_yaml(root, kind, family).parent,
                                   output_dir=str(root / f"out_lf_{family}_{kind}"),
                                   cutoff_len=_longest_record(root, kind, family))


def _lf_yaml(root: Path, kind: str, family: str) -> Path:
    return root / f"lf_{family}_{kind}" / "train_lora.yaml"


def _longest_record(root: Path, kind: str, family: str, step: int = 128) -> int:
    """The longest record of the build in this model's tokens, rounded up: the build's own estimate counts text
    for the real Qwen tokenizer, and the benchmark's tokenizer (real special-token ids, small vocabulary) splits
    words into more pieces, so both trainers get the exact figure (nothing dropped or cut)."""
    dataset, _ = _encoded(root, kind, root / FAMILIES[family][1], cutoff_len=1 << 20)
    return -(-max(dataset.lengths) // step) * step


def _encoded(root: Path, kind: str, model_dir: Path, **limits):
    """``(dataset, processor)``: the build's train split encoded as the trainer encodes it (768 x 768 pixels)."""
    from transformers import AutoProcessor

    from mmdata.train.data import build_dataset, read_conversations, resolve_split

    processor = AutoProcessor.from_pretrained(model_dir)
    info, names = resolve_split(root / kind, "train")
    dataset, _ = build_dataset(processor, read_conversations(info, names), min_pixels=3136, max_pixels=768 * 768,
                               **limits)
    return dataset, processor


def _draw(job) -> None:
    """Formula images: 500x100 (the tutorial resizes to one fixed size, so the data uses one); scans: 512x512."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, kind, text, seed = job
    if kind == "latex":
        im = Image.new("RGB", (500, 100), "white")
        ImageDraw.Draw(im).text((5, 40), text[:80], fill="black")
        im.save(path)
    else:
        rs = np.random.RandomState(seed)
        base = np.linspace(0, 255, 512)[None, :] * rs.rand() + rs.rand(512, 512) * 60
        Image.fromarray(np.stack([base] * 3, -1).clip(0, 255).astype("uint8")).save(path, quality=90)


# ------------------------------------------------------------------------------------------------ the tutorial


def run_tutorial(root: Path, kind: str, steps: int, warmup: int) -> dict:
    """The tutorial's approach: ``Dataset.map`` storing processor outputs as lists, ``DataCollatorForSeq2Seq``,
    batch 4 x accumulation 4, ``enable_input_require_grads`` + gradient checkpointing. One change for
    transformers 5: the model needs ``mm_token_type_ids``, derived from the padded ``input_ids`` in the collator.
    It reads the rows the build was made from (the tutorial has no build step).
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import (
        AutoProcessor,
        DataCollatorForSeq2Seq,
        Qwen2VLForConditionalGeneration,
        Trainer,
        TrainingArguments,
    )

    from mmdata.train.data import smart_resize

    model_dir = root / MODEL_DIR
    data_dir = root / f"source_{kind}"
    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    rows = [json.loads(line) for line in open(data_dir / "rows.jsonl")][: SAMPLES_PER_STEP * steps]

    def process_func(example):
        path = str(data_dir / example["images"][0])
        prompt = example["messages"][0]["content"].replace("<image>", "")
        messages = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image = Image.open(path).convert("RGB")  # qwen_vl_utils.fetch_image: smart_resize with its defaults
        h, w = smart_resize(image.height, image.width, 28, 4 * 28 * 28, 16384 * 28 * 28)
        image = image.resize((w, h))
        inputs = processor(text=[text], images=[image], padding=True, return_tensors="pt")
        inputs = {key: value.tolist() for key, value in inputs.items()}
        response = tokenizer(example["messages"][1]["content"], add_special_tokens=False)
        input_ids = inputs["input_ids"][0] + response["input_ids"] + [tokenizer.pad_token_id]
        attention_mask = inputs["attention_mask"][0] + response["attention_mask"] + [1]
        labels = [-100] * len(inputs["input_ids"][0]) + response["input_ids"] + [tokenizer.pad_token_id]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": torch.tensor(inputs["pixel_values"]),
                "image_grid_thw": torch.tensor(inputs["image_grid_thw"]).squeeze(0)}

    t0 = time.perf_counter()
    dataset = Dataset.from_list(rows).map(process_func, remove_columns=["messages", "images"])
    prep = len(rows) / (time.perf_counter() - t0)

    image_token = QWEN2VL_2B["image_token_id"]
    seq2seq = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)

    def collate(features):
        batch = seq2seq(features)
        batch["mm_token_type_ids"] = (batch["input_ids"] == image_token).int()
        return batch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    model.enable_input_require_grads()
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, inference_mode=False, r=64, lora_alpha=16,
                      lora_dropout=0.05, bias="none")
    model = get_peft_model(model, lora)
    args = TrainingArguments(output_dir=str(root / f"out_tutorial_{kind}"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, logging_steps=1, max_steps=steps, learning_rate=1e-4,
                             save_strategy="no", gradient_checkpointing=True, bf16=True, report_to="none",
                             remove_unused_columns=False)
    clock, instrument = step_clock(eos_id=PAD_ID, pad_id=PAD_ID)
    trainer = instrument(Trainer)(model=model, args=args, train_dataset=dataset, data_collator=collate,
                                  callbacks=[clock])
    trainer.train()
    result = summarise(f"tutorial/{kind}/4x4", clock, warmup, _flops_of(model_dir), kind=kind,
                       packing="pad", family="qwen2_vl", preprocess_samples_per_s=round(prep, 1),
                       losses=[h["loss"] for h in trainer.state.log_history if "loss" in h])
    del trainer, model
    torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------ mmdata


def run_mmdata(root: Path, kind: str, steps: int, warmup: int, *, family: str = "qwen2_vl", batch: int = 16,
               accum: int = 1, batching: str = "auto", attn: str = "auto", adapter_dtype: str = "auto",
               compile: str = "auto", compile_scope: str = "layers", deepspeed: str | None = None,
               checkpointing: bool = True, compile_vision: bool = True, lora_dropout: float = 0.05,
               out: Path | None = None) -> dict:
    import gc

    import torch

    from mmdata.train.config import load_train_config
    from mmdata.train.trainer import _trainer_class, train

    gc.collect()  # the previous run's model must not count towards this run's peak
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock, instrument = step_clock(eos_id=EOS_ID, pad_id=PAD_ID)
    output_dir = out or root / (f"out_mmdata_{family}_{kind}_{batch}x{accum}_{batching}_{attn}_{adapter_dtype}_"
                                f"{compile}_{compile_scope}" + ("" if checkpointing else "_nockpt")
                                + ("" if compile_vision else "_eagervision") + ("" if lora_dropout else "_nodrop"))
    folder = FAMILIES[family][1]
    config = load_train_config(
        None, model=str(root / folder), dataset=str(root / kind), output_dir=str(output_dir),
        max_steps=steps, learning_rate=1e-4, lora_r=64, lora_alpha=16, lora_dropout=lora_dropout, target_modules=TARGETS,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accum, gradient_checkpointing=checkpointing,
        precision="bf16" if torch.cuda.is_available() else "fp32", logging_steps=1, save_steps=10_000, resume=False,
        max_samples=batch * accum * steps, cutoff_len=_build_cutoff(root, kind, family), deepspeed=deepspeed,
        batching=batching, attn_implementation=attn, dataloader_num_workers=8, lr_scheduler_type="linear",
        adapter_dtype=adapter_dtype, compile=compile, compile_scope=compile_scope, compile_vision=compile_vision)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    record = train(config, callbacks=[clock], trainer_class=instrument(_trainer_class()))
    state = json.loads((output_dir / "trainer_state.json").read_text())
    name = (f"mmdata/{_label(kind, family)}/{batch}x{accum}/{record['batching']}/{record['attn_implementation']}/"
            f"{record['adapter_dtype']}/{'compiled' if record['compiled'] else 'eager'}"
            + (f"/{record['compile_scope']}" if record["compiled"] else "")
            + (f"/{Path(deepspeed).stem}" if deepspeed else "") + ("" if checkpointing else "/no-checkpointing")
            + ("/vision-compiled" if record.get("compiled_vision") else "") + ("" if lora_dropout else "/lora-dropout-0"))
    return summarise(name, clock, warmup, _flops_of(root / folder), kind=kind, family=family,
                     packing=record["batching"],
                     dropped=record["data"]["train"]["dropped"],
                     new_compiled_graphs=counters["stats"]["unique_graphs"] - graphs,
                     losses=[h["loss"] for h in state["log_history"] if "loss" in h])


def _build_cutoff(root: Path, kind: str, family: str) -> int:
    """The cutoff_len written into LLaMA-Factory's YAML for the build (both contenders train with it)."""
    import yaml

    return int(yaml.safe_load(_lf_yaml(root, kind, family).read_text())["cutoff_len"])


def _flops_of(model_dir: Path) -> dict:
    """FLOP coefficients of the model as written (its config.json), as ``lf_run.py`` reads them."""
    return architecture_flops(json.loads((model_dir / "config.json").read_text()))


def _label(kind: str, family: str) -> str:
    """Run names keep Qwen2-VL's short form (``latex``) and spell out other families (``qwen3_vl/latex``)."""
    return kind if family == "qwen2_vl" else f"{family}/{kind}"


def _mmdata_runs(spec: str) -> list[dict]:
    """``latex:16x1:pack,med:8x2:fp32:eager:sdpa`` -> keyword arguments of :func:`run_mmdata` per run.

    After the shape, in any order: ``pad``/``pack`` (batching), ``sdpa``/``varlen`` (attention; default auto),
    an adapter dtype (``bf16``/``fp32``), ``eager``/``compiled`` (compile false/true; default auto), ``layers``/
    ``parts`` (compile_scope; default layers), ``nockpt`` (no gradient checkpointing: MFU without recomputation,
    at more memory; the peer table keeps checkpointing on both sides), ``eagervision`` (``compile_vision: false``),
    ``nodrop`` (``lora_dropout: 0``, LLaMA-Factory's default; the issue's setting is 0.05).
    Unnamed options take the trainer's defaults."""
    runs = []
    for item in spec.split(","):
        kind, shape, *options = item.split(":")
        batch, accum = (int(x) for x in shape.split("x"))
        run = {"kind": kind, "batch": batch, "accum": accum}
        for option in options:
            if option in ("pad", "pack"):
                run["batching"] = option
            elif option in ("sdpa", "varlen"):
                run["attn"] = {"varlen": "flash_varlen_torch"}.get(option, option)
            elif option in ("bf16", "fp32"):
                run["adapter_dtype"] = option
            elif option in ("layers", "parts"):
                run["compile_scope"] = option
            elif option in ("eager", "compiled"):
                run["compile"] = {"eager": "false", "compiled": "true"}[option]
            elif option == "nockpt":
                run["checkpointing"] = False
            elif option == "eagervision":
                run["compile_vision"] = False
            elif option == "nodrop":
                run["lora_dropout"] = 0.0
            else:
                raise SystemExit(f"--mmdata {item}: unknown option {option!r}")
        runs.append(run)
    return runs


# ------------------------------------------------------------------------------------------------ LLaMA-Factory


def lf_setting(root: Path, kind: str, mode: str, steps: int, family: str = "qwen2_vl") -> dict:
    """The keys of ``mmdata llamafactory``'s train_lora.yaml changed to match the benchmark setting.

    ``pad``: 16 rows x 1; ``packing``/``neat`` (``neat_packing``, no attention across records): one row per step of
    16 x the build's cutoff_len, so a step holds about 16 records, as mmdata's packed micro-batch does.
    """
    setting = {"lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target": ",".join(TARGETS),
               "per_device_train_batch_size": SAMPLES_PER_STEP, "gradient_accumulation_steps": 1,
               "max_steps": steps, "learning_rate": 1.0e-4, "lr_scheduler_type": "linear", "warmup_ratio": 0.0,
               "max_samples": SAMPLES_PER_STEP * steps, "dataloader_num_workers": 8, "logging_steps": 1,
               "preprocessing_num_workers": 1,  # before training, untimed; 16 forked workers hung here
               "save_steps": 100_000, "plot_loss": False, "output_dir": str(root / f"out_lf_{family}_{kind}_{mode}")}
    if not _has_gpu():  # trying the harness on a CPU
        setting["bf16"] = False
    if mode != "pad":
        setting.update(packing=True, neat_packing=mode == "neat", per_device_train_batch_size=1,
                       cutoff_len=SAMPLES_PER_STEP * _build_cutoff(root, kind, family))
    return setting


def run_llamafactory(root: Path, out: Path, jobs: list[tuple[str, str]], steps: int, warmup: int,
                     python: str, path: str | None, family: str = "qwen2_vl") -> list[dict]:
    """LLaMA-Factory's trainer on each ``(kind, mode)`` in one process of its own environment (``lf_run.py``)."""
    spec = [{"name": f"{_label(kind, family)}/{'16x1' if mode == 'pad' else '1x1'}/{mode}", "kind": kind,
             "family": family, "packing": mode, "yaml": str(_lf_yaml(root, kind, family)), "warmup": warmup,
             "eos_id": EOS_ID, "pad_id": PAD_ID, "set": lf_setting(root, kind, mode, steps, family)}
            for kind, mode in jobs]
    jobs_file, results_file = root / "lf_jobs.json", root / "lf_results.json"
    jobs_file.write_text(json.dumps(spec, indent=1))
    results_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])),
               DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false")
    with open(out / "llamafactory.log", "w") as log:
        done = subprocess.run([python, str(Path(__file__).with_name("lf_run.py")), "--jobs", str(jobs_file),
                               "--out", str(results_file)], env=env, stdout=log, stderr=subprocess.STDOUT)
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    return results + [{"run": f"llamafactory/{j['name']}", "error": f"lf_run.py exited {done.returncode} before "
                       f"this job (see llamafactory.log)"} for j in spec[len(results):]]


# ------------------------------------------------------------------------------------------------ the table


def table(results: list[dict]) -> str:
    """Markdown rows; mmdata rows also compare with LLaMA-Factory on the same data at the same semantics: padded with
    padded, packed with ``neat_packing`` (records never attend to each other), and with its fastest mode."""
    lf = [r for r in results if r["run"].startswith("llamafactory") and "error" not in r]
    lines = ["| run | samples/step | samples/s | tokens/s | peak alloc GB | MFU | data wait | loss first -> last "
             "| vs LLaMA-Factory (same packing; fastest) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        versus = ""
        if r["run"].startswith("mmdata"):
            peers = [x for x in lf if (x["kind"], x.get("family")) == (r["kind"], r.get("family"))]
            same = [x for x in peers if x["packing"] == ("pad" if r["packing"] == "pad" else "neat")]
            fastest = max(peers, key=lambda x: x["samples_per_s"], default=None)
            versus = "; ".join(f"{r['samples_per_s'] / x['samples_per_s']:.2f}x samples/s, "
                               f"{r['peak_mem_gb'] - x['peak_mem_gb']:+.2f} GB ({x['packing']})"
                               for x in same[:1] + ([fastest] if fastest else []))
        losses = r.get("losses") or [float("nan")]
        lines.append(f"| {r['run']} | {r['samples_per_step']} | {r['samples_per_s']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_mem_gb']} | {r['mfu_pct']}% | {r['data_wait_pct']}% | "
                     f"{losses[0]:.2f} -> {losses[-1]:.2f} ({len(losses)}) | {versus} |")
    return "\n".join(lines)


def _micro_batch(root: Path, kind: str, batch: int, pack: bool = False) -> dict:
    """The first ``batch`` training samples of ``kind``, collated as the trainer does, on the GPU."""
    from mmdata.train.data import VisionSFTCollator

    dataset, processor = _encoded(root, kind, root / MODEL_DIR, cutoff_len=2048, max_samples=batch)
    collated = VisionSFTCollator(processor.tokenizer.pad_token_id, pack=pack)([dataset[i] for i in range(batch)])
    return {k: v.cuda() if hasattr(v, "cuda") else v for k, v in collated.items()}  # packed_max_length: an int


def profile_mmdata_step(root: Path, kind: str, batch: int, out: Path, compile_layers: bool = True,
                        pack: bool = False, scope: str = "layers", checkpointing: bool = True) -> str:
    """One micro-batch's forward + backward as the trainer runs it (its attention: ``pick_attention("auto")``, the
    vision blocks compiled with the layers), timed and under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mmdata.train.config import load_train_config
    from mmdata.train.loss import NO_POSITIONS, final_norm, projected_cross_entropy_sum, tap_final_hidden_states
    from mmdata.train.model import (
        attach_lora,
        compile_language_layers,
        compile_vision_blocks,
        enable_checkpointing,
        fuse_lora_into_wide_projections,
        load_model,
        pick_attention,
        run_frozen_vision_without_grad,
    )

    model_dir = root / MODEL_DIR
    batch_t = _micro_batch(root, kind, batch, pack)
    attn = pick_attention("auto")
    config = load_train_config(None, model=str(model_dir), dataset="x", target_modules=TARGETS)
    model = attach_lora(load_model(str(model_dir), dtype=torch.bfloat16, attn=attn), config, torch.bfloat16).cuda()
    if checkpointing:
        enable_checkpointing(model, keep_dropout=compile_layers and scope == "layers")  # as the trainer does
    model.train()
    run_frozen_vision_without_grad(model)
    if compile_layers:
        fuse_lora_into_wide_projections(model)
        compile_language_layers(model, scope)
        compile_vision_blocks(model)
    batch_t.pop("labels")
    positions, targets = batch_t.pop("label_positions"), batch_t.pop("target_labels")
    norm, head = final_norm(model), model.get_output_embeddings()
    none = NO_POSITIONS.cuda()

    def forward():
        with tap_final_hidden_states(norm) as hidden:
            model(**batch_t, logits_to_keep=none, use_cache=False)
        return hidden[-1]

    def step():  # as the trainer runs it: bf16 model and adapters, no autocast
        loss = projected_cross_entropy_sum(forward()[positions], head.weight, targets,
                                           compiled=compile_layers) / targets.numel()
        loss.backward()

    def timed(fn, n=3):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1000

    base = model.get_base_model()
    visual = base.model.visual if hasattr(base.model, "visual") else base.visual
    lines = [f"micro-batch {batch} x {kind} ({'packed' if pack else 'padded'}, {attn}): "
             f"{batch_t['input_ids'].shape[1]} tokens/row, {targets.numel()} labelled, "
             f"layers {f'compiled ({scope})' if compile_layers else 'eager'}, "
             f"{'' if checkpointing else 'no '}gradient checkpointing"]
    with torch.no_grad():
        lines.append(f"vision tower forward: {timed(lambda: visual(batch_t['pixel_values'].to(torch.bfloat16), grid_thw=batch_t['image_grid_thw'])):.1f} ms")
        lines.append(f"full forward (no grad): {timed(forward):.1f} ms")
    lines.append(f"forward+backward: {timed(step):.1f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    text = "\n".join(lines) + "\n" + table
    (out / f"profile_{kind}_{'pack' if pack else 'pad'}_{scope}{'' if checkpointing else '_nockpt'}.txt").write_text(text)
    return "\n".join(lines)


def check_dropout_replay(root: Path, kind: str = "latex", batch: int = 2, scope: str = "parts") -> dict:
    """Compiled layers under checkpointing must recompute the forward's LoRA dropout masks on this GPU too: the
    adapter gradients of one micro-batch with and without checkpointing, as a relative difference per tensor
    (bf16 kernels differ in rounding; a different mask gives differences of order 1)."""
    import torch

    from mmdata.train.config import load_train_config
    from mmdata.train.model import attach_lora, compile_language_layers, enable_checkpointing, load_model

    model_dir = root / MODEL_DIR
    inputs = {k: v for k, v in _micro_batch(root, kind, batch).items()
              if k not in ("labels", "label_positions", "target_labels")}
    config = load_train_config(None, model=str(model_dir), dataset="x", target_modules=TARGETS, lora_dropout=0.05)

    def gradients(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        model = attach_lora(load_model(str(model_dir), dtype=torch.bfloat16), config, torch.bfloat16).cuda()
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        if checkpointing:
            enable_checkpointing(model, keep_dropout=scope == "layers")  # as the trainer does
        model.train()
        compile_language_layers(model, scope)
        torch.manual_seed(1)
        model(**inputs, use_cache=False).logits.float().logsumexp(-1).mean().backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    a, b = gradients(True), gradients(False)
    rel = [((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-12)).item() for n in a]
    torch.cuda.empty_cache()
    return {"check": f"dropout replay (compiled {scope}, checkpointing vs not)", "tensors": len(rel),
            "max_relative_diff": max(rel), "median_relative_diff": sorted(rel)[len(rel) // 2]}


# ------------------------------------------------------------------------------------------------ entry points


def cmd_peers(args) -> None:
    """LLaMA-Factory, mmdata and the tutorial, one after the other on this GPU; results.json and table.md in --out."""
    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def record(result: dict) -> None:
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "changed")}), flush=True)
        gpu = _gpu_name()
        (out / "results.json").write_text(json.dumps({"gpu": gpu, "command": " ".join(sys.argv), "results": results},
                                                     indent=1))
        (out / "table.md").write_text(f"GPU: {gpu}\n\n{table(results)}\n")

    if args.check_replay:
        for scope in ("parts", "layers"):
            print(json.dumps(check_dropout_replay(root, scope=scope)), flush=True)
    jobs = [tuple(item.split(":")) for item in args.llamafactory.split(",") if item]
    if jobs and args.lf_python:
        for result in run_llamafactory(root, out, jobs, args.steps, args.warmup, args.lf_python, args.lf_path,
                                       args.family):
            record(result)
    for run in _mmdata_runs(args.mmdata) if args.mmdata else ():
        kind = run.pop("kind")
        try:
            record(run_mmdata(root, kind, args.steps, args.warmup, family=args.family, **run))
        except Exception as e:  # keep going: one failure must not lose the other figures
            record({"run": f"mmdata/{kind}/{run}", "error": repr(e)[:500]})
    for spec in args.profile.split(",") if args.profile else ():
        kind, batch, batching, *options = spec.split(":")
        try:
            print(profile_mmdata_step(root, kind, int(batch), out, pack=batching == "pack",
                                      scope="parts" if "parts" in options else "layers",
                                      checkpointing="nockpt" not in options), flush=True)
        except Exception as e:
            print("profile failed", repr(e)[:300], flush=True)
    for kind in args.tutorial.split(",") if args.tutorial else ():
        try:
            record(run_tutorial(root, kind, args.tutorial_steps, min(args.warmup, args.tutorial_steps - 1)))
        except Exception as e:
            record({"run": f"tutorial/{kind}", "error": repr(e)[:500]})
    print(table(results), flush=True)


def cmd_dist(args) -> None:
    import torch

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = None
    if args.backend in ("zero2", "zero3"):
        ds = str(Path(args.root) / f"ds_{args.backend}.json")
        if rank == 0:
            stage = int(args.backend[-1])
            cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                   "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                         **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3
                                            else {})}}
            Path(ds).write_text(json.dumps(cfg))
        if world > 1:
            torch.distributed.init_process_group("nccl")
            torch.distributed.barrier()
    batch, accum = 8, 16 // (8 * world)
    name = f"{args.backend}_{world}gpu"
    res = run_mmdata(Path(args.root), "latex", args.steps, args.warmup, batch=batch, accum=accum,
                     out=Path(args.root) / f"out_{name}", deepspeed=ds)
    res["rank"], res["world"] = rank, world
    (out / f"dist_{name}_rank{rank}.json").write_text(json.dumps(res))
    if rank == 0:
        # the adapter reloads and gives a finite loss
        from peft import PeftModel

        from mmdata.train.model import load_model

        base = load_model(str(Path(args.root) / MODEL_DIR), dtype=torch.bfloat16).cuda()
        net = PeftModel.from_pretrained(base, str(Path(args.root) / f"out_{name}"))
        ids = torch.tensor([[151644, 872, 198, 40, 1079, 151645]], device="cuda")
        loss = net(input_ids=ids, labels=ids).loss.item()
        res["adapter_reload_loss"] = loss
        (out / f"dist_{name}_rank{rank}.json").write_text(json.dumps(res))
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
        print("losses", name, [round(x, 4) for x in res["losses"]], flush=True)



def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["prepare", "peers", "dist"])
    parser.add_argument("--root", default="/tmp/bench")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--n", type=int, default=256, help="prepare: samples per dataset")
    parser.add_argument("--small", action="store_true", help="prepare: a 2-layer model, to try the harness on a CPU")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_vl",
                        help="the architecture (prepare and peers; the tutorial rows are Qwen2-VL's)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of 16 samples per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    parser.add_argument("--llamafactory", default="latex:pad,latex:packing,latex:neat,med:pad,med:packing,med:neat",
                        help="LLaMA-Factory runs, kind:pad|packing|neat, comma-separated ('' for none)")
    parser.add_argument("--lf-python", default=None, help="python of LLaMA-Factory's environment (none: no runs)")
    parser.add_argument("--lf-path", default=None, help="PYTHONPATH entry holding LLaMA-Factory's own packages")
    parser.add_argument("--mmdata", default="latex:16x1:pad,latex:16x1:pack,med:16x1:pad,med:16x1:pack",
                        help="mmdata runs: kind:BATCHxACCUM[:pad|pack][:sdpa|varlen][:bf16|fp32][:eager|compiled]"
                             "[:layers|parts]")
    parser.add_argument("--tutorial", default="latex,med", help="tutorial runs ('' for none)")
    parser.add_argument("--tutorial-steps", type=int, default=6)
    parser.add_argument("--profile", default="", help="profile one micro-batch: kind:batch:pad|pack[:layers|parts][:nockpt], comma-separated")
    parser.add_argument("--check-replay", action="store_true",
                        help="first compare adapter gradients with and without checkpointing (compiled layers)")
    parser.add_argument("--backend", choices=["single", "ddp", "zero2", "zero3"], default="ddp")
    args = parser.parse_args()
    if args.mode == "prepare":
        prepare(Path(args.root), args.n, args.small, args.family)
    elif args.mode == "peers":
        cmd_peers(args)
    else:
        cmd_dist(args)


if __name__ == "__main__":
    main()
