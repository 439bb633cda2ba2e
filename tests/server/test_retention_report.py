"""The report's retention section: every kind with its pool membership, the in-pool and
out-of-pool groups, behaviour kept, and the plot."""

from __future__ import annotations

from fedcpt.core.behaviour import AnswerRetention
from fedcpt.core.evaluation import EvalResult
from fedcpt.core.retention import GeneralReport, retention_summary
from fedcpt.server.reports.retention_report import JUDGED_BY, plot_kinds, retention_lines


def _result(losses: list[float], kl: float) -> EvalResult:
    loss = sum(losses) / len(losses)
    return EvalResult(loss, 2.718 ** loss, 0.05, 10 * len(losses), losses, kl)


def _report(shift: float, kl: float, answer_loss: float, exact: float) -> GeneralReport:
    kinds = {"prose": _result([2.0 + shift, 2.2 + shift], kl),
             "legal": _result([3.0 + 2 * shift, 3.1 + 2 * shift], kl)}
    overall = _result([x for r in kinds.values() for x in r.block_losses], kl)
    return GeneralReport(kinds, overall, AnswerRetention(answer_loss, exact, exact, 40,
                                                         (exact == 1.0,)))


def test_retention_section_shows_kinds_groups_and_behaviour(tmp_path):
    base, final = _report(0.0, 0.0, 1.0, 1.0), _report(0.1, 0.3, 1.5, 0.0)
    retention = retention_summary(base, final, ("prose",)).to_dict()
    kinds = {"prose": {"in_pool": True, "sources": ["stdlib:topics"]},
             "legal": {"in_pool": False, "sources": ["licenses:packages"]}}
    text = "\n".join(retention_lines(retention, kinds))
    assert "| prose | yes | stdlib:topics | 2.1000 | 2.2000 | +0.1000 ± 0.0000 | 0.3000 |" in text
    assert "| legal | no | licenses:packages |" in text
    assert "**outside the pool** | | | 3.0500 | 3.2500 | **+0.2000 ± 0.0000**" in text
    assert "loss 1.0000 → 1.5000 (+0.5000), greedy exact match 100% → 0%" in text
    assert JUDGED_BY in text
    plot_kinds(tmp_path / "kinds.png", [0, 1], [{"prose": 2.1, "legal": 3.05},
                                                {"prose": 2.2, "legal": 3.25}], [0.0, 0.3])
    assert (tmp_path / "kinds.png").stat().st_size > 1000
