"""LoRA fine-tuning of Qwen2-VL / Qwen2.5-VL / Qwen3-VL on an mmdata build, through Hugging Face's ``Trainer``.

Why HF ``Trainer``: checkpoints, ``trainer_state.json``, resume, DDP (``torchrun`` / ``accelerate launch``),
DeepSpeed ZeRO-2/3, schedulers and loggers come from one well-kept library. This module only adds what it lacks for
this workload: a length-grouped sampler over precomputed lengths, and a loss that projects onto the vocabulary only
at positions followed by a label, in chunks (``loss.py``), so micro-batches can be large without the logits tensor
(tokens x 151,936) dominating memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

import torch

from .attention import ATTENTION_NAME
from .config import TrainConfig, TrainError
from .data import LengthGroupedBatchOrder, VisionSFTCollator, build_dataset, read_conversations, resolve_split
from .loss import NO_POSITIONS, cross_entropy_sum, final_norm, projected_cross_entropy_sum, tap_final_hidden_states
from .model import (
    adapter_family,
    attach_lora,
    compile_language_layers,
    compile_vision_blocks,
    enable_checkpointing,
    ensure_chat_template,
    fuse_lora_into_wide_projections,
    load_model,
    load_processor,
    pick_adapter_dtype,
    pick_attention,
    pick_dtype,
    read_family,
    resolve_model_path,
    run_frozen_vision_without_grad,
    should_compile,
)

RUN_RECORD = "mmdata_train.json"


def _trainer_class():
    from transformers import Trainer

    class VisionSFTTrainer(Trainer):
        """HF ``Trainer`` with a length-grouped sampler and the loss of ``loss.py``.

        ``autocast``: the dtype to autocast the forward pass to, or None. The trainer autocasts the forward itself
        instead of asking accelerate (``bf16=True``), whose wrapper hands back every output as an fp32 copy.
        ``compile_loss``: run the loss's per-chunk softmax and gradient compiled (``loss.py``).
        """

        def __init__(self, *args, autocast: torch.dtype | None = None, compile_loss: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = True  # our loss divides by the batch's label count itself
            self.autocast = autocast
            self.compile_loss = compile_loss
            # ZeRO-3 and FSDP shard lm_head's weight, which then exists whole only inside the model's forward
            from transformers.integrations import is_deepspeed_zero3_enabled

            self.project_in_loss = not (is_deepspeed_zero3_enabled() or getattr(self, "is_fsdp_enabled", False))
            self.final_norm = final_norm(self.model)
            self.warned_full_logits = False

        def _get_train_sampler(self, *args, **kwargs):
            lengths = self.train_dataset.lengths
            return LengthGroupedBatchOrder(lengths, self.args.per_device_train_batch_size, seed=self.args.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            inputs.pop("labels", None)
            positions, targets = inputs.pop("label_positions"), inputs.pop("target_labels")
            loss, outputs = self.labelled_cross_entropy_sum(model, inputs, positions, targets)
            if num_items_in_batch is None:
                loss = loss / max(targets.numel(), 1)
            else:
                loss = loss / num_items_in_batch
                if getattr(self.args, "average_tokens_across_devices", False):
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def labelled_cross_entropy_sum(self, model, inputs, positions, targets):
            """Forward pass, then the summed cross-entropy at ``positions`` (see ``loss.py``)."""
            device = inputs["input_ids"].device
            with torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
                if self.project_in_loss:
                    with tap_final_hidden_states(self.final_norm) as hidden:
                        outputs = model(**inputs, logits_to_keep=NO_POSITIONS.to(device), use_cache=False)
                    if outputs.logits.shape[1] and not self.warned_full_logits:
                        self.warned_full_logits = True
                        warnings.warn("this transformers version ignores logits_to_keep and computes every "
                                      "position's logits (more memory); upgrade transformers", stacklevel=2)
                    head = self.model.get_output_embeddings()
                    loss = projected_cross_entropy_sum(hidden[-1][positions], head.weight, targets,
                                                       compiled=self.compile_loss)
                    return loss, outputs
                keep = positions.any(dim=0).nonzero().squeeze(1)
                outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
            logits = outputs.logits
            if logits.shape[1] != keep.numel():  # transformers versions that ignore a tensor logits_to_keep
                logits = logits[:, keep]
            return cross_entropy_sum(logits[positions[:, keep]], targets), outputs

    return VisionSFTTrainer


def _training_arguments(config: TrainConfig, dtype: torch.dtype, num_samples: int, has_eval: bool,
                        trainer_checkpoints: bool = True):
    """HF ``TrainingArguments`` from the config. ``bf16`` only for DeepSpeed (which then trains in bf16 itself):
    otherwise bf16 autocast is the trainer's own (see ``_forward_autocast``); fp16 keeps accelerate's loss scaling.
    ``trainer_checkpoints``: False where the model's checkpointing is already enabled (``compile_scope: layers``)."""
    from transformers import TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world
    total = config.max_steps if config.max_steps > 0 else math.ceil(num_samples / per_step) * config.num_train_epochs
    workers = config.dataloader_num_workers
    if workers is None:
        workers = max(0, min(8, (os.cpu_count() or 1) - 1)) if torch.cuda.is_available() else 0
    if config.report_to == "swanlab" and importlib.util.find_spec("swanlab") is None:
        raise TrainError("report_to: swanlab needs the swanlab package: pip install swanlab")
    if config.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise TrainError("report_to: tensorboard needs the tensorboard package: pip install tensorboard")
    kwargs = dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=int(config.warmup_ratio * total),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=dtype == torch.bfloat16 and bool(config.deepspeed),
        fp16=dtype == torch.float16,
        gradient_checkpointing=config.gradient_checkpointing and trainer_checkpoints,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval and config.eval_steps else "no",
        eval_steps=config.eval_steps,
        seed=config.seed,
        report_to=[] if config.report_to == "none" else [config.report_to],
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        deepspeed=config.deepspeed,
        use_cpu=not torch.cuda.is_available(),
    )
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in known})


