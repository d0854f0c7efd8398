"""One thin function per DAG step: read inputs by URI, call dashclip_core, write outputs, return small metadata.

Each function takes the summaries of the upstream steps it reads (their XCom values: the ``uri`` in each
is the handle to that step's published folder, opened with :func:`~tasks.common.step_input` as the typed
view of :mod:`dashclip_core.layout`) and Airflow's ``params`` and ``run_id`` (injected by name from the task
context; pass them yourself outside Airflow). A gate's summary is taken only to run after it.
Heavy libraries are imported inside the functions, never at module level.
"""

from __future__ import annotations

from dashclip_core import layout
from dashclip_core.config import DEFAULT_CONFIG
from dashclip_core.layout import Step
from tasks.common import DAG_ID, fail, mlflow_run, ray_storage, resolve_config, run_paths, run_step, step_input
from tasks.connections import catalog_url, llm_endpoint


def extract_catalog(params: dict | None = None, run_id: str | None = None) -> dict:
    """SQL -> parquet snapshot (products, search log, human labels) with image URIs resolved."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):
        from dashclip_core.catalog.snapshot import extract_snapshot

        return extract_snapshot(cfg, catalog_url(cfg), out)

    return run_step(paths, Step.EXTRACT_CATALOG, body)


def log_data_docs(cfg, paths, step: Step, out) -> str:
    """Log a gate's Data Docs site (already in its staging folder ``out``) to the pipeline's MLflow run under
    ``data_docs/<step>``; the step's ``data_docs`` summary field is the returned index.html path inside the step
    folder. Called in the body, before the step publishes, so a failing gate's docs reach MLflow too."""
    from dashclip_core.registry.mlflow_registry import log_artifact_dir

    docs = layout.GateReport(out)  # every gate's view keeps the site in the same place
    log_artifact_dir(cfg, mlflow_run(cfg, paths.run_id)["run_id"], docs.data_docs, f"{layout.DATA_DOCS}/{step}")
    return docs.data_docs_index.relative_to(docs.dir).as_posix()


def docs_hint(summary: dict) -> str:
    """The failure message's pointer to a gate's Data Docs ("" for a summary published before gates had them)."""
    return f" and the Data Docs {summary['uri']}/{summary['data_docs']}" if summary.get("data_docs") else ""


