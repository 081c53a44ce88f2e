"""Text metrics for predictions: exact match, character error rate, BLEU (sacrebleu) and ROUGE-L.

Exact match compares after whitespace normalisation (runs of whitespace collapse to one space, ends stripped),
which is what OCR-style targets such as LaTeX need. CER is the Levenshtein distance over characters divided by the
reference length (normalised edit distance, lower is better). ROUGE-L is the LCS F-measure over tokens: each CJK
character is a token, other text splits at whitespace (one rule for every string: "cab" against "abc" scores 0, "yes
it is" against "yes" 50). Edit distance and LCS are a few lines of dynamic programming, kept here rather than adding
a dependency for them. BLEU is sacrebleu's corpus BLEU with its Chinese tokenizer when the references hold CJK text
(the default one made a whole Chinese answer one token: 0 for a perfect prediction) and effective order (n-gram
orders no answer reaches are left out: a set of right yes/no answers scored 0, having no 4-grams).
"""

from __future__ import annotations

import re

_WIDE = "\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"  # CJK, kana, hangul, fullwidth
_TOKEN = re.compile(f"[{_WIDE}]|[^\\s{_WIDE}]+")
_CJK = re.compile(f"[{_WIDE}]")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute cost 1), O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of tokens."""
    p, r = _tokens(prediction), _tokens(reference)
    if not p or not r:
        return float(p == r)
    previous = [0] * (len(r) + 1)
    for tp in p:
        current = [0]
        for j, tr in enumerate(r, 1):
            current.append(previous[j - 1] + 1 if tp == tr else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def compute_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """``exact_match``, ``cer`` (mean per sample), ``bleu`` (0-100, corpus) and ``rouge_l`` (0-100, mean)."""
    from sacrebleu.metrics import BLEU

    n = len(predictions)
    if n == 0:
        return {"count": 0}
    preds = [normalize_whitespace(p) for p in predictions]
    refs = [normalize_whitespace(r) for r in references]
    exact = sum(p == r for p, r in zip(preds, refs, strict=False)) / n
    cer = sum(edit_distance(p, r) / max(1, len(r)) for p, r in zip(preds, refs, strict=False)) / n
    tokenize = "zh" if any(_CJK.search(r) for r in refs) else "13a"
    bleu = BLEU(tokenize=tokenize, effective_order=True).corpus_score(preds, [refs]).score
    rouge = 100 * sum(rouge_l(p, r) for p, r in zip(preds, refs, strict=False)) / n
    return {"count": n, "exact_match": round(exact, 6), "cer": round(cer, 6), "bleu": round(bleu, 4),
            "rouge_l": round(rouge, 4)}
