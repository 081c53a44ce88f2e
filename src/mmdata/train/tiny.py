"""Write a tiny, randomly initialised Qwen2-VL checkpoint folder that loads offline like the real one.

Why: tests, CI and users without a GPU or network need a model folder that every consumer of a real
``Qwen/Qwen2-VL-2B-Instruct`` download accepts unchanged (``AutoProcessor``, ``Qwen2VLForConditionalGeneration``,
LLaMA-Factory's ``qwen2_vl`` template and mm plugin), yet trains in seconds on a CPU. So the folder copies the real
checkpoint's *layout and semantics* and shrinks only the sizes:

- ``config.json`` is written flat, in the hub's format (``model_type: qwen2_vl``, text keys at the top level,
  ``vision_config``, ``rope_scaling: {type: mrope, mrope_section}``, the special token ids), which transformers 4.x
  and 5.x both read;
- the tokenizer is a real byte-level BPE with Qwen2's pre-tokenizer regex, trained here (deterministically) on a
  small built-in corpus, followed by Qwen2's special tokens in Qwen2's order (``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, ..., ``<|vision_start|>``, ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``,
  ``<|video_pad|>``), so ids differ from the real ones but every token plays the same role;
- ``preprocessor_config.json`` is the real Qwen2-VL one (patch 14, merge 2, CLIP mean/std, min/max pixels),
  and Qwen2-VL's own chat template is saved in ``tokenizer_config.json`` and ``chat_template.json``.

The result is about 1 MB. It is a smoke model: its outputs are noise until trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Qwen2-VL's chat template, verbatim from Qwen/Qwen2-VL-*-Instruct (chat_template.json / tokenizer_config.json).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's special tokens in the order of the real vocabulary (real ids 151643..151656).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

# Qwen2's pre-tokenizer regex (tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The real preprocessor_config.json of Qwen2-VL-*-Instruct.
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

_CORPUS = """You are a helpful assistant. Describe the image. What is in this picture? Transcribe the formula.
Write the LaTeX code of the formula in the image. The image shows a chest X-ray with no acute findings.
This is a computed tomography scan of the abdomen showing the liver, the kidneys and the spleen.
The answer is yes. The answer is no. A red square on a white background. A blue circle. Green text.
\\frac{a}{b} + \\frac{c}{d} = \\frac{ad + bc}{bd} E = mc^{2} \\sum_{i=1}^{n} i \\int_{0}^{1} x^{2} dx \\sqrt{x}
\\alpha \\beta \\gamma \\delta \\theta \\lambda \\mu \\pi \\sigma \\omega \\left( \\right) \\mathbf{E} \\cdot \\times
the of and to in is that for it as with was on be by this are from at or an which have not has but its
"""


def _train_tokenizer(vocab_size: int, pad_vocab_to: int | None = None):
    """A byte-level BPE shaped exactly like Qwen2's ``tokenizer.json``, trained on :data:`_CORPUS`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    if pad_vocab_to:
        vocab = tok.get_vocab()
        vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), pad_vocab_to)})
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges(tok)]
        model = models.BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
        pre, norm, dec = tok.pre_tokenizer, tok.normalizer, tok.decoder
        tok = Tokenizer(model)
        tok.pre_tokenizer, tok.normalizer, tok.decoder = pre, norm, dec
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _merges(tok) -> list:
    return json.loads(tok.to_str())["model"]["merges"]


def _tokenizer_config(tok) -> dict:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                                      "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                                      "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                      "<|video_pad|>"],
        "bos_token": None,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",  # like the real Qwen2-VL tokenizer_config; the trainer pads explicitly anyway
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def tiny_config(vocab_size: int, ids: dict[str, int], *, hidden_size: int = 64, layers: int = 2) -> dict:
    """Flat hub-style Qwen2-VL ``config.json`` with tiny sizes (head_dim 16, so ``mrope_section`` sums to 8)."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": hidden_size * 2,
        "max_position_embeddings": 32768,
        "max_window_layers": layers,
        "num_attention_heads": hidden_size // 16,
        "num_hidden_layers": layers,
        "num_key_value_heads": max(1, hidden_size // 32),
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3, "hidden_size": hidden_size,
            "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": vocab_size,
    }


def make_tiny_qwen2vl(path: str | os.PathLike, *, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                      tokenizer_vocab: int = 600) -> Path:
    """Write the tiny checkpoint to ``path`` (created; files inside are overwritten) and return the path.

    Loads offline with ``AutoProcessor.from_pretrained(path)`` and
    ``Qwen2VLForConditionalGeneration.from_pretrained(path)``; ``mmdata train --model path`` accepts it.
    """
    import torch

    out = Path(path)
    ids, vocab = write_tokenizer_and_processor(out, tokenizer_vocab)
    flat = tiny_config(-(-vocab // 64) * 64, ids, hidden_size=hidden_size, layers=layers)  # padded like 151936

    def rescale_embeddings(model):
        # With 64-dim hidden states of RMS 1 and the usual 0.02-std embeddings, no logit can exceed ~1.3, so the
        # (tied) vocabulary projection could never fit anything: give the embeddings a trained-like scale instead.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.1)

    write_random_model(out, flat, seed=seed, dtype=torch.float32, adjust=rescale_embeddings)
    return out


def write_tokenizer_and_processor(out: Path, tokenizer_vocab: int = 600, pad_vocab_to: int | None = None):
    """Tokenizer, tokenizer/processor configs and chat template; returns (special token ids, vocabulary size).

    ``pad_vocab_to`` appends unreachable filler tokens before the special tokens, so that with 151643 the special
    tokens get the real Qwen2 ids (``<|image_pad|>`` = 151655 ...), for benchmarks with the exact real config.
    """
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(tokenizer_vocab, pad_vocab_to)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out), None)  # vocab.json + merges.txt, for code paths that rebuild the BPE from them
    _write_json(out / "tokenizer_config.json", _tokenizer_config(tok))
    _write_json(out / "special_tokens_map.json", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                   "additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return ids, tok.get_vocab_size()


def write_random_model(out: Path, flat: dict, *, seed: int = 0, dtype=None, device: str | None = None,
                       adjust=None) -> None:
    """Randomly initialise ``Qwen2VLForConditionalGeneration`` from a flat hub-style config and save it."""
    import copy

    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**copy.deepcopy(flat)))  # some versions edit the dict
    model = model.to(dtype or torch.float32)
    if adjust is not None:
        adjust(model)
    model.save_pretrained(out, safe_serialization=True)
    _write_json(out / "config.json", flat)  # the hub's flat format, read by transformers 4.x and 5.x alike
    _write_json(out / "generation_config.json", {
        "bos_token_id": flat["bos_token_id"], "pad_token_id": flat["bos_token_id"],
        "eos_token_id": [flat["eos_token_id"], flat["bos_token_id"]], "do_sample": False,
    })


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
