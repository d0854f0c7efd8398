"""End to end with the real Airflow, Ray, MLflow, FAISS and Great Expectations on the tiny config.

One full ``dag.test()`` of dashclip_nightly; then re-running tasks with the same run id must do no
duplicate work and register no second model version; a second DAG run promotes by comparison.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ALL_TASKS = {
    "extract_catalog", "validate_catalog", "label_pairs", "validate_labels", "train_stage1", "train_stage2",
    "backfill_embeddings", "validate_embeddings", "build_index", "evaluate", "register_model",
}


def _dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["dashclip_nightly"]


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


@pytest.fixture(scope="module")
def first_run(airflow_db, tiny_config):
    dr = _dag().test(run_conf={"config_path": str(tiny_config)})
    return dr


def test_every_task_succeeds(first_run):
    states = _states(first_run)
    assert set(states) == ALL_TASKS
    assert all(s == "success" for s in states.values()), states


def test_outputs_model_index_and_report(first_run, tiny_config):
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from dashclip_core.config import PipelineConfig
    from dashclip_core.index.faiss_index import ProductIndex
    from dashclip_core.storage import read_json
    from tasks.common import run_paths

    cfg = PipelineConfig.from_file(tiny_config)
    paths = run_paths(cfg, first_run.run_id)
    for step in ALL_TASKS:
        assert paths.is_done(step), step

    report = read_json(paths.local("evaluate") / "report.json")
    assert set(report["systems"]) == {"dashclip", "dashclip_itm_rerank", "untrained_encoders", "image_backbone_linear_probe", "bm25_titles"}
    assert 0.0 <= report["systems"]["image_backbone_linear_probe"]["probe_fine_top1"] <= 1.0
    assert 0.0 <= report["systems"]["dashclip"]["ndcg@10"] <= 1.0
    for system in ("dashclip", "untrained_encoders"):
        block = report["systems"][system]
        assert 0.0 <= block["zero_shot_fine_top1"] <= 1.0 and block["zero_shot_n_photos"] > 0
        assert block["zero_shot_fine_classes"] == len(pd.read_parquet(paths.local("validate_catalog") / "clean.parquet")["category"].unique())
    for system in ("dashclip", "untrained_encoders", "image_backbone_linear_probe"):  # text -> image over the held-out photos
        block = report["systems"][system]
        assert 0.0 < block["t2i_ndcg@10"] <= 1.0 and 0.0 <= block["t2i_recall@10"] <= 1.0 and block["t2i_n_queries"] > 0
    assert report["n_eval_queries"] > 0
    assert report["n_image_only_products"] > 0
    for system in ("dashclip", "dashclip_itm_rerank", "untrained_encoders", "bm25_titles"):  # image-only products are judged in eval
        assert report["systems"][system]["image_only_recall@50"] is not None, system
    assert report["systems"]["bm25_titles"]["image_only_recall@50"] == 0.0  # BM25 over titles cannot find a product with no title

    client = MlflowClient(cfg.tracking_uri())
    model = client.get_registered_model(cfg.registry.model_name)
    reg = read_json(paths.local("register_model") / "summary.json")
    aliases = {a: str(v) for a, v in model.aliases.items()}
    assert aliases.get("challenger") == reg["version"]
    assert aliases.get("champion") == reg["version"]  # first model: no champion to beat
    version = client.get_model_version(cfg.registry.model_name, reg["version"])
    assert version.tags["airflow_run_id"] == first_run.run_id
    assert version.tags["catalog_snapshot"] == paths.uri("extract_catalog")

    # The evaluate step's plots are in its folder and are artifacts of the pipeline's MLflow run.
    plots = {"training_curves.png", "zero_shot_confusion_worst.png", "query_top5_ann.png", "query_top5_itm_rerank.png"}
    assert {p.name for p in (paths.local("evaluate") / "plots").iterdir()} == plots
    logged = {Path(a.path).name: a.file_size for a in client.list_artifacts(reg["mlflow_run_id"], "plots")}
    assert set(logged) == plots and all(size > 0 for size in logged.values())
    assert {Path(a.path).name for a in client.list_artifacts(reg["mlflow_run_id"], "evaluation")} == {"report.json", "zero_shot_predictions.parquet"}

    # The index answers a query embedded by the registered model.
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri())
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    q = pyfunc.predict(pd.DataFrame({"query_id": ["a"], "query": ["oat milk"]}))
    index = ProductIndex.load(paths.local("build_index"))
    scores, ids = index.search(np.asarray(q["embedding"].tolist(), np.float32), 5)
    assert len(ids[0]) == 5 and np.all(np.diff(scores[0]) <= 1e-6)
    products = set(pd.read_parquet(paths.local("validate_catalog") / "clean.parquet")["product_id"])
    assert set(ids[0]) <= products


def test_rerun_same_run_id_is_idempotent(first_run, tiny_config):
    from mlflow.tracking import MlflowClient

    from dashclip_core.config import PipelineConfig
    from tasks import steps
    from tasks.common import run_paths

    cfg = PipelineConfig.from_file(tiny_config)
    params = {"config_path": str(tiny_config)}
    paths = run_paths(cfg, first_run.run_id)
    stage1_dir = paths.local("train_stage1")
    mtimes = {p: p.stat().st_mtime_ns for p in stage1_dir.rglob("*")}
    n_versions = len(MlflowClient(cfg.tracking_uri()).search_model_versions(f"name = '{cfg.registry.model_name}'"))

    again = steps.train_stage1({}, {}, params=params, run_id=first_run.run_id)  # done: its inputs are not read again
    assert again["uri"] == paths.uri("train_stage1")
    assert {p: p.stat().st_mtime_ns for p in stage1_dir.rglob("*")} == mtimes

    reg = steps.register_model({}, {}, {}, {}, {}, {}, {}, params=params, run_id=first_run.run_id)
    assert reg["uri"] == paths.uri("register_model")
    # Even with the step's marker gone (a crash after registering), no second version is created.
    import shutil

    shutil.rmtree(paths.local("register_model"))
    from dashclip_core.storage import read_json

    def summary(step: str) -> dict:  # what Airflow hands the task: the upstream's XCom
        return {"uri": paths.uri(step), **read_json(paths.local(step) / "summary.json")}

    upstream = [summary(s) for s in ("extract_catalog", "validate_catalog", "label_pairs", "train_stage1", "train_stage2",
                                     "build_index", "evaluate")]
    reg2 = steps.register_model(*upstream, params=params, run_id=first_run.run_id)
    assert reg2["version"] == reg["version"] and reg2["created"] is False
    assert len(MlflowClient(cfg.tracking_uri()).search_model_versions(f"name = '{cfg.registry.model_name}'")) == n_versions


def test_registered_pyfunc_reproduces_the_pipeline_eval(first_run, tiny_config):
    """The champion scored through its pyfunc (as promotion does) matches the evaluate step's figure."""
    import pandas as pd

    from dashclip_core.config import PipelineConfig
    from dashclip_core.evaluation.pyfunc_scoring import score_model_uri
    from dashclip_core.evaluation.report import eval_judgments
    from dashclip_core.storage import read_json
    from tasks.common import run_paths

    cfg = PipelineConfig.from_file(tiny_config)
    paths = run_paths(cfg, first_run.run_id)
    products = pd.read_parquet(paths.local("validate_catalog") / "clean.parquet")
    judgments = eval_judgments(pd.read_parquet(paths.local("label_pairs") / "labels.parquet"))
    score = score_model_uri(f"models:/{cfg.registry.model_name}@champion", cfg, products, judgments, "ndcg@10")
    report = read_json(paths.local("evaluate") / "report.json")
    assert score == pytest.approx(report["systems"]["dashclip"]["ndcg@10"], abs=1e-4)
    for metric in ("zero_shot_fine_top1", "t2i_ndcg@10"):  # promotion on photo metrics re-scores the same way
        score = score_model_uri(f"models:/{cfg.registry.model_name}@champion", cfg, products, judgments, metric)
        assert score == pytest.approx(report["systems"]["dashclip"][metric], abs=1e-4)