def validate_catalog(catalog: dict, params: dict | None = None, run_id: str | None = None) -> dict:
    """Great Expectations gate: quarantine bad rows with reasons, keep the rest, stop the DAG if too many are bad."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):
        import pandas as pd

        from dashclip_core.storage.images import ImagePolicy
        from dashclip_core.validation.catalog_gate import validate_catalog_parts as gate
        from dashclip_core.validation.expectations import write_data_docs
        from dashclip_core.validation.human_label_gate import validate_human_labels, write_human_label_outputs

        snap = step_input(cfg, catalog, layout.Snapshot)
        # Partition by partition (catalog.chunk_rows rows at a time), images read only under the catalog's folder and
        # catalog.image_roots, within the byte/pixel/time caps; clean and quarantine are written partitioned.
        result = gate(snap.products, cfg.validation, out, cfg.catalog.chunk_rows, images=ImagePolicy.for_pipeline(cfg))
        # Then the human labels (label in {0,1,2}, ids present, known product, split), against the clean products' ids.
        human = validate_human_labels(pd.read_parquet(snap.human_labels), result.all_ids, result.clean_ids, cfg.validation)
        write_human_label_outputs(human, out)
        write_data_docs([*result.validation_results, *human.validation_results], out)  # one site, both suites

        def failing(gate_summary: dict) -> list[str]:
            return [f"{f.get('check')}:{f.get('column')}" for f in gate_summary.get("failing_expectations", [])]

        return {"passed": result.passed and human.passed, "n_clean": result.n_clean, "n_quarantined": result.n_quarantined,
                "n_partitions": result.n_partitions,
                "failing": failing(result.summary), "products_passed": result.passed, "human_labels_passed": human.passed,
                "n_human_labels": len(human.clean), "n_human_labels_quarantined": len(human.quarantine),
                "n_human_labels_bad": human.summary["n_bad"], "human_labels_failing": failing(human.summary),
                "data_docs": log_data_docs(cfg, paths, Step.VALIDATE_CATALOG, out)}

    summary = run_step(paths, Step.VALIDATE_CATALOG, body)
    if not summary["passed"]:
        folder = layout.CatalogGate(".")  # file names only: the uri may be s3://
        problems = []
        if summary.get("products_passed", False) is False:
            problems.append(f"{summary['n_quarantined']} bad product rows ({', '.join(summary['failing'])}); see "
                            f"{summary['uri']}/{folder.quarantine.name} and {folder.report.name}")
        if summary.get("human_labels_passed", True) is False:
            problems.append(f"{summary['n_human_labels_bad']} bad human label rows ({', '.join(summary['human_labels_failing'])}) "
                            f"over validation.max_bad_label_fraction; see {summary['uri']}/{folder.human_labels_quarantine.name} "
                            f"and {folder.human_labels_report.name}")
        fail(f"catalog gate failed: {'; '.join(problems)}{docs_hint(summary)}")
    return summary


def label_pairs(catalog: dict, catalog_gate: dict, params: dict | None = None, run_id: str | None = None) -> dict:
    """Candidate pairs (search log + BM25 + random) graded 0/1/2 by the configured labeler.

    The labeler is scored on held-out human labels first (the teacher quality gate): below
    ``labeling.min_teacher_*`` the DAG stops here, before a candidate is paid for, with the report in this
    step's folder and in MLflow. Then the candidates stream through the label cache (a re-run pays
    nothing twice), the budget (stops the step cleanly; labels so far stay cached and stored) and the
    label store under ``<cache>/labels``.
    """
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)
    lc = cfg.labeling

    def body(out):
        import pandas as pd

        from dashclip_core.labeling.errors import QualityGateError
        from dashclip_core.labeling.quality import TEACHER_METRICS
        from dashclip_core.labeling.step import run_labeling
        from dashclip_core.registry.mlflow_registry import log_artifact_dir, log_metrics

        gate = step_input(cfg, catalog_gate, layout.CatalogGate)
        products = pd.read_parquet(gate.clean)
        if not gate.human_labels.exists():
            raise FileNotFoundError(f"{catalog_gate['uri']} has no {gate.human_labels.name}: it was published before the human "
                                    "label gate existed; start a new run")
        human = pd.read_parquet(gate.human_labels)  # the human label gate's clean rows, never the raw snapshot's
        snap = step_input(cfg, catalog, layout.Snapshot)
        mlflow_run_id = mlflow_run(cfg, paths.run_id)["run_id"]

        def log_teacher(quality: dict) -> None:  # before the gate: a stopped step still leaves its teacher report in MLflow
            log_artifact_dir(cfg, mlflow_run_id, out, "labeling")
            log_metrics(cfg, mlflow_run_id, {f"teacher/{k}": quality[k] for k in TEACHER_METRICS})

        try:
            outcome = run_labeling(cfg, products, pd.read_parquet(snap.search_log), human, out,
                                   endpoint=llm_endpoint(lc), on_teacher_scored=log_teacher)
        except QualityGateError as exc:  # publish the folder with the report, then fail below
            return {"passed": False, "message": str(exc), "labeler_id": exc.report["labeler_id"],
                    **{f"teacher_{k}": exc.report[k] for k in TEACHER_METRICS}}
        log_metrics(cfg, mlflow_run_id, outcome.metrics())
        return {"passed": True, **outcome.summary()}

    from dashclip_core.labeling.errors import DryRunEstimate, LabelingError, StoppedByBudget
    from dashclip_core.labeling.openai_backend import AuthenticationError

    try:
        summary = run_step(paths, Step.LABEL_PAIRS, body)
    except AuthenticationError as exc:  # every pair would fail the same way: stop without retries
        fail(f"label_pairs: the LLM API rejected the credentials ({exc}); fix the Airflow connection "
             f"{lc.llm_connection_id!r} or $OPENAI_API_KEY")
    except DryRunEstimate as exc:
        fail(f"labeling.dry_run: {exc.estimate}. Nothing was labelled; set labeling.dry_run false (DAG param "
             "labeling_dry_run) to label")
    except StoppedByBudget as exc:  # this attempt publishes nothing; a retry starts from the cache
        fail(f"label_pairs {exc}")
    except LabelingError as exc:  # held-out scoring over budget, too many failed pairs
        fail(f"label_pairs: {exc}")
    if not summary.get("passed", True):
        fail(f"{summary['message']}; the report is in {summary['uri']}/{layout.Labels('.').teacher_quality.name} and in MLflow under labeling/")
    return summary


def validate_labels(labels: dict, params: dict | None = None, run_id: str | None = None) -> dict:
    """Gate: label domain, class balance bounds (the teacher was gated in label_pairs, before it labelled)."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):
        import pandas as pd

        from dashclip_core.validation.label_gate import validate_labels as gate
        from dashclip_core.validation.label_gate import write_label_gate_report

        src = step_input(cfg, labels, layout.Labels)
        result = gate(pd.read_parquet(src.labels), cfg.labeling)
        write_label_gate_report(result, out)
        return {"passed": result.passed, "failures": result.summary.get("failures", []),
                "data_docs": log_data_docs(cfg, paths, Step.VALIDATE_LABELS, out)}

    summary = run_step(paths, Step.VALIDATE_LABELS, body)
    if not summary["passed"]:
        fail(f"label gate failed: {'; '.join(summary['failures'])}; see {summary['uri']}/{layout.GATE_REPORT}{docs_hint(summary)}")
    return summary


