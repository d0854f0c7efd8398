"""The labeler interface every relevance labeler implements (offline teachers and LLM backends alike).

DashCLIP grades (query, product) pairs 0/1/2 (irrelevant / moderately / highly relevant). A labeler
receives :class:`LabelRequest` items and yields one :class:`LabelResult` per request. A result with
``status == "failed"`` carries no label: a failed pair is recorded as failed, never guessed, and a later
run may retry it. ``labeler_id`` identifies the model *and* the prompt/recipe version, so labels from
different labelers live side by side and a cache never mixes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

LABELS = (0, 1, 2)
# The product fields a labeller sees (a prompt, a teacher's input text), in the order they are shown.
PRODUCT_FIELDS = ("title", "description", "category", "aisle")


@dataclass(frozen=True)
class LabelRequest:
    """One pair to grade, with the product fields a labelling prompt shows."""

    query: str
    product_id: str
    title: str | None = None
    description: str | None = None
    category: str | None = None
    aisle: str | None = None


@dataclass(frozen=True)
class LabelResult:
    """The grade of one :class:`LabelRequest` (``label`` None when ``status`` is "failed")."""

    query: str
    product_id: str
    label: int | None
    status: str  # "ok" | "failed"
    labeler_id: str
    reason: str | None = None  # the LLM's short reason, or why it failed
    input_tokens: int = 0
    output_tokens: int = 0
    cached: bool = False  # served from the label cache (nothing paid)

    def __post_init__(self) -> None:
        if self.status not in ("ok", "failed"):
            raise ValueError(f"LabelResult.status must be 'ok' or 'failed', got {self.status!r}")
        if self.status == "ok" and self.label not in LABELS:
            raise ValueError(f"LabelResult.label must be one of {LABELS} when ok, got {self.label!r}")
        if self.status == "failed" and self.label is not None:
            raise ValueError("a failed LabelResult carries no label")


@runtime_checkable
class Labeler(Protocol):
    """Grades pairs. Implementations: the offline cross-encoder teacher, the OpenAI-compatible HTTP backend."""

    labeler_id: str

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        """One result per request, in any order; never raises for a single bad answer (that pair fails)."""
        ...