def test_cli_embeds_image_only_text_only_products_and_queries(first_run, tiny_config, tmp_path):
    import numpy as np
    import pandas as pd

    from dashclip_core.cli import main
    from dashclip_core.config import PipelineConfig
    from tasks.common import run_paths

    cfg = PipelineConfig.from_file(tiny_config)
    clean = pd.read_parquet(run_paths(cfg, first_run.run_id).local("validate_catalog") / "clean.parquet")
    with_image = clean[clean["image_uri"].notna()].iloc[0]
    products = pd.DataFrame({
        "product_id": ["image-only", "text-only", "both"],
        "title": [None, "Organic oat milk 1L", with_image["title"]],
        "description": [None, "Creamy oat drink", None],
        "image_path": [with_image["image_uri"], None, with_image["image_uri"]],
    })
    queries = pd.DataFrame({"query_id": [11, 12], "query": ["oat milk", "healthy snack"]})  # ids of any type come back as given
    products.to_parquet(tmp_path / "p.parquet")
    queries.to_parquet(tmp_path / "q.parquet")
    model = f"models:/{cfg.registry.model_name}@champion"
    assert main(["embed", "products", "--model", model, "--input", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "pe.parquet")]) == 0
    assert main(["embed", "queries", "--model", model, "--input", str(tmp_path / "q.parquet"), "--output", str(tmp_path / "qe.parquet")]) == 0
    pe, qe = pd.read_parquet(tmp_path / "pe.parquet"), pd.read_parquet(tmp_path / "qe.parquet")
    assert pe["product_id"].tolist() == ["image-only", "text-only", "both"] and qe["query_id"].tolist() == [11, 12]
    p, q = np.stack(pe["embedding"]), np.stack(qe["embedding"])
    assert p.shape == (3, cfg.model.embed_dim) and q.shape == (2, cfg.model.embed_dim) and p.dtype == np.float32
    assert np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-5) and np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    assert not np.allclose(p[0], p[1])  # image-only and text-only products get different vectors
    # The same model loaded from the DAG run folder gives the same vectors.
    run_dir = run_paths(cfg, first_run.run_id).run_uri
    assert main(["embed", "queries", "--model", run_dir, "--input", str(tmp_path / "q.parquet"), "--output", str(tmp_path / "qe2.parquet")]) == 0
    assert np.allclose(np.stack(pd.read_parquet(tmp_path / "qe2.parquet")["embedding"]), q, atol=1e-6)


