"""The model families the trainer supports (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), as data: one record per ``model_type``.

Why a table and not branches: the three families run the same data path and the same step -- the processor's
chat template, ``<|image_pad|>`` tokens expanded to ``grid_thw.prod() / merge**2``, 3-D M-RoPE positions computed
on the CPU, a vision tower called ``visual``, a decoder reached by ``get_decoder()`` with ``layers`` and a final
``norm`` -- and differ only in names and sizes that this table records (what each was read from is in brackets):

- model class: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
  ``Qwen3VLForConditionalGeneration`` (``models/auto/modeling_auto.py``, image-text-to-text mapping);
- the linear layers of a vision block: Qwen2-VL ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``;
  Qwen2.5-VL ``attn.qkv``, ``attn.proj``, ``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj`` (the same leaf
  names as the language model's MLP, which is why LoRA targets are given to PEFT as full names of modules under
  the decoder, never as leaf names); Qwen3-VL ``attn.qkv``, ``attn.proj``, ``mlp.linear_fc1``, ``mlp.linear_fc2``
  (``Qwen2VLVisionBlock``, ``Qwen2_5_VLVisionBlock``, ``Qwen3VLVisionBlock``);
- the merger: ``visual.merger`` (``mlp.0``/``mlp.2`` in Qwen2/2.5-VL, ``linear_fc1``/``linear_fc2`` in Qwen3-VL)
  and, in Qwen3-VL only, the DeepStack mergers ``visual.deepstack_merger_list.*`` whose outputs are added to the
  first decoder layers' hidden states at the image positions (``Qwen3VLTextModel._deepstack_process``);
- the image processor: patch 14 (28-pixel blocks) in Qwen2/2.5-VL, patch 16 (32-pixel blocks) in Qwen3-VL; both
  are transformers' ``Qwen2VLImageProcessor`` (``smart_resize`` to multiples of ``patch * merge``), bounded by
  ``size: {shortest_edge, longest_edge}`` (pixel areas);
- M-RoPE: for *images* all three ``get_rope_index`` give the same (t, h, w) positions -- Qwen2.5-VL scales the
  temporal index by ``second_per_grid_ts * tokens_per_second`` for videos only, Qwen3-VL splits videos into
  per-frame grids and interleaves the three sections over the rotary frequencies (``mrope_interleaved``, inside
  the model's rotary embedding); so ``data.mrope_positions`` serves all three, and the test compares it with each
  model's own ``get_rope_index``;
- the chat template: Qwen2-VL and Qwen2.5-VL ship the same one (a default system prompt); Qwen3-VL-Instruct has
  none, and tool/``<think>`` tokens in its tokenizer.

Packing (``batching: pack``) is correct for all three: the packed row's text positions restart at 0 per sample
(the attention mask / flash-attention varlen boundaries come from them), vision features and DeepStack features
are concatenated in image order, matching the image tokens' order in the row; the tests check that packed and
padded batches give the same loss and gradients for every family (on CPU, through SDPA's packed-sequence mask;
flash-attention's varlen path reads its boundaries from the same text positions, in all three decoders alike).

``qwen3_vl_moe`` (Qwen3-VL-30B-A3B, 235B-A22B) is the same code path for everything above (its model is
Qwen3-VL's with a sparse MLP), but its experts are fused 3-D parameters (``experts.gate_up_proj``,
``experts.down_proj``), not ``nn.Linear`` layers, so LoRA can adapt only the attention projections there; it is
refused with that explanation rather than trained with a partial adapter the user did not ask for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainError

# Qwen2-VL's chat template, verbatim from Qwen/Qwen2-VL-*-Instruct (chat_template.json / tokenizer_config.json);
# Qwen/Qwen2.5-VL-*-Instruct's chat_template.json is the same text.
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

# Qwen3-VL-Instruct's chat template, verbatim from Qwen/Qwen3-VL-2B-Instruct (chat_template.json): no default system
# prompt, tools in the system turn, tool responses as user turns.
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class Family:
    """What the trainer needs to know about one ``model_type``; see the module docstring for the sources."""

    model_type: str
    name: str
    model_class: str  # transformers class, loaded by name: a missing one means transformers is too old
    min_transformers: str
    vision_block_linears: tuple[str, ...]  # leaf names of the nn.Linear layers in visual.blocks.* (lora_vision)
    mergers: tuple[str, ...]  # children of ``visual`` that map vision features to the decoder (lora_merger)
    chat_template: str  # the Instruct model's template: export's fallback when neither adapter nor base has one


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "4.45",
           ("qkv", "proj", "fc1", "fc2"), ("merger",), QWEN2_VL_CHAT_TEMPLATE),
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "4.49",
           ("qkv", "proj", "gate_proj", "up_proj", "down_proj"), ("merger",), QWEN2_VL_CHAT_TEMPLATE),
    Family("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "4.57",
           ("qkv", "proj", "linear_fc1", "linear_fc2"), ("merger", "deepstack_merger_list"), QWEN3_VL_CHAT_TEMPLATE),
)}

# model types that load but cannot be trained here, with the reason (shown as the error)
REFUSED: dict[str, str] = {
    "qwen3_vl_moe": "Qwen3-VL MoE keeps its experts as fused 3-D parameters (experts.gate_up_proj, "
                    "experts.down_proj), not linear layers, so a LoRA adapter here could only cover the attention "
                    "projections; use a dense Qwen3-VL (2B/4B/8B/32B), or LLaMA-Factory for the MoE models",
}


def family_of(model_type: str, where: str = "") -> Family:
    """The :class:`Family` of ``model_type``; a clear :class:`TrainError` for anything else."""
    prefix = f"{where}: " if where else ""
    if model_type in REFUSED:
        raise TrainError(f"{prefix}model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        names = ", ".join(f"{f.model_type} ({f.name})" for f in FAMILIES.values())
        raise TrainError(f"{prefix}model_type {model_type!r} is not supported; the trainer handles {names}")
    return FAMILIES[model_type]
