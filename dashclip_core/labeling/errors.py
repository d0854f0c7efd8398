"""Why a labelling step stops: one base class, one subclass per reason, each carrying what explains it.

:func:`~dashclip_core.labeling.step.run_labeling` raises these; the Airflow task turns them into a failed
task (no retries). Each message names the config key to change and the figures that made the step stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dashclip_core.labeling.runner import LabelingSummary


class LabelingError(Exception):
    """The labelling step stopped on purpose (a gate, a budget, a dry run); see the subclass for which."""


class DryRunEstimate(LabelingError):
    """``labeling.dry_run`` is set: the run was only priced, nothing was fitted, sent or written.

    Attributes:
        estimate: what scoring the teacher and labelling the candidates would cost (one readable line).
    """

    def __init__(self, estimate: str) -> None:
        super().__init__(f"labeling.dry_run: {estimate}. Nothing was labelled; set labeling.dry_run false to label")
        self.estimate = estimate


class QualityGateError(LabelingError):
    """The teacher's agreement with held-out human labels is below a threshold (retrying will not help).

    Attributes:
        failures: one "metric value < min_metric threshold" string per failed threshold.
        report: the quality dict that was checked.
    """

    def __init__(self, message: str, failures: list[str], report: dict) -> None:
        super().__init__(message)
        self.failures = failures
        self.report = report


class HoldoutOverBudget(LabelingError):
    """Scoring the teacher on the held-out human labels alone would not fit the budget (nothing was sent).

    Attributes:
        n_held_out: held-out human labels the teacher was to be scored on.
    """

    def __init__(self, n_held_out: int, reason: str) -> None:
        super().__init__(f"scoring the teacher on {n_held_out:,} held-out human labels does not fit the budget "
                         f"({reason}); lower labeling.teacher_holdout_max_pairs or raise the budget")
        self.n_held_out = n_held_out


class StoppedByBudget(LabelingError):
    """The budget ran out while the candidates were labelled; every finished chunk is stored and cached.

    Attributes:
        summary: the streaming run's summary (``message`` says where it stopped and which limit to raise).
    """

    def __init__(self, summary: LabelingSummary) -> None:
        super().__init__(summary.message)
        self.summary = summary


class TooManyFailedPairs(LabelingError):
    """More candidate pairs than ``labeling.max_failed_fraction`` got no label.

    Attributes:
        n_failed: candidate pairs without an ok label.
        n_candidates: candidate pairs of this run.
        store_dir: the label store, whose rows say why each pair failed.
    """

    def __init__(self, n_failed: int, n_candidates: int, labeler_id: str, max_failed_fraction: float,
                 store_dir: Path) -> None:
        super().__init__(f"{n_failed:,} of {n_candidates:,} candidate pairs got no label from {labeler_id} "
                         f"(> labeling.max_failed_fraction {max_failed_fraction}); see the store {store_dir} for the "
                         "reasons. They are not cached: a re-run retries only them")
        self.n_failed = n_failed
        self.n_candidates = n_candidates
        self.store_dir = store_dir
