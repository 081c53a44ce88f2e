"""Token budget: Qwen2-VL image tokens match transformers' smart_resize, text is counted or honestly estimated."""

import math
import random

import pytest

from mmdata.tokens import (
    DEFAULT_SYSTEM_TOKENS,
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    TURN_OVERHEAD,
    TokenBudget,
    TokenCounter,
    estimate_text_tokens,
    image_tokens,
    lf_image_problem,
    lf_image_size,
    qwen2vl_image_tokens,
    record_tokens,
    smart_resize,
    token_counter,
)


def test_smart_resize_matches_hand_computed_values():
    # (height, width) -> multiples of 28; values worked out by hand from transformers' smart_resize
    assert smart_resize(224, 224) == (224, 224)  # already aligned
    assert smart_resize(100, 300) == (112, 308)  # round(3.57)=4, round(10.7)=11
    assert smart_resize(1000, 2000, max_pixels=28 * 28 * 1280) == (700, 1400)  # floor after scaling down
    assert smart_resize(20, 30) == (56, 84)  # ceil after scaling up to min_pixels
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100)


def test_qwen2vl_image_tokens_are_28x28_blocks():
    assert qwen2vl_image_tokens(224, 224) == 64  # 8 x 8 blocks
    assert qwen2vl_image_tokens(300, 100) == 44  # 308x112 -> 11 x 4
    assert qwen2vl_image_tokens(2000, 1000, max_pixels=28 * 28 * 1280) == 1250  # 1400x700 -> 50 x 25
    assert qwen2vl_image_tokens(30, 20) == 6  # 84x56 -> 3 x 2


def test_llamafactory_resizes_before_the_processor():
    assert lf_image_size(1920, 1080) == (1024, 576)  # down to image_max_pixels = 768*768
    assert image_tokens(1920, 1080) == 777  # 1036x588 -> 37 x 21
    assert image_tokens(1920, 1080, max_pixels=1920 * 1080) == 2691  # no shrink: 1932x1092 -> 69 x 39
    assert lf_image_size(20, 20) == (32, 32)  # up to image_min_pixels = 32*32
    assert lf_image_size(10, 5000) == (28, 5000)  # Qwen2-VL plugin: sides at least 28
    assert image_tokens(10, 5000) == 179


def test_text_estimate_is_labelled_and_plausible():
    assert estimate_text_tokens("Hello world") == 2
    assert estimate_text_tokens("你好世界") == 4  # CJK: one per character (leans high)
    assert estimate_text_tokens("2024") == 4  # Qwen2 splits digits
    assert estimate_text_tokens("") == 0
    counter = token_counter()
    assert not counter.exact and "estimated" in counter.label


def test_record_tokens_count_template_system_and_images():
    turns = [("user", "<image>Describe"), ("assistant", "A cat.")]
    # default system (6 + 5) + user "Describe" (2 + 5) + assistant "A cat." (3 + 5) + image 64 + vision start/end 2
    assert record_tokens(turns, [(224, 224)]) == DEFAULT_SYSTEM_TOKENS + TURN_OVERHEAD + 7 + 8 + 66
    with_system = [("system", "Be brief.")] + turns
    assert record_tokens(with_system, [(224, 224)]) == (3 + TURN_OVERHEAD) + 7 + 8 + 66


class WordTokenizer:
    """Anything with ``encode`` works as a tokenizer."""

    name_or_path = "words"

    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_a_given_tokenizer_counts_exactly():
    counter = token_counter(WordTokenizer())
    assert counter.exact and "words" in counter.label
    assert counter.text("one two three") == 3


@pytest.mark.slow
def test_tokenizer_path_loads_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "cat": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    counter = token_counter(str(tmp_path))
    assert counter.exact and counter.text("a cat a") == 3


def test_budget_counts_over_cutoff_and_suggests_the_p99_cutoff():
    budget = TokenBudget(cutoff_len=90, bucket=1)
    for n in range(1, 101):
        budget.add_length(n, record=n)
    assert budget.count == 100 and budget.over == 10 and budget.max_tokens == 100
    assert budget.over_examples == [91, 92, 93, 94, 95]
    assert budget.percentile(0.99) == 99
    assert budget.suggested_cutoff() == 128  # rounded up to a multiple of 64
    text = budget.format()
    assert "10 of 100 records (10.0%) over cutoff_len 90" in text and "estimated" in text


def test_budget_memory_is_a_bounded_histogram():
    budget = TokenBudget(cutoff_len=4096)
    for i in range(50_000):
        budget.add_length(100 + i % 3000)
    assert len(budget._hist) <= 3100 // budget.bucket + 1
    assert budget.percentile(0.99) >= int(0.99 * 3000) + 100 - budget.bucket


