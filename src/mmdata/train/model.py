"""Load Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and processors, pick dtype and attention, and attach LoRA adapters.

Shared by training, prediction and export so all three load a model the same way. The ``model_type`` in
``config.json`` picks the family (``families.py``) and with it the model class, loaded by name
(``Qwen3VLForConditionalGeneration`` ...), so an unsupported or too-new model fails before any weight is read.
Modules are located by structure, not by leaf name: the decoder is ``get_decoder()`` (its ``layers`` and final
``norm``), the vision tower is the module named ``visual``; LoRA targets are given to PEFT as full names of linear
layers under them, so they do not depend on how a transformers version nests ``model.language_model`` /
``model.visual``, and the language model's ``gate_proj`` can never catch Qwen2.5-VL's vision ``mlp.gate_proj``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import types
from pathlib import Path

import torch

from .attention import ATTENTION_NAME, register_attention, torch_varlen_available
from .config import TrainConfig, TrainError
from .families import FAMILIES, Family, family_of

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def resolve_model_path(model: str, hub: str = "huggingface") -> str:
    """A local folder as is; a hub id downloaded through ModelScope when asked (transformers handles HF ids)."""
    if Path(model).is_dir():
        return model
    if hub == "modelscope":
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise TrainError("model_hub: modelscope needs the modelscope package: pip install modelscope") from None
        try:
            return snapshot_download(model)
        except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors come as many types
            raise TrainError(f"{model}: cannot download it from ModelScope ({type(e).__name__}: {_first_line(e)}); "
                             "check the id and the network, or download it elsewhere and pass the folder") from None
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(model).exists():
        raise TrainError(f"{model}: not a local folder and HF_HUB_OFFLINE=1; pass the model folder")
    return model


def pick_dtype(precision: str) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, else fp16 on CUDA, else fp32 (CPU)."""
    if precision == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def pick_adapter_dtype(config: TrainConfig, dtype: torch.dtype) -> torch.dtype:
    """The LoRA weights' dtype: ``auto`` is bf16 when the model trains in bf16 without QLoRA or DeepSpeed.

    Why bf16 adapters by default: with fp32 adapters under bf16 autocast, PEFT casts every adapted layer's input to
    fp32 and autocast casts it back (thousands of copy kernels per step, on a step bound by kernel launches), and
    accelerate's autocast wrapper returns the logits as an fp32 copy. With bf16 adapters the step needs no autocast
    at all: everything already runs in bf16. The price is bf16 weights and Adam state for the adapter (coarser
    updates); ``adapter_dtype: fp32`` keeps fp32 master weights. QLoRA and DeepSpeed manage their own precision.
    """
    if config.adapter_dtype == "fp32":
        return torch.float32
    if dtype != torch.bfloat16 or config.quantization_bit or config.deepspeed:
        if config.adapter_dtype == "bf16":
            raise TrainError(f"adapter_dtype: bf16 needs a bf16 model; precision resolved to "
                             f"{str(dtype).removeprefix('torch.')} (CPU or a GPU without bf16): use adapter_dtype auto")
        return torch.float32
    return torch.bfloat16


def pick_attention(name: str, *, training: bool = True) -> str:
    """``auto``: flash_attention_2 when flash-attn is installed and a GPU is present; for training on a GPU without
    it, PyTorch's own variable-length FlashAttention (``attention.py``); else PyTorch SDPA. Generation
    (``training=False``) never gets the training-only function."""
    if name == "auto":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
            return "flash_attention_2"
        return ATTENTION_NAME if training and torch_varlen_available() else "sdpa"
    if name == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
        raise TrainError("attn_implementation: flash_attention_2 needs flash-attn: pip install flash-attn, or use sdpa "
                         f"(or {ATTENTION_NAME}: PyTorch's own FlashAttention kernels)")
    return name