def train_stage1(catalog_gate: dict, labels_gate: dict, params: dict | None = None, run_id: str | None = None) -> dict:
    """Ray TorchTrainer: BLIP-style product encoder with ITC + ITM; checkpoint every epoch.

    The summary's ``image_stem`` is the run's frozen-stem store (scratch beside Ray's checkpoints, not a
    step output): stage 2, the backfill and evaluate reuse it when it matches their model."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):

        from dashclip_core.registry.mlflow_registry import log_metrics
        from dashclip_core.training.stage1 import train_stage1 as fit

        products = step_input(cfg, catalog_gate, layout.CatalogGate).clean  # read in catalog.chunk_rows chunks, never whole
        run = mlflow_run(cfg, paths.run_id)
        storage = ray_storage(cfg, paths)
        info = fit(cfg, products, out, storage, "stage1", run)
        log_metrics(cfg, run["run_id"], {f"stage1/{k}": v for k, v in info.items()})
        return {**info, "image_stem": str(storage / layout.IMAGE_STEM)}

    return run_step(paths, Step.TRAIN_STAGE1, body)


def train_stage2(catalog_gate: dict, labels: dict, stage1: dict, params: dict | None = None, run_id: str | None = None) -> dict:
    """Ray TorchTrainer: query encoder into the frozen product space with the QCC loss."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):
        import pandas as pd

        from dashclip_core.registry.mlflow_registry import log_metrics
        from dashclip_core.storage.partitions import select_rows
        from dashclip_core.training.stage2 import train_stage2 as fit

        graded = pd.read_parquet(step_input(cfg, labels, layout.Labels).labels)
        labelled = set(graded["product_id"])  # the anchors: the labelled products, read chunk by chunk, not the catalog
        products = select_rows(step_input(cfg, catalog_gate, layout.CatalogGate).clean, cfg.catalog.chunk_rows,
                               lambda chunk: chunk["product_id"].isin(labelled))
        run = mlflow_run(cfg, paths.run_id)
        product_encoder = step_input(cfg, stage1, layout.Stage1).product_encoder
        info = fit(cfg, products, graded, product_encoder, out, ray_storage(cfg, paths), "stage2", run)
        log_metrics(cfg, run["run_id"], {f"stage2/{k}": v for k, v in info.items()})
        return info

    return run_step(paths, Step.TRAIN_STAGE2, body)


