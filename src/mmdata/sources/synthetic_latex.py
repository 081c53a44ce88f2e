"""Synthetic LaTeX OCR pairs: formulas rendered to PNG offline with matplotlib mathtext.

Powers the built-in ``latex_ocr_sample`` recipe (the offline demo) and gives tests real images with known text.
Rendering is deterministic for a given matplotlib version (PNG metadata stripped), so reruns are byte-identical.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

from ..errors import SourceError
from . import Source, SourceParams, register_source


class SyntheticLatexParams(SourceParams):
    formulas: list[str] | None = None
    formulas_file: str | None = None
    count: int | None = None
    fontsize: int = 20
    dpi: int = 100


@register_source("synthetic_latex")
class SyntheticLatexSource(Source):
    Params = SyntheticLatexParams
    default_fields = {"image": "image", "answer": "text", "id": "id"}

    def _formulas(self) -> list[str]:
        formulas = list(self.params.formulas or [])
        if self.params.formulas_file:
            path = self.resolve(self.params.formulas_file)
            if not path.is_file():
                raise SourceError(f"{path}: formulas file not found")
            formulas += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not formulas:
            raise SourceError("synthetic_latex needs source.formulas (a list) or source.formulas_file")
        return formulas

    def rows(self) -> Iterator[dict]:
        formulas = self._formulas()
        count = self.params.count or len(formulas)
        for i in range(count):
            formula = formulas[i % len(formulas)]
            yield {"id": f"latex-{i:06d}", "image": render_formula(formula, self.params.fontsize, self.params.dpi),
                   "text": formula}

    def num_rows(self) -> int:
        return self.params.count or len(self._formulas())

    def fingerprint(self) -> str:
        import matplotlib

        digest = hashlib.sha256("\n".join(self._formulas()).encode()).hexdigest()
        return f"{digest}|{self.params.model_dump_json()}|matplotlib {matplotlib.__version__}"


def render_formula(formula: str, fontsize: int = 20, dpi: int = 100) -> bytes:
    """PNG bytes of ``$formula$`` on white, tightly cropped."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(0.01, 0.01))
    fig.text(0, 0, f"${formula}$", fontsize=fontsize)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1, facecolor="white",
                    metadata={"Software": None})
    except ValueError as e:
        raise SourceError(f"cannot render formula {formula!r} with mathtext: {e}") from None
    return buf.getvalue()