def load_processor(path: str, *, fallback: str | None = None):
    """``AutoProcessor`` of ``path``; tokenizer left-padded for generation, chat template checked."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except OSError as e:
        if fallback is None:
            raise TrainError(f"{path}: cannot load the model's processor ({_first_line(e)}); the folder needs the "
                             "model's preprocessor_config.json and tokenizer files as the hub ships them") from None
        return load_processor(fallback)
    if getattr(processor, "chat_template", None) is None and getattr(processor.tokenizer, "chat_template", None):
        processor.chat_template = processor.tokenizer.chat_template
    return processor


def ensure_chat_template(processor, family: Family, where: str) -> None:
    """A processor without a chat template (a base checkpoint, a folder copied without ``chat_template.json``) gets
    its family's Instruct template, with a warning: what LLaMA-Factory's ``template:`` and ``mmdata export`` use.
    Training refused such a model while export accepted it."""
    if getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None):
        return
    import warnings

    processor.chat_template = family.chat_template
    warnings.warn(f"{where} has no chat template: using the {family.model_type} Instruct template", stacklevel=2)


def model_class(family: Family):
    """The family's transformers class (e.g. ``Qwen3VLForConditionalGeneration``); a clear error when this
    transformers version predates it."""
    import transformers

    cls = getattr(transformers, family.model_class, None)
    if cls is None:
        raise TrainError(f"{family.name} needs transformers >= {family.min_transformers} ({family.model_class} is "
                         f"missing from transformers {transformers.__version__}): pip install -U transformers")
    return cls


def read_family(path: str) -> Family:
    """The :class:`Family` of the checkpoint at ``path`` (from its ``config.json``)."""
    from transformers import AutoConfig

    if not Path(path).is_dir() and (path.startswith((".", "/", "~")) or os.sep + os.sep in path):
        raise TrainError(f"{path}: no such model folder")
    config = Path(path) / "config.json"
    if config.is_file():  # a folder says its family itself: an unsupported one (InternVL's remote code) is named as
        try:              # such, not as transformers' "upgrade transformers" for a model_type it does not know
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError):
            model_type = None
        if isinstance(model_type, str):
            return family_of(model_type, path)
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except OSError as e:  # no config.json, or a hub id this machine cannot fetch
        raise TrainError(f"{path}: not a model ({_first_line(e)}); pass a model folder (config.json, weights, "
                         "processor files) or a hub id this machine can download") from None
    except (ValueError, KeyError) as e:  # a model_type this transformers version does not know, a malformed id
        if not Path(path).is_dir():
            raise TrainError(f"{path}: neither a model folder nor a hub id ({_first_line(e)})") from None
        raise TrainError(f"{path}: cannot read its config.json with this transformers version ({e})") from None
    return family_of(model_type, path)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def load_adapter(base, adapter: str, model_path: str):
    """``PeftModel`` of ``base`` + the adapter folder, refused with a :class:`TrainError` when the adapter is not
    one of this base: another model family (merging a Qwen3-VL adapter into Qwen2-VL wrote a model of neither, with
    exit code 0) or other layer shapes."""
    from peft import PeftModel

    if not Path(adapter, "adapter_config.json").exists():
        raise TrainError(f"{adapter}: no adapter_config.json; pass the output_dir of `mmdata train`")
    family = family_of_model(base)
    trained_on = adapter_family(Path(adapter))
    if trained_on is not None and trained_on != family.model_type:
        raise TrainError(f"{adapter} is a {trained_on} adapter, and --model {model_path} is {family.model_type}: "
                         "pass the model it was trained on")
    try:
        return PeftModel.from_pretrained(base, adapter)
    except (RuntimeError, ValueError, KeyError) as e:
        saved = json.loads(Path(adapter, "adapter_config.json").read_text(encoding="utf-8"))
        raise TrainError(f"{adapter} does not fit --model {model_path} (trained on "
                         f"{saved.get('base_model_name_or_path')}): {str(e).splitlines()[0][:300]}") from None


def adapter_family(adapter: Path) -> str | None:
    """The model type an adapter was trained on: its run record (in the folder, or the run's folder above a
    ``checkpoint-N``), else the family of the base folder its config names, if that still exists."""
    for record in (adapter / "mmdata_train.json", adapter.parent / "mmdata_train.json"):
        if record.is_file():
            model_type = json.loads(record.read_text(encoding="utf-8")).get("model_type")
            if model_type:
                return model_type
    base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if base and Path(base).is_dir():
        try:
            return read_family(base).model_type
        except TrainError:
            return None
    return None


def family_of_model(model) -> Family:
    """The :class:`Family` of a loaded (possibly PEFT-wrapped) model."""
    return family_of(unwrap_peft(model).config.model_type)


def load_model(path: str, *, dtype: torch.dtype | str, attn: str = "sdpa", quantization_bit: int | None = None):
    """The base model in ``dtype`` with the chosen attention; 4-bit (QLoRA) only on CUDA with bitsandbytes."""
    cls = model_class(read_family(path))
    kwargs: dict = {"attn_implementation": attn}
    if quantization_bit:
        if not torch.cuda.is_available():
            raise TrainError("quantization_bit: 4 (QLoRA) needs a CUDA GPU; drop quantization_bit to train in "
                             "bf16/fp32 on this machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainError("quantization_bit: 4 needs bitsandbytes: pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if attn == ATTENTION_NAME:
        kwargs["attn_implementation"] = "sdpa"  # replaced below, once loaded
    try:
        model = cls.from_pretrained(path, dtype=dtype, **kwargs)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = cls.from_pretrained(path, torch_dtype=dtype, **kwargs)
    if attn == ATTENTION_NAME:
        use_attention(model, attn)
    return model


def use_attention(model, name: str) -> None:
    """Switch a loaded model (and its vision and text sub-models) to the attention implementation ``name``.

    :data:`~mmdata.train.attention.ATTENTION_NAME` is set on the config directly, as LLaMA-Factory sets its
    attention: transformers' ``set_attn_implementation`` / ``from_pretrained`` take any name containing "flash" for
    a flash-attn package or hub kernel and try to import one, while the name must contain "flash" for the vision
    towers to pass their ``cu_seqlens`` (``attention.py``). The config setter carries it into every sub-config.
    """
    if name == ATTENTION_NAME:
        register_attention()
        unwrap_peft(model).config._attn_implementation = name
    else:
        unwrap_peft(model).set_attn_implementation(name)


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (or the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_model(model):
    """The decoder (``get_decoder()``): its ``layers`` are compiled, its final ``norm`` feeds the chunked loss."""
    base = unwrap_peft(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base or not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
        raise TrainError(f"{type(base).__name__}: cannot find its language model (get_decoder() with .layers and "
                         f".norm); this transformers version nests {base.config.model_type} differently")
    return decoder


def vision_tower(model):
    """The vision tower: the module named ``visual`` (``model.visual`` in all three families)."""
    base = unwrap_peft(model)
    found = [m for n, m in base.named_modules() if n.split(".")[-1] == "visual"]
    if len(found) != 1:
        raise TrainError(f"{type(base).__name__}: expected one vision tower named 'visual', found {len(found)}; "
                         f"this transformers version nests {base.config.model_type} differently")
    return found[0]


def _names_under(model, module) -> str:
    """The dotted name of ``module`` inside ``model`` (as ``named_modules`` spells it)."""
    return next(n for n, m in model.named_modules() if m is module)


def lora_target_names(model, config: TrainConfig) -> list[str]:
    """Full names of the linear layers to adapt; unknown ``target_modules`` fail with the list of valid names.

    Language targets are linear layers under the decoder whose leaf name is in ``target_modules``; ``lora_vision``
    adds every linear layer of the vision blocks (the family's ``vision_block_linears``, checked), ``lora_merger``
    those of the merger(s) (Qwen3-VL: the DeepStack mergers too).
    """
    family = family_of_model(model)
    linear = {name: module for name, module in model.named_modules() if _is_linear(module)}
    decoder = _names_under(model, language_model(model)) + "."
    visual = _names_under(model, vision_tower(model)) + "."
    language = {n for n in linear if n.startswith(decoder)}
    valid = sorted({n.rsplit(".", 1)[-1] for n in language})
    unknown = sorted(set(config.target_modules) - set(valid))
    if unknown:
        raise TrainError(f"Target modules {set(unknown)} not found in the language model; valid names: "
                         f"{', '.join(valid)} (vision blocks: set lora_vision; merger: set lora_merger)")
    names = [n for n in language if n.rsplit(".", 1)[-1] in config.target_modules]
    if config.lora_vision or not config.freeze_vision:
        blocks = [n for n in linear if n.startswith(visual + "blocks.")]
        leaves = {n.rsplit(".", 1)[-1] for n in blocks}
        if leaves != set(family.vision_block_linears):
            raise TrainError(f"lora_vision: the {family.name} vision blocks' linear layers are "
                             f"{', '.join(sorted(leaves)) or 'missing'}, expected "
                             f"{', '.join(family.vision_block_linears)}; this transformers version renamed them")
        names += blocks
    if config.lora_merger:
        merger = [n for n in linear if n.startswith(tuple(f"{visual}{m}." for m in family.mergers))]
        if not merger:
            raise TrainError(f"lora_merger: no linear layer under {', '.join(family.mergers)} in the "
                             f"{family.name} vision tower; this transformers version renamed it")
        names += merger
    return sorted(names)


def _is_linear(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def attach_lora(model, config: TrainConfig, adapter_dtype: torch.dtype = torch.float32):
    """Freeze every base weight (vision tower included) and wrap the model with a LoRA adapter.

    Base weights stay frozen in LoRA training; ``freeze_vision: false`` means "adapt the vision blocks too" (LoRA on
    their linear layers), which keeps the saved adapter small and mergeable. ``adapter_dtype``: fp32 adapters (PEFT's
    default) or adapters in the model's own dtype (see ``pick_adapter_dtype``).
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_target_names(model, config)
    if config.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    for param in model.parameters():
        param.requires_grad_(False)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, use_dora=config.use_dora, task_type="CAUSAL_LM")
    # autocast_adapter_dtype=False: PEFT creates the adapter in the base layers' dtype instead of upcasting it
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=adapter_dtype == torch.float32)
    if adapter_dtype == torch.float32 and not config.quantization_bit:
        # fp32 adapters on a half-precision model train under autocast, which casts each adapter matmul's input
        # itself; PEFT's own cast of the whole activation to fp32 would only add a copy (and its backward)
        for module in peft_model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    return peft_model