def backfill_embeddings(catalog_gate: dict, stage1: dict, params: dict | None = None, run_id: str | None = None) -> dict:
    """Ray Data: product embeddings for the whole validated snapshot -> embeddings.parquet/ (parts), streamed in
    bounded chunks; unchanged products under an unchanged model are carried over from the embedding store."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):
        from dashclip_core.backfill.embed import backfill_embeddings as backfill

        products = step_input(cfg, catalog_gate, layout.CatalogGate).clean  # read in catalog.chunk_rows chunks, never whole
        stem = stage1.get("image_stem")  # the frozen image stem stage 1 computed (used when it matches the model)
        return backfill(cfg, products, step_input(cfg, stage1, layout.Stage1).product_encoder, layout.Embeddings(out).embeddings,
                        stem_path=stem)

    return run_step(paths, Step.BACKFILL_EMBEDDINGS, body)


def validate_embeddings(catalog_gate: dict, embeddings: dict, params: dict | None = None, run_id: str | None = None) -> dict:
    """Gate: dimension, finite values, unit norm, one row per product."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):

        from dashclip_core.storage.partitions import read_column
        from dashclip_core.validation.embedding_gate import validate_embeddings as gate
        from dashclip_core.validation.embedding_gate import write_embedding_gate_report

        ids = read_column(step_input(cfg, catalog_gate, layout.CatalogGate).clean, "product_id")
        result = gate(step_input(cfg, embeddings, layout.Embeddings).embeddings, ids, cfg.model.embed_dim,
                      chunk_rows=cfg.catalog.chunk_rows)
        write_embedding_gate_report(result, out)
        return {"passed": result.passed, "failing": [f"{f.get('check')}:{f.get('column')}" for f in result.summary.get("failing_expectations", [])],
                "data_docs": log_data_docs(cfg, paths, Step.VALIDATE_EMBEDDINGS, out)}

    summary = run_step(paths, Step.VALIDATE_EMBEDDINGS, body)
    if not summary["passed"]:
        fail(f"embedding gate failed: {', '.join(summary['failing'])}; see {summary['uri']}/{layout.GATE_REPORT}{docs_hint(summary)}")
    return summary