def test_cli_search_uses_the_champion_index(first_run, tiny_config, capsys):
    from dashclip_core.cli import main
    from dashclip_core.config import PipelineConfig

    cfg = PipelineConfig.from_file(tiny_config)
    assert main(["search", "oat milk", "-k", "3", "--model-name", cfg.registry.model_name]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()[:2] in ("1.", "2.", "3.")]
    assert len(lines) == 3


def test_cli_evaluate_recomputes_the_champion_report(first_run, tiny_config, tmp_path, capsys):
    """``dashclip evaluate`` on the registered champion finds the run from the version's tags and recomputes
    the evaluate step's figures (same model, same snapshot and labels)."""
    import json

    from dashclip_core.cli import main
    from dashclip_core.config import PipelineConfig
    from dashclip_core.storage import read_json
    from tasks.common import run_paths

    cfg = PipelineConfig.from_file(tiny_config)
    out = tmp_path / "champion.json"
    assert main(["evaluate", "--model", f"models:/{cfg.registry.model_name}@champion", "--config", str(tiny_config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dashclip_itm_rerank" in printed and "ndcg@10" in printed
    mine = json.loads(out.read_text())
    assert mine["run_dir"] == run_paths(cfg, first_run.run_id).run_uri
    stored = read_json(run_paths(cfg, first_run.run_id).local("evaluate") / "report.json")
    for system in ("dashclip", "dashclip_itm_rerank", "bm25_titles"):
        for key in ("ndcg@10", "recall@10", "recall@50"):
            assert mine["systems"][system][key] == pytest.approx(stored["systems"][system][key], abs=1e-4), (system, key)


def test_an_index_below_the_recall_gate_stops_the_dag_before_evaluate_and_register(first_run, tiny_config, tmp_path):
    import yaml
    from airflow.sdk.exceptions import AirflowFailException

    from dashclip_core.config import PipelineConfig
    from dashclip_core.storage import read_json
    from tasks import steps
    from tasks.common import run_paths

    raw = yaml.safe_load(tiny_config.read_text())
    raw["index"] = {**raw.get("index", {}), "factory": "IVF4,PQ4x2", "min_recall_at_10": 0.999}  # 2-bit PQ: coarse on purpose
    config = tmp_path / "poor_index.yaml"
    config.write_text(yaml.safe_dump(raw))
    first = run_paths(PipelineConfig.from_file(tiny_config), first_run.run_id)

    def summary(step: str) -> dict:
        return {"uri": first.uri(step), **read_json(first.local(step) / "summary.json")}

    with pytest.raises(AirflowFailException, match=r"index recall gate failed: recall@10 against exact search 0\.\d+ < "
                                                   r"index.min_recall_at_10 0.999 \(IVF4,PQ4x2"):
        steps.build_index(summary("backfill_embeddings"), summary("validate_embeddings"), summary("label_pairs"),
                          summary("train_stage2"), params={"config_path": str(config)}, run_id="recall-gate-1")

    gated = read_json(run_paths(PipelineConfig.from_file(config), "recall-gate-1").local("build_index") / "summary.json")
    assert gated["passed"] is False and gated["recall@10_vs_exact"] < 0.999 and gated["factory"] == "IVF4,PQ4x2"
    # The failed task stops everything after it: evaluate and register_model run only when all upstream succeeded.
    dag = _dag()
    for task_id in ("evaluate", "register_model"):
        task = dag.get_task(task_id)
        assert "build_index" in task.get_flat_relative_ids(upstream=True) and task.trigger_rule == "all_success"
    assert summary("build_index")["passed"] is True and summary("build_index")["factory"] == "Flat"  # auto at 96 products
