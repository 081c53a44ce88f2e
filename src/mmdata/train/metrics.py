"""Text metrics for predictions: exact match, character error rate, BLEU (sacrebleu) and ROUGE-L.

Exact match compares after whitespace normalisation (runs of whitespace collapse to one space, ends stripped),
which is what OCR-style targets such as LaTeX need. CER is the Levenshtein distance over characters divided by the
reference length (normalised edit distance, lower is better). ROUGE-L is the LCS F-measure over whitespace tokens
(characters for text without spaces, e.g. Chinese). Edit distance and LCS are a few lines of dynamic programming,
kept here rather than adding a dependency for them; BLEU is sacrebleu's corpus BLEU.
"""

from __future__ import annotations


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
    words = text.split()
    return words if len(words) > 1 or not text else list(text.replace(" ", ""))


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
    import sacrebleu

    n = len(predictions)
    if n == 0:
        return {"count": 0}
    preds = [normalize_whitespace(p) for p in predictions]
    refs = [normalize_whitespace(r) for r in references]
    exact = sum(p == r for p, r in zip(preds, refs, strict=False)) / n
    cer = sum(edit_distance(p, r) / max(1, len(r)) for p, r in zip(preds, refs, strict=False)) / n
    bleu = sacrebleu.corpus_bleu(preds, [refs]).score
    rouge = 100 * sum(rouge_l(p, r) for p, r in zip(preds, refs, strict=False)) / n
    return {"count": n, "exact_match": round(exact, 6), "cer": round(cer, 6), "bleu": round(bleu, 4),
            "rouge_l": round(rouge, 4)}