def build_index(embeddings: dict, embeddings_gate: dict, labels: dict, stage2: dict, params: dict | None = None,
                run_id: str | None = None) -> dict:
    """FAISS index (``index.factory``; ``auto`` picks Flat or the ANN family by catalog size) + id map, and the
    recall gate: recall@10 against exact search on real queries below ``index.min_recall_at_10`` publishes the
    index and its figures, then stops the DAG before evaluate and register_model."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):
        import pandas as pd

        from dashclip_core.evaluation.report import trained_query_embeddings
        from dashclip_core.index.faiss_index import build_index_from_table, recall_at_k_vs_exact_table

        table = step_input(cfg, embeddings, layout.Embeddings).embeddings  # read in chunks: the index is the one copy
        index = build_index_from_table(table, cfg.index, cfg.catalog.chunk_rows)
        index.save(out)
        graded = pd.read_parquet(step_input(cfg, labels, layout.Labels).labels, columns=["query"])
        queries = sorted(graded["query"].unique())[: cfg.index.recall_queries]
        q = trained_query_embeddings(step_input(cfg, stage2, layout.Stage2).query_encoder, cfg, queries)
        recall = recall_at_k_vs_exact_table(index, table, q, k=10, chunk_rows=cfg.catalog.chunk_rows)
        return {"factory": index.factory, "ntotal": index.ntotal, "dim": index.dim, "recall@10_vs_exact": recall,
                "n_recall_queries": len(queries), "min_recall_at_10": cfg.index.min_recall_at_10,
                "passed": bool(recall >= cfg.index.min_recall_at_10)}

    summary = run_step(paths, Step.BUILD_INDEX, body)
    if not summary.get("passed", True):
        fail(f"index recall gate failed: recall@10 against exact search {summary['recall@10_vs_exact']:.3f} < "
             f"index.min_recall_at_10 {summary['min_recall_at_10']:g} ({summary['factory']}, {summary['ntotal']} products, "
             f"{summary['n_recall_queries']} queries); raise index.ef_search / index.nprobe or pick another index.factory. "
             f"Index in {summary['uri']}")
    return summary


def evaluate(catalog_gate: dict, labels: dict, embeddings: dict, stage1: dict, stage2: dict, index: dict,
             params: dict | None = None, run_id: str | None = None) -> dict:
    """NDCG@10, Recall@10/50 on held-out queries, ANN-only and ITM re-ranked, vs BM25 and the untrained
    encoders; category and zero-shot accuracy. Writes report.json, the per-photo zero-shot predictions
    and plots/*.png; logs the metrics, the report (artifacts ``evaluation/``) and the plots (``plots/``)."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):
        import pandas as pd

        from dashclip_core.backfill.embed import read_embeddings
        from dashclip_core.evaluation.plots import write_evaluation_plots
        from dashclip_core.evaluation.report import run_evaluation
        from dashclip_core.models.image_stem import StemStore
        from dashclip_core.registry.mlflow_registry import client, log_artifact_dir, log_metrics
        from dashclip_core.storage import write_json
        from dashclip_core.storage.images import ImagePolicy

        products = pd.read_parquet(step_input(cfg, catalog_gate, layout.CatalogGate).clean)
        graded = pd.read_parquet(step_input(cfg, labels, layout.Labels).labels)
        ids, matrix = read_embeddings(step_input(cfg, embeddings, layout.Embeddings).embeddings)
        stem = stage1.get("image_stem")
        stem_store = StemStore.open(stem, cfg.model) if stem else None  # the frozen image stem stage 1 computed
        result = run_evaluation(cfg, products, graded, ids, matrix, step_input(cfg, stage2, layout.Stage2).query_encoder,
                                step_input(cfg, stage1, layout.Stage1).product_encoder, stem_store=stem_store)
        report = result.report
        outputs = layout.Evaluation(out)
        write_json(outputs.report, report)
        result.zero_shot.to_parquet(outputs.zero_shot_predictions, index=False)  # per photo: kept out of the report
        run = mlflow_run(cfg, paths.run_id)
        plots = write_evaluation_plots(result, products, outputs.plots, cfg.evaluation.min_relevant_label, mlflow_run=run,
                                       images=ImagePolicy.for_pipeline(cfg))
        log_metrics(cfg, run["run_id"], {f"eval/{s}/{k}": v for s, m in report["systems"].items() for k, v in m.items() if v is not None})
        mlflow = client(cfg)
        for path in (outputs.report, outputs.zero_shot_predictions):
            mlflow.log_artifact(run["run_id"], str(path), "evaluation")
        log_artifact_dir(cfg, run["run_id"], outputs.plots, "plots")
        return {"systems": report["systems"], "n_eval_queries": report["n_eval_queries"], "plots": sorted(p.name for p in plots)}

    return run_step(paths, Step.EVALUATE, body)


def register_model(catalog: dict, catalog_gate: dict, labels: dict, stage1: dict, stage2: dict, index: dict, evaluation: dict,
                   params: dict | None = None, run_id: str | None = None) -> dict:
    """MLflow pyfunc with both encoders -> registry; alias `challenger`, `champion` if it wins on this eval set."""
    cfg = resolve_config(params)
    paths = run_paths(cfg, run_id)

    def body(out):
        import pandas as pd

        from dashclip_core.evaluation.pyfunc_scoring import score_model_uri
        from dashclip_core.evaluation.report import eval_judgments
        from dashclip_core.registry import mlflow_registry as reg
        from dashclip_core.storage import read_json

        run = mlflow_run(cfg, paths.run_id)
        products = step_input(cfg, catalog_gate, layout.CatalogGate).clean  # scored in catalog.chunk_rows chunks, never whole
        graded = pd.read_parquet(step_input(cfg, labels, layout.Labels).labels)
        report = read_json(step_input(cfg, evaluation, layout.Evaluation).report)
        tags = {
            "dag_id": DAG_ID, "catalog_snapshot": catalog["uri"], "index_uri": index["uri"],
            "report_uri": evaluation["uri"], "config_fingerprint": cfg.fingerprint(), "config_name": cfg.name,
            "config_path": (params or {}).get("config_path") or DEFAULT_CONFIG,
        }
        version, created = reg.register_model(cfg, run["run_id"], paths.run_id, step_input(cfg, stage1, layout.Stage1).product_encoder,
                                              step_input(cfg, stage2, layout.Stage2).query_encoder, tags)
        metric = cfg.registry.promotion_metric
        judgments = eval_judgments(graded)
        decision = reg.promote(cfg, version, float(report["systems"]["dashclip"][metric]),
                               lambda uri: score_model_uri(uri, cfg, products, judgments, metric),
                               holder=f"{DAG_ID}/{paths.run_id}")  # the promotion lock names the run holding it
        return {"model_name": cfg.registry.model_name, "version": version, "created": created, "decision": decision,
                "aliases": decision["aliases"], "mlflow_run_id": run["run_id"]}

    return run_step(paths, Step.REGISTER_MODEL, body)
