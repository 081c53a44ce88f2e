"""GPU benchmark of ``mmdata train`` against a re-implementation of the tutorial's Qwen2-VL LoRA script.

Model: the exact Qwen2-VL-2B-Instruct architecture with random bf16 weights and a tokenizer whose special tokens
have the real ids (no weights can be downloaded where this runs). Data: LaTeX-OCR-shaped (wide formula images,
~100-token answers) and MedTrinity-shaped (512x512 images, ~150-word captions) build folders written by
``prepare``. Both pipelines train with the tutorial's hyperparameters (LoRA r=64, alpha=16, dropout 0.05 on
q/k/v/o/gate/up/down; 16 samples per optimizer step; gradient checkpointing; bf16; lr 1e-4).

    python benchmarks/train_gpu.py prepare --root /tmp/bench
    python benchmarks/train_gpu.py single  --root /tmp/bench --out results      # 1 GPU: tutorial vs mmdata
    torchrun --nproc_per_node 2 benchmarks/train_gpu.py dist --root /tmp/bench --backend ddp --out results

Reported per run: samples/s, tokens/s, peak GPU memory (max allocated), model-FLOPs utilisation, and the share of
step time spent waiting for data. MFU counts the same useful FLOPs per sample for both pipelines: 4 x the frozen
language-model weights per token (forward + input gradient), 6 x the LoRA weights per token, causal attention
(3 x forward), the vocabulary projection for labelled tokens only (4 x hidden x vocab), and the vision tower's
forward (2 x its weights per patch plus attention) -- no recomputation, over the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

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
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LATEX_PROMPT = "Transcribe the formula in this image into LaTeX."
MED_PROMPT = "Describe this medical image in detail."
SHAREGPT = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant", "system_tag": "system"}}

LATEX_PARTS = [r"\frac{a}{b}", r"x^{2}", r"\sum_{i=1}^{n}", r"\int_{0}^{\infty}", r"\alpha", r"\beta", r"\gamma",
               r"\sqrt{x+y}", r"\left(", r"\right)", r"+", r"-", r"=", r"\cdot", r"\mathbf{E}", r"e^{i\pi}",
               r"\lim_{x\to 0}", r"\sin\theta", r"\cos\theta", r"\log_{2}", r"\partial", r"\nabla", r"y_{k}"]
MED_WORDS = ("the image shows a computed tomography scan of the abdomen with contrast liver kidney spleen lesion "
             "region of interest located in the left upper quadrant hypodense mass measuring approximately "
             "centimeters with irregular margins and surrounding edema no evidence of free fluid vessels appear "
             "patent the findings suggest a benign cyst further evaluation recommended chest radiograph lung "
             "opacity consolidation pleural effusion cardiomegaly within normal limits tissue").split()


# ------------------------------------------------------------------------------------------------ preparation


def prepare(root: Path, n: int) -> None:
    import torch

    from mmdata.train.tiny import write_random_model, write_tokenizer_and_processor

    model_dir = root / "qwen2vl-2b-random"
    if not (model_dir / "model.safetensors.index.json").exists() and not (model_dir / "model.safetensors").exists():
        ids, _ = write_tokenizer_and_processor(model_dir, pad_vocab_to=151643)
        assert ids["<|image_pad|>"] == QWEN2VL_2B["image_token_id"]
        write_random_model(model_dir, QWEN2VL_2B, dtype=torch.bfloat16,
                           device="cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    _make_build(root / "latex", "latex", n, tok)
    _make_build(root / "med", "med", n, tok)


def _make_build(out: Path, kind: str, n: int, tok) -> None:
    from concurrent.futures import ProcessPoolExecutor

    if (out / "dataset_info.json").exists():
        return
    rng = random.Random(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
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
        jobs.append((str(out / image), kind, answer, i))
        records.append({"messages": [{"role": "user", "content": "<image>" + prompt},
                                     {"role": "assistant", "content": answer}], "images": [image]})
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_draw, jobs, chunksize=32))
    (out / f"{kind}_train").mkdir(exist_ok=True)
    with open(out / f"{kind}_train" / "part-00000.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / "dataset_info.json").write_text(json.dumps({f"{kind}_train": {"file_name": f"{kind}_train", **SHAREGPT}}))
    (out / "mmdata_build.json").write_text(json.dumps({"datasets": {f"{kind}_train": {"split": "train"}}}))


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


# ------------------------------------------------------------------------------------------------ measurement


def model_flops(text_len: int, patches: int, labelled: int) -> float:
    """Useful FLOPs of one sample (see module docstring); the same formula for both pipelines."""
    c, v = QWEN2VL_2B, QWEN2VL_2B["vision_config"]
    h, inter, layers, kv = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_key_value_heads"]
    kv_dim = h // c["num_attention_heads"] * kv
    body = layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter)
    r = 64
    lora = layers * r * ((h + h) * 2 + (h + kv_dim) * 2 + (h + inter) * 3)
    attn = 3 * layers * 2 * 2 * h * text_len * text_len / 2
    e = v["embed_dim"]
    vision = 2 * v["depth"] * (e * 3 * e + e * e + 2 * e * e * v["mlp_ratio"]) * patches
    vision += v["depth"] * 2 * 2 * e * patches * patches + 2 * (4 * e * 4 * e + 4 * e * h) * patches / 4
    return 4 * body * text_len + 6 * lora * text_len + attn + 4 * h * c["vocab_size"] * labelled + vision


def _timing_tools():
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time of every optimizer step (GPU synchronised), and the data wait inside it."""

        def __init__(self):
            self.ends, self.data = [], []

        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            self.data.append(DATA_WAIT[0])

    DATA_WAIT = [0.0]

    def timed(cls):
        class Timed(cls):
            def get_batch_samples(self, *a, **k):
                t = time.perf_counter()
                out = super().get_batch_samples(*a, **k)
                DATA_WAIT[0] += time.perf_counter() - t
                return out
        return Timed

    return StepClock, timed, DATA_WAIT


