"""Merge a LoRA adapter into its base model and save a self-contained model folder.

The folder gets the merged weights, the generation config, and the processor with tokenizer, image processor and
chat template, so ``AutoProcessor.from_pretrained(out).apply_chat_template(...)`` works (the tutorial's export saved
weights only and failed with "No chat template is set for this processor"). The export is checked by reloading
the processor from the written folder before returning.
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainError
from .model import load_model, load_processor, resolve_model_path
from .tiny import QWEN2_VL_CHAT_TEMPLATE


def export(model: str, adapter: str, output_dir: str, *, model_hub: str = "huggingface") -> Path:
    """Write ``base + adapter`` merged into ``output_dir`` (weights in the base checkpoint's dtype)."""
    from peft import PeftModel
    from transformers import AutoConfig

    if not Path(adapter, "adapter_config.json").exists():
        raise TrainError(f"{adapter}: no adapter_config.json; pass the output_dir of `mmdata train`")
    model_path = resolve_model_path(model, model_hub)
    base = load_model(model_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)

    processor = load_processor(adapter, fallback=model_path)
    if not getattr(processor, "chat_template", None):
        base_template = getattr(load_processor(model_path), "chat_template", None)
        model_type = AutoConfig.from_pretrained(model_path).model_type
        processor.chat_template = base_template or (QWEN2_VL_CHAT_TEMPLATE if model_type == "qwen2_vl" else None)
    if not processor.chat_template:
        raise TrainError(f"{model_path}: neither the adapter nor the base model has a chat template to export")
    processor.save_pretrained(out)

    reloaded = load_processor(str(out))
    try:
        reloaded.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                     tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a broken export
        raise TrainError(f"{out}: exported processor cannot apply its chat template ({e})") from e
    return out
