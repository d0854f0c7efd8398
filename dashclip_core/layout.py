"""Where every step of a pipeline run keeps its outputs: step names, file names, encoder folders.

This module is the one place that knows them (CONTRACTS.md describes what is inside each file).
A run lives under ``<storage root>/<dag id>/<run key>/`` (:class:`~dashclip_core.storage.RunPaths`);
each step publishes one folder ``<step>/`` there, holding its files and ``summary.json``::

    extract_catalog/      products.parquet  search_log.parquet  human_labels.parquet
    validate_catalog/     clean.parquet  quarantine.parquet  report.json  data_docs/
                          human_labels.parquet  human_labels_quarantine.parquet  human_labels_report.json
    label_pairs/          labels.parquet  teacher_report.json  teacher_quality.json  teacher_confusion.png  labeling_summary.json
    validate_labels/      report.json  data_docs/
    train_stage1/         product_encoder/  stage1_pairs.parquet  metrics.json
    train_stage2/         query_encoder/  stage2_examples.parquet  hard_negatives.json  metrics.json
    backfill_embeddings/  embeddings.parquet
    validate_embeddings/  report.json  data_docs/
    build_index/          index.faiss  ids.parquet  meta.json
    evaluate/             report.json  zero_shot_predictions.parquet  plots/
    register_model/       (summary only: the MLflow version and its aliases)

Readers never build these paths by hand: they take a step's folder (from the summary Airflow
passes downstream, or from :class:`RunLayout`) and ask the typed view of that step for a file.

Standard library only: DAG files and ``tasks/`` import it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dashclip_core.storage import RunPaths

DAG_ID = "dashclip_nightly"
SUMMARY = "summary.json"  # every step folder: the small metadata the step returned (also its XCom value)


class Step(StrEnum):
    """The pipeline's steps, in DAG order; each value is also the step's folder name and Airflow task id."""

    EXTRACT_CATALOG = "extract_catalog"
    VALIDATE_CATALOG = "validate_catalog"
    LABEL_PAIRS = "label_pairs"
    VALIDATE_LABELS = "validate_labels"
    TRAIN_STAGE1 = "train_stage1"
    TRAIN_STAGE2 = "train_stage2"
    BACKFILL_EMBEDDINGS = "backfill_embeddings"
    VALIDATE_EMBEDDINGS = "validate_embeddings"
    BUILD_INDEX = "build_index"
    EVALUATE = "evaluate"
    REGISTER_MODEL = "register_model"


# Folders inside step outputs (and the names of the pyfunc's artifacts, which hold the same folders).
PRODUCT_ENCODER = "product_encoder"
QUERY_ENCODER = "query_encoder"
IMAGE_STEM = "image_stem"  # file stem of a run's frozen-stem store (models/image_stem.py), beside Ray's checkpoints
GATE_REPORT = "report.json"  # every gate's report
DATA_DOCS = "data_docs"  # every gate's Great Expectations Data Docs site (validation/expectations.py write_data_docs)
DATA_DOCS_INDEX = "index.html"  # the site's entry page, inside DATA_DOCS


@dataclass(frozen=True)
class StepFolder:
    """A published step folder on local disk (an S3 output is localised first)."""

    dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))

    @property
    def summary(self) -> Path:
        return self.dir / SUMMARY


@dataclass(frozen=True)
class Snapshot(StepFolder):
    """``extract_catalog``: the catalog snapshot (CONTRACTS.md: products, search_log, human_labels)."""

    @property
    def products(self) -> Path:
        return self.dir / "products.parquet"

    @property
    def search_log(self) -> Path:
        return self.dir / "search_log.parquet"

    @property
    def human_labels(self) -> Path:
        return self.dir / "human_labels.parquet"


@dataclass(frozen=True)
class GateReport(StepFolder):
    """A gate's folder (``validate_labels``, ``validate_embeddings``; ``CatalogGate`` adds its row sets): the
    gate's report and its GX Data Docs site."""

    @property
    def report(self) -> Path:
        return self.dir / GATE_REPORT

    @property
    def data_docs(self) -> Path:
        """The GX Data Docs site of this gate's validation (``data_docs_index`` is its entry page)."""
        return self.dir / DATA_DOCS

    @property
    def data_docs_index(self) -> Path:
        return self.data_docs / DATA_DOCS_INDEX


@dataclass(frozen=True)
class CatalogGate(GateReport):
    """``validate_catalog``: the rows that passed (``clean``), the rows that did not, with reasons."""

    @property
    def clean(self) -> Path:
        return self.dir / "clean.parquet"

    @property
    def quarantine(self) -> Path:
        return self.dir / "quarantine.parquet"

    @property
    def human_labels(self) -> Path:
        """The human labels that passed the human label gate (``label_pairs`` reads these, not the snapshot's)."""
        return self.dir / "human_labels.parquet"

    @property
    def human_labels_quarantine(self) -> Path:
        """The human label rows the gate dropped: row, field and reason each."""
        return self.dir / "human_labels_quarantine.parquet"

    @property
    def human_labels_report(self) -> Path:
        return self.dir / "human_labels_report.json"

