"""The catalog larger than one chunk: which steps read it one bounded chunk at a time, watched through a real DAG run.

Every read of the snapshot's ``products.parquet`` and the gate's ``clean.parquet`` made in the Airflow process is
recorded (pandas, pyarrow whole-table reads and pyarrow's batch iterator) with the DAG step that made it. A read of
whole product rows must never exceed ``catalog.chunk_rows``; a read of one or two whole columns (ids, image URIs:
tens of bytes per product) is allowed and listed. The steps that still read the clean catalog whole are pinned
below (CONTRACTS.md, known gap 10), so a change that bounds one of them, or a regression in another, fails here.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 16  # the tiny catalog (96 products) is six chunks
WATCHED = {("extract_catalog", "products.parquet"), ("validate_catalog", "clean.parquet")}
STEP_NAMES = {
    "extract_catalog", "validate_catalog", "label_pairs", "validate_labels", "train_stage1", "train_stage2",
    "backfill_embeddings", "validate_embeddings", "build_index", "evaluate", "register_model", "score_model_uri",
}
# Known gap 10: BM25 candidate generation over every product text, and the report's baselines and category metrics.
STILL_WHOLE = {"label_pairs", "evaluate"}
ID_COLUMNS = 2  # a read of at most this many columns is an id / URI read


def _table_of(source) -> str | None:
    """Which watched table a path (a part file or the table folder) belongs to, else None."""
    if not isinstance(source, (str, Path)):
        return None
    parts = Path(str(source)).parts
    for i in range(len(parts) - 1):
        if (parts[i], parts[i + 1]) in WATCHED:
            return parts[i + 1]
    return None


def _step() -> str:
    """The outermost DAG step (a function of tasks/steps.py, or score_model_uri called by the test) on the stack."""
    for frame in traceback.extract_stack():
        if frame.name in STEP_NAMES and (frame.filename.endswith("tasks/steps.py") or frame.name == "score_model_uri"):
            return frame.name
    return "?"


class ReadRecorder:
    """Patches pandas / pyarrow readers; ``reads`` is [(step, table, rows at once, columns)]."""

    def __init__(self, monkeypatch) -> None:
        import pandas as pd
        import pyarrow.parquet as pq

        self.reads: list[tuple[str, str, int, int]] = []
        real_read_parquet, real_read_table = pd.read_parquet, pq.read_table
        real_init, real_iter = pq.ParquetFile.__init__, pq.ParquetFile.iter_batches
        recorder = self

        def read_parquet(path, *args, **kwargs):
            out = real_read_parquet(path, *args, **kwargs)
            if (table := _table_of(path)) is not None:
                recorder.reads.append((_step(), table, len(out), len(out.columns)))
            return out

        def read_table(source, *args, **kwargs):
            out = real_read_table(source, *args, **kwargs)
            if (table := _table_of(source)) is not None:
                recorder.reads.append((_step(), table, out.num_rows, out.num_columns))
            return out

        def init(self, source, *args, **kwargs):
            real_init(self, source, *args, **kwargs)
            self._watched_table = _table_of(source)

        def iter_batches(self, *args, **kwargs):
            for batch in real_iter(self, *args, **kwargs):
                if getattr(self, "_watched_table", None) is not None:
                    recorder.reads.append((_step(), self._watched_table, batch.num_rows, batch.num_columns))
                yield batch

        monkeypatch.setattr(pd, "read_parquet", read_parquet)
        monkeypatch.setattr(pq, "read_table", read_table)
        monkeypatch.setattr(pq.ParquetFile, "__init__", init)
        monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)

    def whole_row_reads_over_chunk(self) -> dict[str, int]:
        """step -> the most product rows (more than ID_COLUMNS columns) it read at once, where that exceeds CHUNK."""
        worst: dict[str, int] = {}
        for step, _table, rows, columns in self.reads:
            if columns > ID_COLUMNS and rows > CHUNK:
                worst[step] = max(worst.get(step, 0), rows)
        return worst

    def steps(self) -> set[str]:
        return {step for step, *_ in self.reads}


@pytest.fixture(scope="module")
def bounded_run(airflow_db, tiny_config, tmp_path_factory):
    import yaml
    from airflow.dag_processing.dagbag import DagBag

    raw = yaml.safe_load(Path(tiny_config).read_text())
    raw["name"] = "tiny-bounded"
    raw["catalog"] = {**raw["catalog"], "chunk_rows": CHUNK}
    raw["registry"] = {**raw.get("registry", {}), "model_name": "dashclip-bounded-reads"}
    cfg_path = tmp_path_factory.mktemp("bounded") / "bounded.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    monkeypatch = pytest.MonkeyPatch()
    recorder = ReadRecorder(monkeypatch)
    try:
        bag = DagBag(dag_folder=str(ROOT / "dags"))
        assert bag.import_errors == {}
        dr = bag.dags["dashclip_nightly"].test(run_conf={"config_path": str(cfg_path)})
    finally:
        monkeypatch.undo()
    return dr, cfg_path, recorder


def test_no_step_reads_more_than_a_chunk_of_product_rows_but_the_known_ones(bounded_run):
    dr, _cfg, recorder = bounded_run
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    assert all(s == "success" for s in states.values()), states
    # The recorder saw the steps that read the catalog: reads in chunks, from the Airflow process.
    assert {"validate_catalog", "train_stage1", "train_stage2", "backfill_embeddings"} <= recorder.steps()
    assert any(rows == CHUNK for step, _t, rows, cols in recorder.reads if step == "train_stage1" and cols > ID_COLUMNS)
    over = recorder.whole_row_reads_over_chunk()
    assert set(over) == STILL_WHOLE, (
        f"steps reading more than {CHUNK} whole product rows at once: {over}; expected exactly {sorted(STILL_WHOLE)} "
        "(CONTRACTS.md known gap 10: update it and STILL_WHOLE when a step is bounded)")


def test_the_champion_is_scored_chunk_by_chunk_as_on_the_whole_frame(bounded_run):
    """register_model scores the current champion on the clean parts read in chunks (a running top-k per query):
    the same figure as on the whole catalog frame, with no read of more than a chunk."""
    import pandas as pd

    from dashclip_core.config import PipelineConfig
    from dashclip_core.evaluation.pyfunc_scoring import score_model_uri
    from dashclip_core.evaluation.report import eval_judgments
    from tasks.common import run_paths

    dr, cfg_path, _ = bounded_run
    cfg = PipelineConfig.from_file(cfg_path)
    paths = run_paths(cfg, dr.run_id)
    clean = paths.local("validate_catalog") / "clean.parquet"
    judgments = eval_judgments(pd.read_parquet(paths.local("label_pairs") / "labels.parquet"))
    uri = f"models:/{cfg.registry.model_name}@champion"
    whole = score_model_uri(uri, cfg, pd.read_parquet(clean), judgments, "ndcg@10")
    monkeypatch = pytest.MonkeyPatch()
    recorder = ReadRecorder(monkeypatch)
    try:
        streamed = score_model_uri(uri, cfg, clean, judgments, "ndcg@10")
    finally:
        monkeypatch.undo()
    assert streamed == pytest.approx(whole, abs=1e-6) and 0.0 < streamed <= 1.0
    assert recorder.reads and max(rows for *_, rows, _cols in recorder.reads) <= CHUNK
