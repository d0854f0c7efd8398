"""``dashclip evaluate`` on a tiny saved model in a DAG-run folder: table, JSON, honest recompute, clear errors.

The registry path (``--model models:/...``) is covered end to end in tests/e2e/test_dag_run.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from dashclip_core.cli import main

SYSTEMS = {"dashclip", "dashclip_itm_rerank", "untrained_encoders", "image_backbone_linear_probe", "bm25_titles"}


def test_evaluate_run_folder_prints_table_and_writes_json(tiny_run, tiny_config, tmp_path, capsys) -> None:
    # A stale report in the run folder must not be read back: the command recomputes.
    (tiny_run.run_dir / "evaluate").mkdir(exist_ok=True)
    (tiny_run.run_dir / "evaluate" / "report.json").write_text(json.dumps({"systems": {"dashclip": {"ndcg@10": 123.0}}}))
    out = tmp_path / "sub" / "report.json"
    config = tmp_path / "tiny.yaml"  # tiny.yaml + the run's photo folder as an allowed image root
    config.write_text(yaml.safe_dump({**yaml.safe_load(tiny_config.read_text()),
                                      "catalog": {**yaml.safe_load(tiny_config.read_text())["catalog"],
                                                  "image_roots": list(tiny_run.cfg.catalog.image_roots)}}))

    rc = main(["evaluate", "--model", str(tiny_run.run_dir), "--config", str(config), "--out", str(out), "--rerank-k", "10"])

    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(ln for ln in lines if ln.startswith("metric"))
    assert header.split()[1:] == list(json.loads(out.read_text())["systems"])
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[lines.index(header) + 1 :] if ln and not ln.startswith("wrote")}
    assert {"ndcg@10", "recall@10", "recall@50", "zero_shot_fine_top1"} <= set(rows)
    assert len(rows["ndcg@10"]) == len(SYSTEMS)
    report = json.loads(out.read_text())
    assert set(report["systems"]) == SYSTEMS
    assert report["model"] == str(tiny_run.run_dir) and report["run_dir"] == str(tiny_run.run_dir)
    assert report["systems"]["dashclip_itm_rerank"]["rerank_k"] == 10
    assert 0.0 <= report["systems"]["dashclip"]["ndcg@10"] <= 1.0
    assert float(rows["ndcg@10"][0]) == pytest.approx(report["systems"]["dashclip"]["ndcg@10"], abs=1e-4)
    assert report["n_eval_queries"] == tiny_run.labels.loc[tiny_run.labels["split"] == "eval", "query"].nunique()
    assert not out.with_name("report.json.tmp").exists()


def test_evaluate_refuses_a_config_the_model_was_not_trained_with(tiny_run, tmp_path, capsys) -> None:
    rc = main(["evaluate", "--model", str(tiny_run.run_dir), "--config", "configs/demo.yaml", "--out", str(tmp_path / "r.json")])

    assert rc == 2
    err = capsys.readouterr().err
    assert "model_config.json differs from model.* in configs/demo.yaml" in err and "model.embed_dim" in err
    assert not (tmp_path / "r.json").exists()


def test_evaluate_names_the_missing_file(tiny_run, tiny_config, tmp_path, capsys) -> None:
    other = tmp_path / "run-without-labels"
    shutil.copytree(tiny_run.run_dir / "validate_catalog", other / "validate_catalog")

    rc = main(["evaluate", "--model", str(tiny_run.run_dir), "--config", str(tiny_config), "--run-dir", str(other),
               "--out", str(tmp_path / "r.json")])
    assert rc == 2
    assert f"{other / 'label_pairs'} does not exist" in capsys.readouterr().err

    rc = main(["evaluate", "--model", str(tmp_path / "nowhere"), "--config", str(tiny_config)])
    assert rc == 2
    assert "train_stage1/product_encoder does not exist" in capsys.readouterr().err