@dataclass(frozen=True)
class Labels(StepFolder):
    """``label_pairs``: human + teacher labels, and how good the teacher was."""

    @property
    def labels(self) -> Path:
        return self.dir / "labels.parquet"

    @property
    def teacher_report(self) -> Path:
        return self.dir / "teacher_report.json"

    @property
    def teacher_quality(self) -> Path:
        return self.dir / "teacher_quality.json"

    @property
    def teacher_confusion_png(self) -> Path:
        return self.dir / "teacher_confusion.png"

    @property
    def labeling_summary(self) -> Path:
        return self.dir / "labeling_summary.json"


@dataclass(frozen=True)
class Stage1(StepFolder):
    """``train_stage1``: the product encoder (``models/encoders.py`` save format)."""

    @property
    def product_encoder(self) -> Path:
        return self.dir / PRODUCT_ENCODER

    @property
    def pairs(self) -> Path:
        return self.dir / "stage1_pairs.parquet"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"


@dataclass(frozen=True)
class Stage2(StepFolder):
    """``train_stage2``: the query encoder, in the product encoder's space."""

    @property
    def query_encoder(self) -> Path:
        return self.dir / QUERY_ENCODER

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def examples(self) -> Path:
        return self.dir / "stage2_examples.parquet"

    @property
    def hard_negatives(self) -> Path:
        return self.dir / "hard_negatives.json"

    @property
    def anchor_product_emb(self) -> Path:
        return self.dir / "anchor_product_emb.npy"


@dataclass(frozen=True)
class Embeddings(StepFolder):
    """``backfill_embeddings``: one unit vector per validated product."""

    @property
    def embeddings(self) -> Path:
        return self.dir / "embeddings.parquet"


@dataclass(frozen=True)
class Index(StepFolder):
    """``build_index``: a FAISS index with its product-id map (``index/faiss_index.py`` reads and writes it)."""

    @property
    def index(self) -> Path:
        return self.dir / "index.faiss"

    @property
    def ids(self) -> Path:
        return self.dir / "ids.parquet"

    @property
    def meta(self) -> Path:
        return self.dir / "meta.json"


@dataclass(frozen=True)
class Evaluation(StepFolder):
    """``evaluate``: the report, per-photo zero-shot predictions and plots."""

    @property
    def report(self) -> Path:
        return self.dir / "report.json"

    @property
    def zero_shot_predictions(self) -> Path:
        return self.dir / "zero_shot_predictions.parquet"

    @property
    def plots(self) -> Path:
        return self.dir / "plots"


@dataclass(frozen=True)
class Registration(StepFolder):
    """``register_model``: only the summary (model name, version, aliases)."""


VIEWS: dict[Step, type[StepFolder]] = {
    Step.EXTRACT_CATALOG: Snapshot,
    Step.VALIDATE_CATALOG: CatalogGate,
    Step.LABEL_PAIRS: Labels,
    Step.VALIDATE_LABELS: GateReport,
    Step.TRAIN_STAGE1: Stage1,
    Step.TRAIN_STAGE2: Stage2,
    Step.BACKFILL_EMBEDDINGS: Embeddings,
    Step.VALIDATE_EMBEDDINGS: GateReport,
    Step.BUILD_INDEX: Index,
    Step.EVALUATE: Evaluation,
    Step.REGISTER_MODEL: Registration,
}


class RunLayout:
    """Typed access to one run's published step outputs, over :class:`~dashclip_core.storage.RunPaths`.

    For readers that start from a run (the CLI, ``dashclip evaluate --run-dir``); tasks start from the
    step summary their upstream returned (:func:`step_uri` of it) instead.
    """

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths

    def uri(self, step: Step) -> str:
        return self.paths.uri(step.value)

    def is_done(self, step: Step) -> bool:
        return self.paths.is_done(step.value)

    def folder(self, step: Step) -> StepFolder:
        """The localised published folder of ``step`` as its typed view (FileNotFoundError when unpublished)."""
        return VIEWS[step](self.paths.local(step.value))

    def snapshot(self) -> Snapshot:
        return self.folder(Step.EXTRACT_CATALOG)  # type: ignore[return-value]

    def catalog_gate(self) -> CatalogGate:
        return self.folder(Step.VALIDATE_CATALOG)  # type: ignore[return-value]

    def labels(self) -> Labels:
        return self.folder(Step.LABEL_PAIRS)  # type: ignore[return-value]

    def stage1(self) -> Stage1:
        return self.folder(Step.TRAIN_STAGE1)  # type: ignore[return-value]

    def stage2(self) -> Stage2:
        return self.folder(Step.TRAIN_STAGE2)  # type: ignore[return-value]

    def embeddings(self) -> Embeddings:
        return self.folder(Step.BACKFILL_EMBEDDINGS)  # type: ignore[return-value]

    def index(self) -> Index:
        return self.folder(Step.BUILD_INDEX)  # type: ignore[return-value]

    def evaluation(self) -> Evaluation:
        return self.folder(Step.EVALUATE)  # type: ignore[return-value]


def run_folder(run_dir: str | Path) -> dict[Step, Path]:
    """The step folders of a local run folder (``<root>/<dag id>/<run key>``), whether published or not."""
    return {step: Path(run_dir) / step.value for step in Step}