def fuse_lora_into_wide_projections(model) -> int:
    """Compute each adapted projection that widens its input (the MLP's ``gate_proj`` and ``up_proj``) and its LoRA
    update as one matrix product (:class:`LinearWithLoRA`); returns how many were fused.

    Why: PEFT adds ``lora_B(lora_A(x)) * scaling`` to ``base(x)``, so each of these projections writes a second
    (tokens x intermediate) tensor and everything after reads both; in backward the output's gradient is read once
    more for ``lora_B``'s input gradient. Appending the scaled ``lora_A(x)`` to the input's columns and ``lora_B`` to
    the weight's gives the same sum from one product whose inner dimension is ``rank`` longer: the extra copy is of
    the narrow input, not of the wide output. On a Qwen2-VL-2B MedTrinity-length step those two tensors are
    intermediate = 5.8x hidden wide (benchmarks/README.md, run I). Narrower projections gain nothing and stay PEFT's.

    The trainer fuses only where it compiles the layers (``should_compile``: no QLoRA, DeepSpeed or FSDP, whose
    weights are quantized or gathered only inside the base layer's own call). Skipped: DoRA and other variants,
    several active adapters, a LoRA bias, and PEFT before 0.16 (where a DoRA module cannot be told apart this way).
    The module keeps its class and parameters, so saving and loading the adapter is PEFT's own; its ``forward`` is
    an instance attribute, so the whole model object no longer pickles (the trainer never pickles it).
    """
    fused = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        # lora_variant (DoRA and others) and _cast_input_dtype exist from PEFT 0.16; before, a DoRA module looks plain
        if (type(base) is torch.nn.Linear and base.out_features > base.in_features
                and len(getattr(module, "active_adapters", ())) == 1 and hasattr(module, "_cast_input_dtype")
                and getattr(module, "lora_variant", None) == {} and not getattr(module, "merged", True)):
            name = module.active_adapters[0]
            if (name in module.lora_A and module.lora_B[name].bias is None
                    and not getattr(module, "use_dora", {}).get(name)):
                module.forward = types.MethodType(_forward_with_fused_lora, module)
                fused += 1
    return fused