def test_budget_add_feeds_records_and_merges():
    a, b = TokenBudget(cutoff_len=50), TokenBudget(cutoff_len=50)
    turns = [("user", "<image>What is this?"), ("assistant", "A red square.")]
    tokens = a.add(turns, [(224, 224)], record=0)
    assert tokens > 50 and a.over == 1 and a.over_examples == [0]
    b.add([("user", "hi"), ("assistant", "hello")])
    a.merge(b)
    assert a.count == 2 and a.over == 1
    assert a.summary()["exact"] is False


def test_counter_uses_image_settings():
    small = TokenCounter(image_max_pixels=224 * 224)
    assert small.image(1920, 1080) < TokenCounter().image(1920, 1080)


# LLaMA-Factory 0.9.5, src/llamafactory/data/mm_plugin.py: MMPluginMixin._preprocess_image then
# Qwen2VLPlugin._preprocess_image, transcribed on a stand-in image whose resize fails like PIL's on a 0-pixel side.
class _Image:
    def __init__(self, width, height):
        self.width, self.height = width, height

    def resize(self, size):
        if size[0] <= 0 or size[1] <= 0:
            raise ValueError("height and width must be > 0")  # PIL's message
        return _Image(*size)


def llamafactory_preprocess(image, image_max_pixels, image_min_pixels):
    if (image.width * image.height) > image_max_pixels:
        resize_factor = math.sqrt(image_max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * resize_factor), int(image.height * resize_factor)))
    if (image.width * image.height) < image_min_pixels:
        resize_factor = math.sqrt(image_min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * resize_factor), int(image.height * resize_factor)))
    if min(image.width, image.height) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180))
    return image


SIDES = [1, 2, 3, 27, 28, 29, 199, 201, 3000, 60000, 600_000]


def random_sizes(n=20000, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        yield (rng.choice(SIDES + [rng.randint(1, 5000), rng.randint(1, 10**6)]),
               rng.choice(SIDES + [rng.randint(1, 5000), rng.randint(1, 10**6)]),
               rng.choice([IMAGE_MAX_PIXELS, 1000, 1024, 40000, rng.randint(1, 10**6)]),
               rng.choice([IMAGE_MIN_PIXELS, 1, 56 * 56]))


def test_lf_image_size_is_llamafactory_and_lf_image_problem_predicts_its_failures():
    failures = 0
    for w, h, max_pixels, min_pixels in random_sizes():
        try:
            image = llamafactory_preprocess(_Image(w, h), max_pixels, min_pixels)
        except ValueError:
            failures += 1
            assert lf_image_problem(w, h, max_pixels) is not None, (w, h, max_pixels)
        else:
            assert lf_image_problem(w, h, max_pixels) is None, (w, h, max_pixels)
            assert lf_image_size(w, h, max_pixels, min_pixels) == (image.width, image.height), (w, h, max_pixels)
    assert failures > 100  # the generator does reach LLaMA-Factory's failure case


def test_image_tokens_are_total_over_positive_sizes_and_the_processor_never_raises():
    """The known crash: 3000x2 converted into max_pixels 1000 came out 1224x1, and counting it at image_max_pixels
    1000 divided by zero. Counting never raises now; a side LLaMA-Factory would shrink to 0 counts as 1 pixel."""
    assert lf_image_size(1224, 1, 1000) == (1106, 28)
    assert lf_image_problem(1224, 1, 1000) and "0 pixels" in lf_image_problem(1224, 1, 1000)
    assert image_tokens(1224, 1, 1000) == 40
    assert lf_image_size(60000, 1) == (5040, 28)  # sides to 28, then the 180:1 crop of the plugin
    assert image_tokens(60000, 1) == 180
    for w, h, max_pixels, min_pixels in random_sizes(5000, seed=1):
        assert image_tokens(w, h, max_pixels, min_pixels) >= 1
        width, height = lf_image_size(w, h, max_pixels, min_pixels)
        smart_resize(height, width)  # raises past 200:1, as transformers does: never after LLaMA-Factory's fixes
    with pytest.raises(ValueError, match="positive"):
        image_tokens(0, 10)


@pytest.mark.slow  # importing transformers takes seconds
def test_smart_resize_is_transformers_line_for_line():
    transformers_qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    for w, h, max_pixels, _ in random_sizes(3000, seed=2):
        if max(w, h) / min(w, h) > 200:
            continue
        assert smart_resize(h, w, max_pixels=max(max_pixels, 3136)) == transformers_qwen.smart_resize(
            h, w, 28, 56 * 56, max(max_pixels, 3136))
