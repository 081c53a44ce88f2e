"""The trainer's settings: one validated pydantic model, read from YAML and overridden by CLI flags.

Why one flat model: every option lives in one place with its default and its check, the CLI and the Python API
fill the same object, and ``mmdata_train.json`` records exactly what ran. Options that cannot work together fail
here, before a model is loaded, with a message that names the option (axolotl's habit).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import MmdataError

# Every linear projection of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL decoder layer: the default LoRA targets (the
# tutorial's list too).
LANGUAGE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainError(MmdataError):
    """Training, prediction or export cannot start or failed: bad option, missing file, unsupported model."""

    exit_code = 6


class TrainConfig(BaseModel):
    """All trainer options. Field names match the YAML keys and the ``--flag-names`` (dashes for underscores)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # what to train on
    model: str = Field(description="local model folder or hub id (Qwen2-VL / Qwen2.5-VL / Qwen3-VL)")
    model_hub: Literal["huggingface", "modelscope"] = "huggingface"
    dataset: str = Field(description="an mmdata build folder, or a dataset_info.json / its folder")
    train_datasets: list[str] | None = Field(None, description="entry names; default: the build's train split")
    val_datasets: list[str] | None = Field(None, description="entry names; default: the build's val split")
    output_dir: str = "output"
    max_samples: int | None = Field(None, ge=1, description="use at most this many training samples")

    # LoRA
    lora_r: int = Field(64, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LANGUAGE_TARGETS),
                                      description="leaf names of linear layers of the language model")
    lora_vision: bool = Field(False, description="also adapt every linear layer of the vision blocks (attn.qkv, "
                                                 "attn.proj and the MLP: fc1/fc2; gate/up/down_proj in Qwen2.5-VL; "
                                                 "linear_fc1/2 in Qwen3-VL)")
    lora_merger: bool = Field(False, description="also adapt the vision-language merger MLP (Qwen3-VL: and its "
                                                 "DeepStack mergers)")
    use_dora: bool = False
    quantization_bit: Literal[4] | None = Field(None, description="QLoRA: 4-bit base weights (bitsandbytes, CUDA)")
    freeze_vision: bool = Field(True, description="false: adapt the vision blocks too (same as lora_vision)")
    adapter_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="LoRA weights and their optimizer state. bf16: the whole step runs in bf16 without "
                            "autocast (faster, less memory, coarser updates); fp32: fp32 adapters under bf16/fp16 "
                            "autocast; auto: bf16 when the model trains in bf16 without QLoRA or DeepSpeed")

    # data
    # LLaMA-Factory's image_min_pixels / image_max_pixels defaults: images are sized as it sizes them (trained_size)
    min_pixels: int = Field(32 * 32, ge=1)
    max_pixels: int = Field(768 * 768, ge=28 * 28)
    cutoff_len: int = Field(2048, ge=16)
    batching: Literal["auto", "pad", "pack"] = Field(
        "auto", description="pad: length-grouped padded micro-batches; pack: each micro-batch's records in one "
                            "padding-free row, every record attending only to itself; auto: pack with flash-attn "
                            "or flash_varlen_torch (the GPU default), pad otherwise")
    packing: bool | None = Field(None, description="LLaMA-Factory's spelling: true is batching: pack, false is "
                                                   "batching: pad")
    dataloader_num_workers: int | None = Field(None, ge=0, description="default: min(8, CPUs - 1)")

    # optimisation
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = -1
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    gradient_checkpointing: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "flash_varlen_torch", "eager"] = Field(
        "auto", description="auto: flash_attention_2 with flash-attn installed, else on a GPU flash_varlen_torch "
                            "(PyTorch's own variable-length FlashAttention kernels), else sdpa")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config (ZeRO-2/3)")
    compile_scope: Literal["parts", "layers"] = Field(
        "layers", description="what one compiled region is: layers (each decoder layer whole, checkpoint included, "
                              "keeping the LoRA dropout masks: two region calls per layer and step) or parts (each "
                              "layer's attention, MLP and norms apart, under an eager checkpoint)")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile every language-model layer, as compile_scope says (fewer, fused "
                            "kernels; the first step pays about a minute of compiling). auto: on a CUDA GPU "
                            "with Triton, without QLoRA, DeepSpeed or FSDP")
    compile_vision: bool = Field(
        True, description="with compile on and flash attention (flash_varlen_torch, flash_attention_2), also "
                          "torch.compile each block of the frozen vision tower (fused norms, rotary embedding and "
                          "activation); false: the tower runs eager")

    # bookkeeping
    eval_steps: int | None = Field(None, ge=1, description="evaluate on the val split every N steps")
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    logging_steps: int = Field(10, ge=1)
    seed: int = 42
    resume: bool | str = Field(True, description="true: continue from the last checkpoint in output_dir if any; "
                                                 "false: start over; a path: that checkpoint")
    report_to: Literal["none", "tensorboard", "swanlab"] = "none"

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"{value} steps: give a number of optimizer steps >= 1, or -1 to train "
                             "num_train_epochs epochs")
        return value

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        if value not in names:
            raise ValueError(f"{value!r} is not a scheduler transformers knows: {', '.join(names)}")
        return value

    @field_validator("target_modules", "train_datasets", "val_datasets", mode="before")
    @classmethod
    def _split_targets(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.packing is not None:
            wanted = "pack" if self.packing else "pad"
            if self.batching not in ("auto", wanted):
                raise ValueError(f"packing: {str(self.packing).lower()} contradicts batching: {self.batching}; "
                                 "set one of them")
            self.batching = wanted
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if not self.target_modules:
            raise ValueError("target_modules is empty: name at least one linear layer, e.g. q_proj,v_proj")
        if self.quantization_bit and self.deepspeed and "3" in Path(self.deepspeed).name:
            raise ValueError("quantization_bit with DeepSpeed ZeRO-3 is not supported: use ZeRO-2 or drop QLoRA")
        if self.compile is True and (self.quantization_bit or self.deepspeed):
            raise ValueError("compile: true does not work with quantization_bit or deepspeed (their layers and "
                             "hooks break torch.compile graphs); use compile: auto or false")
        if self.adapter_dtype == "bf16" and (self.precision in ("fp16", "fp32") or self.quantization_bit
                                             or self.deepspeed):
            raise ValueError("adapter_dtype: bf16 needs precision bf16 (or auto on a bf16 GPU) without "
                             "quantization_bit or deepspeed; use adapter_dtype: fp32 or auto")
        return self


def load_train_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """Read a YAML file (optional) and apply ``overrides`` (``None`` values are ignored, so CLI defaults never win)."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise TrainError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise TrainError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise TrainError(f"{path}: expected a mapping of option: value")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
        raise TrainError(f"invalid train config: {problems}") from None