def _forward_with_fused_lora(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` for one plain adapter, through :class:`LinearWithLoRA`; anything else (adapters
    disabled or merged since, extra arguments) goes to PEFT's own forward."""
    if args or kwargs or self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    lora_a = self.lora_A[name]
    scaled = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype))) * self.scaling[name]
    out = LinearWithLoRA.apply(x, scaled, self.base_layer.weight, self.lora_B[name].weight)
    return out if self.base_layer.bias is None else out + self.base_layer.bias


class LinearWithLoRA(torch.autograd.Function):
    """``x @ W.T + scaled @ B.T`` as ``[x, scaled] @ [W, B].T`` (``W`` frozen, ``B`` LoRA's up-projection).

    Backward: one product of the output's gradient with ``[W, B]`` gives the gradients of ``x`` and ``scaled``
    together (the last ``rank`` columns are ``scaled``'s), and ``B``'s gradient is ``grad.T @ scaled``; ``W`` gets
    none. Nothing but ``scaled`` (tokens x rank) is kept for backward besides the parameters.
    """

    @staticmethod
    def forward(ctx, x, scaled, weight, lora_b):
        ctx.save_for_backward(scaled, weight, lora_b)
        joined = torch.cat([x, scaled.to(x.dtype)], dim=-1)
        return torch.nn.functional.linear(joined, torch.cat([weight, lora_b.to(weight.dtype)], dim=1))

    @staticmethod
    def backward(ctx, grad):
        scaled, weight, lora_b = ctx.saved_tensors
        joined_grad = grad @ torch.cat([weight, lora_b.to(weight.dtype)], dim=1).to(grad.dtype)
        width = weight.shape[1]
        grad_x = joined_grad[..., :width] if ctx.needs_input_grad[0] else None
        grad_scaled = joined_grad[..., width:].to(scaled.dtype) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.needs_input_grad[3]:
            flat_grad = grad.reshape(-1, grad.shape[-1])
            grad_b = (flat_grad.T @ scaled.reshape(-1, scaled.shape[-1]).to(grad.dtype)).to(lora_b.dtype)
        return grad_x, grad_scaled, None, grad_b


def run_frozen_vision_without_grad(model) -> bool:
    """Run the vision tower under ``torch.no_grad`` when none of its weights train; returns whether it does.

    Why: with gradient checkpointing, transformers and PEFT call ``enable_input_require_grads``, which hooks every
    sub-model's input embeddings -- the vision tower's patch embedding included. Its output then requires a
    gradient, so a frozen vision tower is checkpointed, recomputed and backpropagated on every step (for nothing:
    no weight in it trains), with its per-image attention calls three times over. LoRA on the vision blocks or the
    merger (``lora_vision``, ``lora_merger``) keeps the tower differentiable. The whole tower's forward is wrapped,
    so Qwen3-VL's DeepStack features (computed inside it) are gradient-free too.
    """
    visual = vision_tower(model)
    if any(p.requires_grad for p in visual.parameters()):
        return False
    visual.forward = types.MethodType(_forward_without_grad, visual)  # bound to the module: deepcopy rebinds it
    return True


def _forward_without_grad(module, *args, **kwargs):
    with torch.no_grad():
        return type(module).forward(module, *args, **kwargs)


def should_compile(config: TrainConfig) -> bool:
    """``compile: auto`` is on for CUDA training with Triton (inductor's GPU code generator) and without QLoRA,
    DeepSpeed or FSDP (whose modules and hooks break the graphs); ``true`` is on anywhere (a CPU needs a C++
    compiler)."""
    if config.compile == "auto":
        from torch.utils._triton import has_triton

        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        return (torch.cuda.is_available() and has_triton() and not config.quantization_bit
                and not config.deepspeed and not fsdp)
    return bool(config.compile)


# graphs per compiled function before torch falls back to eager: train and eval modes, grad and no-grad, a short
# last micro-batch each add one (the default, 8, was reached by RMSNorm in a run with evaluation)
RECOMPILE_LIMIT = 32


@torch.library.custom_op("mmdata::dropout_keep_mask", mutates_args=())
def dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Which elements of ``x`` a dropout of rate ``p`` keeps (bool, one byte each). An op of its own so that a
    selective checkpoint can keep the mask alone (:func:`keep_dropout_context`)."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)


@dropout_keep_mask.register_fake
def _dropout_keep_mask_shape(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


class MaskKeptDropout(torch.nn.Module):
    """``nn.Dropout`` whose mask comes from :func:`dropout_keep_mask`: the same distribution and scaling, but a
    selective checkpoint keeps one byte per element (the mask) instead of three (``native_dropout``'s bf16 output
    and its mask), and recomputes the product."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * dropout_keep_mask(x.detach(), self.p) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def keep_dropout_context():
    """A selective-checkpointing context (``torch.utils.checkpoint``'s ``context_fn``): keep every dropout mask
    (:class:`MaskKeptDropout`'s, one byte per element) and every other dropout's outputs, recompute everything else.

    Why: a recomputation that draws dropout masks again must draw the forward's masks. Inside a compiled layer that
    means either inductor's fused random numbers, which do not replay there (gradients differed 2x on a CPU), or
    PyTorch's generator with its state saved and restored around every random op of the graph, which torch runs as
    Python wrappers (14 per layer per step; on a CPU they made a tiny model's step about 20% slower than keeping
    the masks, and most of its Python calls). Keeping LoRA's masks costs one byte per element of each adapted
    projection's input: tokens x (6 x hidden + intermediate) bytes per layer (``native_dropout``'s output and
    mask, kept before, cost three).
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    kept = (torch.ops.aten.native_dropout.default, torch.ops.mmdata.dropout_keep_mask.default)

    def policy(_ctx, op, *_args, **_kwargs):
        return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_checkpointing(model, *, keep_dropout: bool = False) -> None:
    """Gradient checkpointing of every decoder layer, non-reentrant, as HF ``Trainer`` enables it; with
    ``keep_dropout`` selective (:func:`keep_dropout_context`). The trainer calls it itself only for
    ``compile_scope: layers``: ``TrainingArguments`` cannot carry a function (TensorBoard writes them as JSON)."""
    kwargs: dict = {"use_reentrant": False}
    if keep_dropout:
        kwargs["context_fn"] = keep_dropout_context
    unwrap_peft(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def draw_lora_masks_apart(model) -> None:
    """Swap every LoRA dropout for :class:`MaskKeptDropout` (``compile_scope: layers`` does): the checkpoint then
    keeps masks of one byte per element, and a run draws the same masks with and without checkpointing."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        for name, dropout in (dropouts.items() if isinstance(dropouts, torch.nn.ModuleDict) else ()):
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                dropouts[name] = MaskKeptDropout(dropout.p)


def compile_language_layers(model, scope: str = "layers") -> None:
    """``torch.compile`` every decoder layer whole (``scope="layers"``, the default) or its parts (``"parts"``).

    Why: with LoRA on seven projections, a Qwen2-VL decoder layer runs ~100 small kernels (dropout, scaling and
    addition per adapter, RMSNorm, M-RoPE), so an eager step is bound by the CPU launching them, not by the GPU.
    The layers are alike, so one graph serves all of them; the rest of the model (the frozen vision tower, the
    data-dependent image-token scatter) stays eager. ``dynamic=True``: micro-batches differ in length and size,
    and shape-generic graphs avoid recompiling mid-run.

    ``layers``: each decoder layer as one compiled region, checkpoint included (transformers 5 checkpoints inside
    the layer's ``forward``, so the compiler sees the checkpoint and puts the recomputation into the layer's
    backward graph): one forward and one backward region call per layer and step instead of about fifteen. The
    checkpoint must then keep the dropout masks, since inductor's fused random numbers do not replay
    (:func:`enable_checkpointing` with ``keep_dropout``; this scope swaps LoRA's dropouts for
    :class:`MaskKeptDropout`, whose mask is the kept op): gradients equal those without checkpointing (tested).
    Padded and packed rows compile without a graph break (tested; a break inside the checkpoint runs the whole
    layer eager). A step of a tiny 28-layer model on a CPU makes 6x fewer Python calls than with ``parts``;
    on an H200, LaTeX-length rows ran 56-92 samples/s against 28-41 with ``parts`` (other runs of the same
    harness: ``benchmarks/README.md``, runs A-G).

    ``parts``: the layer's children (attention, MLP, norms) compiled apart, under the eager checkpoint, which
    restores the RNG state before recomputing, so the recomputed masks are the forward's (tested).
    """
    _allow_recompiles()
    if scope == "layers":
        draw_lora_masks_apart(model)
    for layer in language_model(model).layers:
        if scope == "layers":
            layer.compile(dynamic=True)
        else:
            for child in layer.children():
                child.compile(dynamic=True)


def compile_vision_blocks(model) -> None:
    """``torch.compile`` each block of the frozen vision tower (the trainer does it when the tower runs without
    grad, :func:`run_frozen_vision_without_grad`, and ``compile_vision`` is on).

    Why: the tower's forward is a fixed share of every step (a Med micro-batch of 16: ~21k patches through 32
    blocks, ~112 ms of a ~530 ms step on an H200, run E), and eager it runs each block's LayerNorms, the fp32
    rotary embedding and QuickGELU as separate memory-bound kernels over the whole (patches x width) tensor. A
    compiled block fuses them around the matrix products. The tower computes its attention boundaries once per
    forward outside the blocks (``cu_seqlens``, ``max_seqlen``), so a block compiles whole, without a graph break
    (tested for the three families); ``dynamic=True`` because the patch count changes with every micro-batch. No
    autograd runs through the frozen tower, so the graphs are inference graphs (no backward to compile).
    """
    _allow_recompiles()
    for block in vision_tower(model).blocks:
        block.compile(dynamic=True)


def _allow_recompiles() -> None:
    """Raise torch's graphs-per-function limit to :data:`RECOMPILE_LIMIT` (never lower a larger one)."""
    import torch._dynamo.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
