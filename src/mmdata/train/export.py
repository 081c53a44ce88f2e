"""Merge a LoRA adapter into its base model and save a self-contained model folder.

The folder gets the merged weights, the generation config, and the processor with tokenizer, image (and video)
processor and chat template, so ``AutoProcessor.from_pretrained(out).apply_chat_template(...)`` works (the
tutorial's export saved weights only and failed with "No chat template is set for this processor"). The template
is the one training saved with the adapter, else the base model's, else the family's Instruct template
(``families.py``), so a Qwen3-VL export keeps Qwen3-VL's template (no default system prompt), never Qwen2-VL's.
The export is checked by reloading the processor from the written folder and rendering a conversation before
returning. The run's ``mmdata_train.json`` is copied beside it, so ``predict --model <export>`` sizes images with
the trained pixel budget (it ran at the default budget and predicted garbage for a run trained at another).
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainError
from .model import load_adapter, load_model, load_processor, read_family, resolve_model_path


def export(model: str, adapter: str, output_dir: str, *, model_hub: str = "huggingface") -> Path:
    """Write ``base + adapter`` merged into ``output_dir`` (weights in the base checkpoint's dtype)."""
    if not Path(adapter, "adapter_config.json").exists():
        raise TrainError(f"{adapter}: no adapter_config.json; pass the output_dir of `mmdata train`")
    model_path = resolve_model_path(model, model_hub)
    family = read_family(model_path)
    base = load_model(model_path, dtype="auto")
    merged = load_adapter(base, adapter, model_path).merge_and_unload()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)

    processor = load_processor(adapter, fallback=model_path)
    if not getattr(processor, "chat_template", None):
        base_template = getattr(load_processor(model_path), "chat_template", None)
        processor.chat_template = base_template or family.chat_template
    processor.save_pretrained(out)
    # transformers 5 nests the image/video processor configs in processor_config.json; the per-processor files
    # (preprocessor_config.json, video_preprocessor_config.json) keep the folder readable by transformers 4.x
    # (LLaMA-Factory's pinned versions, older vLLM). Same content, so either reader sees the same settings.
    for part in ("image_processor", "video_processor"):
        if getattr(processor, part, None) is not None:
            getattr(processor, part).save_pretrained(out)

    record = Path(adapter, "mmdata_train.json")  # the run's settings: `predict --model <export>` reads its pixels
    if record.is_file():
        (out / record.name).write_bytes(record.read_bytes())
    reloaded = load_processor(str(out))
    try:
        reloaded.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                     tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a broken export
        raise TrainError(f"{out}: exported processor cannot apply its chat template ({e})") from e
    return out