def _forward_autocast(config: TrainConfig, dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype | None:
    """bf16 autocast for fp32 adapters on a bf16 model; none where every weight is bf16 already (bf16 adapters,
    DeepSpeed) or where accelerate autocasts with loss scaling (fp16)."""
    if dtype == torch.bfloat16 and adapter_dtype == torch.float32 and not config.deepspeed:
        return torch.bfloat16
    return None


def _resume_point(config: TrainConfig, model_path: str, family) -> str | None:
    """The checkpoint to continue from: ``resume`` as a path, else the newest complete ``checkpoint-N`` of
    ``output_dir``, checked to belong to this run (:func:`_refuse_another_runs_checkpoint`).

    A checkpoint is complete once ``trainer_state.json`` is written, the last file HF ``Trainer`` saves; a kill
    during a save leaves one without it, which resuming from would crash on: it is skipped, with a warning.
    """
    if config.resume is False or config.resume in ("false", "no"):
        return None
    if isinstance(config.resume, str) and config.resume not in ("true", "yes", "auto"):
        chosen = Path(config.resume)
        if not (chosen / "trainer_state.json").is_file():
            raise TrainError(f"resume: {chosen} is not a complete checkpoint folder (no trainer_state.json)")
    else:
        found = sorted((p for p in Path(config.output_dir).glob("checkpoint-*")
                        if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()),
                       key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True)
        complete = [p for p in found if (p / "trainer_state.json").is_file()]
        if not complete:
            return None
        chosen = complete[0]
        skipped = [p.name for p in found[:found.index(chosen)]]  # newer than it, and incomplete
        if skipped:
            warnings.warn(f"{config.output_dir}: {', '.join(skipped)} is incomplete (a save was cut short: no "
                          f"trainer_state.json); resuming from {chosen.name}", stacklevel=2)
    _refuse_another_runs_checkpoint(chosen, config, model_path, family)
    return str(chosen)


def _finished_record(config: TrainConfig, checkpoint: str | None) -> dict | None:
    """The finished run's record when resuming would train nothing: its last checkpoint already reached the steps
    this config asks for. HF ``Trainer`` resumed such a run by one more step when ``max_steps`` ends mid-epoch
    (rerunning the same command moved the adapter and rotated a checkpoint out)."""
    if checkpoint is None or not Path(config.output_dir, RUN_RECORD).is_file():
        return None
    state = json.loads(Path(checkpoint, "trainer_state.json").read_text())
    step = int(state.get("global_step", 0))
    if config.max_steps and config.max_steps > 0:
        target, same_schedule = config.max_steps, True
    else:  # epochs: the run's own step count, when it was asked the same epochs
        target = int(state.get("max_steps") or 0)
        same_schedule = float(state.get("num_train_epochs") or 0) == float(config.num_train_epochs)
    if not (same_schedule and target and step >= target):
        return None
    warnings.warn(f"{config.output_dir}: this run already reached step {step} of {target}; nothing to train (a larger "
                  "--max-steps continues it, --no-resume starts over)", stacklevel=3)
    return json.loads(Path(config.output_dir, RUN_RECORD).read_text())


def _refuse_another_runs_checkpoint(checkpoint: Path, config: TrainConfig, model_path: str, family) -> None:
    """Resuming continues a run; a checkpoint of another LoRA shape or another model family is not this run's (it
    failed to load, or silently went on training a Qwen2-VL adapter on Qwen3-VL)."""
    adapter = checkpoint / "adapter_config.json"
    if not adapter.is_file():
        return
    saved = json.loads(adapter.read_text(encoding="utf-8"))
    changed = [f"{key} {saved.get(peft_key)} -> {value}" for key, peft_key, value in
               (("lora_r", "r", config.lora_r), ("lora_alpha", "lora_alpha", config.lora_alpha))
               if saved.get(peft_key) != value]
    trained_on = adapter_family(checkpoint)
    if trained_on is not None and trained_on != family.model_type:
        changed.append(f"model {trained_on} -> {model_path} ({family.model_type})")
    if changed:
        raise TrainError(f"{checkpoint} is the checkpoint of another run ({'; '.join(changed)}): resuming would "
                         "continue that run. Pass --no-resume to start over in this folder, or choose another "
                         "--output-dir")


def train(config: TrainConfig, *, callbacks: list | None = None, trainer_class=None) -> dict:
    """Train a LoRA adapter; writes it, the processor, ``trainer_state.json`` and ``mmdata_train.json``.

    ``callbacks`` are extra ``TrainerCallback``s; ``trainer_class`` a subclass of the one from ``_trainer_class()``
    (the benchmark uses both for timing). Returns the run record (config, data counts, train metrics).
    """
    from transformers import set_seed

    set_seed(config.seed)
    model_path = resolve_model_path(config.model, config.model_hub)
    family = read_family(model_path)  # an unsupported model fails here, before any data is encoded
    resume_from = _resume_point(config, model_path, family)  # another run's checkpoint too
    finished = _finished_record(config, resume_from)
    if finished is not None:
        return finished
    processor = load_processor(model_path)
    ensure_chat_template(processor, family, model_path)
    data_kwargs = dict(min_pixels=config.min_pixels, max_pixels=config.max_pixels, cutoff_len=config.cutoff_len)

    info_path, train_names = resolve_split(config.dataset, "train", config.train_datasets)
    if not train_names:
        raise TrainError(f"{info_path}: no train split found; pass train_datasets (entry names)")
    train_set, train_stats = build_dataset(processor, read_conversations(info_path, train_names),
                                           max_samples=config.max_samples, **data_kwargs)
    if len(train_set) == 0:
        dropped = ", ".join(f"{reason}: {n}" for reason, n in train_stats.dropped.most_common())
        raise TrainError(f"no usable training sample in {', '.join(train_names)} (dropped: {dropped})")
    _, val_names = resolve_split(config.dataset, "val", config.val_datasets)
    val_set, val_stats = (build_dataset(processor, read_conversations(info_path, val_names), **data_kwargs)
                          if val_names else (None, None))

    dtype = pick_dtype(config.precision)
    attn = pick_attention(config.attn_implementation)
    adapter_dtype = pick_adapter_dtype(config, dtype)
    # auto packs where attention runs per record without a mask (flash-attn, flash_varlen_torch): no padding, and
    # on an H200 packed Med-length rows ran 1.04x padded ones with less memory (benchmarks/README.md, runs E-G)
    pack = config.batching == "pack" or (config.batching == "auto" and attn in ("flash_attention_2", ATTENTION_NAME))
    compiled = should_compile(config)
    # compiled whole layers checkpoint selectively (model.keep_dropout_context), which Trainer cannot be told
    own_checkpointing = config.gradient_checkpointing and compiled and config.compile_scope == "layers"
    # arguments before the model: with DeepSpeed ZeRO-3 this makes from_pretrained load weights partitioned
    args = _training_arguments(config, dtype, len(train_set), has_eval=bool(val_set),
                               trainer_checkpoints=not own_checkpointing)
    model = attach_lora(load_model(model_path, dtype=dtype, attn=attn, quantization_bit=config.quantization_bit),
                        config, adapter_dtype)
    frozen_vision = run_frozen_vision_without_grad(model)
    if own_checkpointing:
        enable_checkpointing(model, keep_dropout=True)
    fused = 0
    if compiled:  # fused only where compiled: QLoRA, DeepSpeed and FSDP reach the base weight inside its own call
        fused = fuse_lora_into_wide_projections(model)
        compile_language_layers(model, config.compile_scope)
    # vision blocks compile whole only where attention takes the tower's boundaries (the flash kinds); under SDPA
    # the tower splits its patches image by image on the host, a graph break in every block
    vision_compiled = (compiled and frozen_vision and config.compile_vision
                       and attn in ("flash_attention_2", ATTENTION_NAME))
    if vision_compiled:
        compile_vision_blocks(model)
    trainer = (trainer_class or _trainer_class())(
        callbacks=callbacks, autocast=_forward_autocast(config, dtype, adapter_dtype), compile_loss=compiled,
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set or None,
        data_collator=VisionSFTCollator(processor.tokenizer.pad_token_id, pack=pack), processing_class=processor)
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    record = {
        "config": config.model_dump(),
        "model_path": str(model_path),
        "model_type": family.model_type,
        "train_datasets": train_names,
        "val_datasets": val_names,
        "data": {"train": train_stats.as_dict(), "val": val_stats.as_dict() if val_stats else None},
        "batching": "pack" if pack else "pad",
        "attn_implementation": attn,
        "dtype": str(dtype).removeprefix("torch."),
        "adapter_dtype": str(adapter_dtype).removeprefix("torch."),
        "compiled": compiled,
        "compile_scope": config.compile_scope if compiled else None,
        "compiled_vision": vision_compiled,
        "fused_lora_projections": fused,
        "metrics": result.metrics,
        "global_step": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
        processor.save_pretrained(config.output_dir)
        Path(config.output_dir, RUN_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
