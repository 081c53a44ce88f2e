"""What ``mmdata validate`` reports: problems (entry, record, severity, message, fix, code), per-entry summaries,
and the report that bounds how many of each kind it keeps and prints."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal

from ..tokens import TokenBudget

Severity = Literal["error", "warning", "info"]

@dataclass(frozen=True)
class Problem:
    """One finding: which entry and record (0-based, across the entry's files in order), how bad, what and how to fix.

    ``code`` is a short stable kind (``placeholder-count``, ``image-missing``...) for grouping and ``--json`` users.
    """

    entry: str | None
    record: int | None
    severity: Severity
    message: str
    fix: str = ""
    code: str = ""
    file: str | None = None

    def format(self) -> str:
        where = self.entry or "dataset_info.json"
        if self.record is not None:
            where += f" record {self.record}"
        if self.file:
            where += f" ({self.file})"
        text = f"{self.severity:<7} {where}: {self.message}"
        return text + (f"\n        fix: {self.fix}" if self.fix else "")


@dataclass
class EntrySummary:
    """What was checked of one entry."""

    records: int = 0
    skipped: str | None = None
    budget: TokenBudget | None = None


@dataclass
class ValidationReport:
    """All problems of one ``dataset_info.json``; ``ok`` when none is an error."""

    dataset_info: str
    problems: list[Problem] = field(default_factory=list)
    entries: dict[str, EntrySummary] = field(default_factory=dict)
    suppressed: Counter = field(default_factory=Counter)  # (entry, code) -> problems not kept
    max_per_kind: int = 20
    _kept: Counter = field(default_factory=Counter, repr=False)
    _suppressed_severity: dict = field(default_factory=dict, repr=False)

    def add(self, problem: Problem) -> None:
        """Keep the first ``max_per_kind`` problems of each (entry, code); count the rest."""
        key = (problem.entry, problem.code)
        if self._kept[key] < self.max_per_kind:
            self._kept[key] += 1
            self.problems.append(problem)
        else:
            self.suppressed[key] += 1
            self._suppressed_severity[key] = problem.severity

    def count(self, severity: Severity) -> int:
        shown = sum(1 for p in self.problems if p.severity == severity)
        return shown + sum(n for k, n in self.suppressed.items() if self._suppressed_severity.get(k) == severity)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return self.count("error") == 0

    def to_dict(self) -> dict:
        return {
            "dataset_info": self.dataset_info, "ok": self.ok,
            "counts": {s: self.count(s) for s in ("error", "warning", "info")},
            "entries": {n: {"records": e.records, "skipped": e.skipped,
                            "tokens": e.budget.summary() if e.budget and e.budget.count else None}
                        for n, e in self.entries.items()},
            "problems": [asdict(p) for p in self.problems],
            "suppressed": [{"entry": e, "code": c, "count": n} for (e, c), n in self.suppressed.items()],
        }

    def format_text(self) -> str:
        lines = [f"mmdata validate {self.dataset_info}"]
        skipped = [p.entry for p in self.problems if p.code == "skipped"]
        for p in self.problems:
            if p.code not in ("skipped", "tokens"):  # both are summarised below
                lines.append(p.format())
        if skipped:
            lines.append(f"info    {len(skipped)} hub/script entries not checked offline: {', '.join(skipped)}")
        for (entry, code), n in self.suppressed.items():
            lines.append(f"        ... and {n} more {code!r} problem(s) in {entry} (use --json or --max-problems)")
        for name, e in self.entries.items():
            if e.skipped or not e.records:
                continue
            line = f"{name}: {e.records} record(s) checked"
            if e.budget is not None and e.budget.count:
                line += "; " + e.budget.format()
                if e.budget.over:
                    line += f" (set cutoff_len {e.budget.suggested_cutoff()})"
            lines.append(line)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {self.count('error')} error(s), {self.count('warning')} warning(s), "
                     f"{self.count('info')} note(s)")
        return "\n".join(lines)