def summarise(name: str, clock, data_wait, per_step_samples: list[list[tuple]], warmup: int, gpu: str) -> dict:
    """Steady-state figures over the steps after ``warmup``."""
    import torch

    steps = len(clock.ends)
    window = range(warmup, steps)
    seconds = clock.ends[-1] - clock.ends[warmup - 1]
    data = clock.data[-1] - clock.data[warmup - 1]
    samples = [s for i in window for s in per_step_samples[i]] if per_step_samples else []
    n = len(samples) or 16 * len(window)
    tokens = sum(s[0] for s in samples)
    flops = sum(model_flops(*s) for s in samples)
    peak = PEAK_BF16["H200" if "H200" in gpu else "H100"]
    return {"run": name, "steps_timed": len(window), "samples_per_s": round(n / seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "mean_tokens_per_sample": round(tokens / max(1, n), 1),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "mfu_pct": round(100 * flops / seconds / peak, 2), "data_wait_pct": round(100 * data / seconds, 1),
            "step_s": round(seconds / len(window), 3), "first_step_s": round(clock.ends[0] - clock.start, 1),
            **{k: torch.cuda.memory_stats().get(k) for k in ("num_alloc_retries", "num_device_alloc")}}


# ------------------------------------------------------------------------------------------------ the tutorial


def run_tutorial(root: Path, kind: str, steps: int, warmup: int, gpu: str) -> dict:
    """The tutorial's approach: ``Dataset.map`` storing processor outputs as lists, ``DataCollatorForSeq2Seq``,
    batch 4 x accumulation 4, ``enable_input_require_grads`` + gradient checkpointing. One change for
    transformers 5: the model needs ``mm_token_type_ids``, derived from the padded ``input_ids`` in the collator.
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

    model_dir = root / "qwen2vl-2b-random"
    data_dir = root / kind
    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    rows = [json.loads(line) for line in open(data_dir / f"{kind}_train" / "part-00000.jsonl")][: 16 * steps]

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
    StepClock, timed, wait = _timing_tools()
    clock = StepClock()
    trainer = timed(Trainer)(model=model, args=args, train_dataset=dataset, data_collator=collate,
                             callbacks=[clock])
    trainer.train()
    # samples in order (no shuffle assumptions needed: all samples of one kind have near-equal shapes)
    per_sample = []
    for ex in dataset.select(range(16 * steps)):
        g = ex["image_grid_thw"]
        per_sample.append((len(ex["input_ids"]), g[0] * g[1] * g[2], sum(1 for x in ex["labels"] if x != -100)))
    per_step = [per_sample[i * 16:(i + 1) * 16] for i in range(steps)]
    result = summarise(f"tutorial/{kind}", clock, wait, per_step, warmup, gpu)
    result["preprocess_samples_per_s"] = round(prep, 1)
    result["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del trainer, model
    torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------ mmdata


def run_mmdata(root: Path, kind: str, steps: int, warmup: int, gpu: str, *, batch: int, accum: int,
               out: Path | None = None, deepspeed: str | None = None, batching: str = "pad",
               adapter_dtype: str = "auto", compile: str = "auto") -> dict:
    import gc

    import torch

    from mmdata.train.config import load_train_config
    from mmdata.train.trainer import _trainer_class, train

    gc.collect()  # the previous run's model must not count towards this run's peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    StepClock, timed, wait = _timing_tools()
    clock = StepClock()
    output_dir = out or root / f"out_mmdata_{kind}_{batch}x{accum}_{adapter_dtype}_{compile}"
    config = load_train_config(
        None, model=str(root / "qwen2vl-2b-random"), dataset=str(root / kind), output_dir=str(output_dir),
        max_steps=steps, learning_rate=1e-4, lora_r=64, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accum, gradient_checkpointing=True,
        precision="bf16", logging_steps=1, save_steps=10_000, resume=False, max_samples=16 * steps,
        deepspeed=deepspeed, batching=batching, dataloader_num_workers=8, lr_scheduler_type="linear",
        adapter_dtype=adapter_dtype, compile=compile)
    record = train(config, callbacks=[clock], trainer_class=timed(_trainer_class()))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = json.loads((output_dir / "trainer_state.json").read_text())
    # every sample is used once in `steps` steps; per-step token mix is uniform enough to spread evenly
    samples = _mmdata_samples(root, kind, 16 * steps)
    per_step = [samples[i * 16 // world:(i + 1) * 16 // world] for i in range(steps)]
    result = summarise(f"mmdata/{kind}/{batch}x{accum}/{record['adapter_dtype']}"
                       + ("/compiled" if record["compiled"] else "/eager")
                       + (f"/{Path(deepspeed).stem}" if deepspeed else ""), clock, wait, per_step, warmup, gpu)
    result["losses"] = [h["loss"] for h in state["log_history"] if "loss" in h]
    result["dropped"] = record["data"]["train"]["dropped"]
    return result


def _mmdata_samples(root: Path, kind: str, n: int) -> list[tuple]:
    from transformers import AutoProcessor

    from mmdata.train.data import build_dataset, read_conversations, resolve_split

    processor = AutoProcessor.from_pretrained(root / "qwen2vl-2b-random")
    info, names = resolve_split(root / kind, "train")
    dataset, _ = build_dataset(processor, read_conversations(info, names), min_pixels=3136, max_pixels=768 * 768,
                               cutoff_len=2048, max_samples=n)
    out = []
    for s in dataset.samples:
        patches = sum((h // 14) * (w // 14) for h, w in s.sizes)
        out.append((s.length, patches, sum(len(p) for p, lab in s.pieces if lab)))
    return out


def _micro_batch(root: Path, kind: str, batch: int) -> dict:
    """The first ``batch`` training samples of ``kind``, collated as the trainer does, on the GPU."""
    from transformers import AutoProcessor

    from mmdata.train.data import VisionSFTCollator, build_dataset, read_conversations, resolve_split

    processor = AutoProcessor.from_pretrained(root / "qwen2vl-2b-random")
    info, names = resolve_split(root / kind, "train")
    dataset, _ = build_dataset(processor, read_conversations(info, names), min_pixels=3136, max_pixels=768 * 768,
                               cutoff_len=2048, max_samples=batch)
    collated = VisionSFTCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(batch)])
    return {k: v.cuda() for k, v in collated.items()}


def profile_mmdata_step(root: Path, kind: str, batch: int, out: Path, compile_layers: bool = True) -> str:
    """One micro-batch's forward + backward as the trainer runs it, timed and under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mmdata.train.config import load_train_config
    from mmdata.train.loss import NO_POSITIONS, final_norm, projected_cross_entropy_sum, tap_final_hidden_states
    from mmdata.train.model import attach_lora, compile_language_layers, load_model, run_frozen_vision_without_grad

    model_dir = root / "qwen2vl-2b-random"
    batch_t = _micro_batch(root, kind, batch)
    config = load_train_config(None, model=str(model_dir), dataset="x", target_modules=TARGETS)
    model = attach_lora(load_model(str(model_dir), dtype=torch.bfloat16), config, torch.bfloat16).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    run_frozen_vision_without_grad(model)
    if compile_layers:
        compile_language_layers(model)
    batch_t.pop("labels")
    positions, targets = batch_t.pop("label_positions"), batch_t.pop("target_labels")
    norm, head = final_norm(model), model.get_output_embeddings()
    none = NO_POSITIONS.cuda()

    def forward():
        with tap_final_hidden_states(norm) as hidden:
            model(**batch_t, logits_to_keep=none, use_cache=False)
        return hidden[-1]

    def step():  # as the trainer runs it: bf16 model and adapters, no autocast
        loss = projected_cross_entropy_sum(forward()[positions], head.weight, targets) / targets.numel()
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
    lines = [f"micro-batch {batch} x {kind}: {batch_t['input_ids'].shape[1]} padded tokens/row, "
             f"{targets.numel()} labelled, layers {'compiled' if compile_layers else 'eager'}"]
    with torch.no_grad():
        lines.append(f"vision tower forward: {timed(lambda: visual(batch_t['pixel_values'].to(torch.bfloat16), grid_thw=batch_t['image_grid_thw'])):.1f} ms")
        lines.append(f"full forward (no grad): {timed(forward):.1f} ms")
    lines.append(f"forward+backward (checkpointing): {timed(step):.1f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    text = "\n".join(lines) + "\n" + table
    (out / f"profile_{kind}.txt").write_text(text)
    return "\n".join(lines)


def check_dropout_replay(root: Path, kind: str = "latex", batch: int = 2) -> dict:
    """Compiled layers under checkpointing must recompute the forward's LoRA dropout masks on this GPU too: the
    adapter gradients of one micro-batch with and without checkpointing, as a relative difference per tensor
    (bf16 kernels differ in rounding; a different mask gives differences of order 1)."""
    import torch

    from mmdata.train.config import load_train_config
    from mmdata.train.model import attach_lora, compile_language_layers, load_model

    model_dir = root / "qwen2vl-2b-random"
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
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        compile_language_layers(model)
        torch.manual_seed(1)
        model(**inputs, use_cache=False).logits.float().logsumexp(-1).mean().backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    a, b = gradients(True), gradients(False)
    rel = [((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-12)).item() for n in a]
    torch.cuda.empty_cache()
    return {"check": "dropout replay (compiled, checkpointing vs not)", "tensors": len(rel),
            "max_relative_diff": max(rel), "median_relative_diff": sorted(rel)[len(rel) // 2]}


# ------------------------------------------------------------------------------------------------ entry points


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _mmdata_runs(spec: str) -> list[tuple[str, int, int, str, str]]:
    """``latex:16x1,med:8x2:fp32:eager`` -> [(kind, micro-batch, accumulation, adapter_dtype, compile)].

    Options after the shape: an adapter dtype (auto, bf16, fp32) and/or ``eager`` (compile: false) or
    ``compiled`` (compile: true); unnamed ones keep the trainer's defaults (auto)."""
    runs = []
    for item in spec.split(","):
        kind, shape, *options = item.split(":")
        batch, accum = (int(x) for x in shape.split("x"))
        dtype = next((o for o in options if o in ("auto", "bf16", "fp32")), "auto")
        compile_ = {"eager": "false", "compiled": "true"}.get(next((o for o in options if o in ("eager", "compiled")),
                                                                   ""), "auto")
        runs.append((kind, batch, accum, dtype, compile_))
    return runs


def cmd_single(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = _gpu_name()
    results = []
    if args.check_replay:
        print(json.dumps(check_dropout_replay(Path(args.root))), flush=True)
    jobs = [lambda k=k, b=b, a=a, d=d, c=c: run_mmdata(Path(args.root), k, args.steps, args.warmup, gpu, batch=b,
                                                       accum=a, adapter_dtype=d, compile=c)
            for k, b, a, d, c in _mmdata_runs(args.mmdata)]
    if args.tutorial_steps:
        jobs += [lambda k=k: run_tutorial(Path(args.root), k, args.tutorial_steps, args.warmup, gpu)
                 for k in ("latex", "med")]
    for fn in jobs:
        try:
            results.append(fn())
        except Exception as e:  # keep going: one failure must not lose the other figures
            results.append({"run": "?", "error": repr(e)[:500]})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "losses"}), flush=True)
        (out / "single.json").write_text(json.dumps({"gpu": gpu, "results": results}, indent=1))
    for kind, batch in (("latex", 16), ("med", 8)) if args.profile else ():
        try:
            print(profile_mmdata_step(Path(args.root), kind, batch, out), flush=True)
        except Exception as e:
            print("profile failed", repr(e)[:300])


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
    res = run_mmdata(Path(args.root), "latex", args.steps, args.warmup, _gpu_name(), batch=batch, accum=accum,
                     out=Path(args.root) / f"out_{name}", deepspeed=ds)
    res["rank"], res["world"] = rank, world
    (out / f"dist_{name}_rank{rank}.json").write_text(json.dumps(res))
    if rank == 0:
        # the adapter reloads and gives a finite loss
        from peft import PeftModel

        from mmdata.train.model import load_model

        base = load_model(str(Path(args.root) / "qwen2vl-2b-random"), dtype=torch.bfloat16).cuda()
        net = PeftModel.from_pretrained(base, str(Path(args.root) / f"out_{name}"))
        ids = torch.tensor([[151644, 872, 198, 40, 1079, 151645]], device="cuda")
        loss = net(input_ids=ids, labels=ids).loss.item()
        res["adapter_reload_loss"] = loss
        (out / f"dist_{name}_rank{rank}.json").write_text(json.dumps(res))
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
        print("losses", name, [round(x, 4) for x in res["losses"]], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["prepare", "single", "dist"])
    parser.add_argument("--root", default="/tmp/bench")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--tutorial-steps", type=int, default=12, help="0: skip the tutorial runs")
    parser.add_argument("--mmdata", default="latex:16x1,med:8x2",
                        help="mmdata runs of `single`: kind:BATCHxACCUM[:adapter_dtype][:eager|compiled], "
                             "comma-separated")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiler step")
    parser.add_argument("--check-replay", action="store_true",
                        help="first compare adapter gradients with and without checkpointing (compiled layers)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", choices=["single", "ddp", "zero2", "zero3"], default="ddp")
    args = parser.parse_args()
    if args.mode == "prepare":
        prepare(Path(args.root), args.n)
    elif args.mode == "single":
        cmd_single(args)
    else:
        cmd_dist(args)


if __name__ == "__main__":
    main()
