"""The library's commands: embed products/queries, search the champion's index, recompute an evaluation.

    embed products --model URI --input P.parquet --output O.parquet
    embed queries  --model URI --input Q.parquet --output O.parquet
    search "oat milk" -k 10 [--model-name dashclip-demo]
    evaluate --model URI [--config C.yaml] [--run-dir RUN] [--out FILE]

``--model`` is ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) from the MLflow registry, or a
DAG run folder (``<root>/<dag id>/<run>``) holding both trained encoders (:mod:`dashclip_core.layout`).
Local stores are the ones ``make run`` uses (``$DASHCLIP_HOME``, default ``.dashclip/``).

No Airflow here: the ``dashclip`` console script (``orchestration.cli``) adds ``run`` and ``summary``
to these commands through :func:`add_library_commands`; :func:`main` offers the library ones alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from dashclip_core.config import DEFAULT_CONFIG, PipelineConfig, flatten
from dashclip_core.layout import (
    PRODUCT_ENCODER,
    QUERY_ENCODER,
    CatalogGate,
    Evaluation,
    Labels,
    Snapshot,
    Stage1,
    Stage2,
    Step,
    run_folder,
)

logger = logging.getLogger("dashclip")

DEFAULT_REPORT = Path(Evaluation(Path()).report.name)  # `evaluate --out`: the evaluate step's file name, in the current folder
DEFAULT_MODEL_NAME = PipelineConfig().registry.model_name


# ---- tables ------------------------------------------------------------------------------------


def metrics_table(systems: dict[str, dict]) -> list[str]:
    """Lines of a metric x system table (counts such as n_queries and class totals left out)."""
    names = list(systems)
    metrics = [k for k in dict.fromkeys(k for m in systems.values() for k in m)
               if not k.startswith(("n_", "rerank_k")) and not k.endswith(("_classes", "_n_photos"))]
    widths = [max(len(n), 8) for n in names]  # one column per system, as wide as its name
    lines = [f"{'metric':24s} " + " ".join(f"{n:>{w}s}" for n, w in zip(names, widths))]
    for key in metrics:
        lines.append(f"{key:24s} " + " ".join(f"{_fmt(systems[n].get(key)):>{w}s}" for n, w in zip(names, widths)))
    return lines


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


# ---- embed / search ----------------------------------------------------------------------------


class RunFolderModel:
    """The two encoders of a DAG run folder, behind the same predict() as the registered pyfunc."""

    def __init__(self, run_dir: Path) -> None:
        from dashclip_core.registry.pyfunc_model import DashclipEncoders

        src = resolve_model(str(run_dir))  # raises when an encoder folder is missing
        ctx = SimpleNamespace(artifacts={PRODUCT_ENCODER: str(src.product_dir), QUERY_ENCODER: str(src.query_dir)},
                              model_config=LOCAL_CLI_MODEL_CONFIG)
        self.model = DashclipEncoders()
        self.model.load_context(ctx)

    def predict(self, df):
        return self.model.predict(None, df)


def load_model(uri: str):
    if uri.startswith(("models:/", "runs:/")):
        import mlflow

        _mlflow_defaults()
        return mlflow.pyfunc.load_model(uri, model_config=LOCAL_CLI_MODEL_CONFIG)
    return RunFolderModel(Path(uri))


# `dashclip embed` runs as the user on the user's own files: image_path may name any local file they can read
# (still regular files only, within the byte / pixel caps). A served model has no such root (pyfunc_model.py).
LOCAL_CLI_MODEL_CONFIG = {"image_roots": [os.sep]}


def _mlflow_defaults() -> None:
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or PipelineConfig().tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def cmd_embed(args: argparse.Namespace) -> int:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = pd.read_parquet(args.input)
    required = ["query_id", "query"] if args.kind == "queries" else ["product_id"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        print(f"{args.input}: missing column(s) {missing}; {args.kind} need {required}", file=sys.stderr)
        return 2
    id_col = "query_id" if args.kind == "queries" else "product_id"
    ids = df[id_col].tolist()
    # The model's signature types ids as strings; the output keeps the caller's ids (rows stay in input order).
    out = load_model(args.model).predict(df.assign(**{id_col: df[id_col].astype(str)}))
    table = pa.table({id_col: pa.array(ids),
                      "embedding": pa.array([list(map(float, e)) for e in out["embedding"]], type=pa.list_(pa.float32()))})
    tmp = Path(str(args.output) + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, args.output)  # never leave half a file at the output path
    print(f"wrote {len(out)} {args.kind} embeddings to {args.output}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from dashclip_core.index.faiss_index import ProductIndex
    from dashclip_core.storage import localize

    _mlflow_defaults()
    client = MlflowClient()
    # The alias is resolved once: the model, its index and its snapshot all come from this version, even when a
    # concurrent promotion moves the alias meanwhile.
    version = client.get_model_version_by_alias(args.model_name, args.alias)
    tags = version.tags
    cfg = PipelineConfig()
    index = ProductIndex.load(localize(tags["index_uri"], cfg.storage.s3_endpoint_url, cfg.cache_dir()))
    model = load_model(f"models:/{args.model_name}/{version.version}")
    q = model.predict(pd.DataFrame({"query_id": ["q"], "query": [args.query]}))

    scores, ids = index.search(np.asarray(q["embedding"].tolist(), np.float32), args.k)
    snapshot = Snapshot(localize(tags["catalog_snapshot"], cfg.storage.s3_endpoint_url, cfg.cache_dir()))
    products = pd.read_parquet(snapshot.products).set_index("product_id")
    print(f"{args.model_name}@{args.alias} (v{version.version}) — {args.query!r}:")
    for rank, (pid, score) in enumerate(zip(ids[0], scores[0]), 1):
        row = products.loc[pid] if pid in products.index else None
        title = row["title"] if row is not None and isinstance(row["title"], str) else "(image-only product)"
        cat = row["category"] if row is not None else "?"
        print(f"{rank:3d}. {score:.3f}  {pid}  {title}  [{cat}]")
    return 0


# ---- evaluate ----------------------------------------------------------------------------------


class ModelSource:
    """Where a ``--model`` lives: its two encoder folders, and the DAG run and config it came from when known."""

    def __init__(self, product_dir: Path, query_dir: Path, run_dir: str | None, config_path: str | None) -> None:
        self.product_dir, self.query_dir, self.run_dir, self.config_path = product_dir, query_dir, run_dir, config_path


def resolve_model(uri: str) -> ModelSource:
    """Encoder folders of a registry URI (downloaded) or of a DAG run folder (as ``dashclip embed`` reads them).

    Raises:
        FileNotFoundError: a run folder without the stage-1 product encoder or the stage-2 query encoder.
        ValueError: a ``models:/`` URI whose pyfunc lacks the encoder artifacts.
    """
    if not uri.startswith("models:/"):
        steps = run_folder(uri)
        src = ModelSource(Stage1(steps[Step.TRAIN_STAGE1]).product_encoder, Stage2(steps[Step.TRAIN_STAGE2]).query_encoder,
                          str(Path(uri)), None)
        for p in (src.product_dir, src.query_dir):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist; --model must be models:/... or a DAG run folder with "
                                        f"{Step.TRAIN_STAGE1} and {Step.TRAIN_STAGE2}")
        return src
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    _mlflow_defaults()
    version = _model_version(MlflowClient(), uri)  # an alias is resolved once: encoders and tags come from this version
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}"))
    artifacts = Model.load(local).flavors.get("python_function", {}).get("artifacts", {})
    missing = [a for a in (PRODUCT_ENCODER, QUERY_ENCODER) if a not in artifacts]
    if missing:
        raise ValueError(f"{uri}: MLmodel lists no artifact(s) {missing}; not a dashclip encoders model")
    tags = version.tags or {}
    snapshot = tags.get("catalog_snapshot")  # <run folder>/<the snapshot step>
    return ModelSource(local / artifacts[PRODUCT_ENCODER]["path"], local / artifacts[QUERY_ENCODER]["path"],
                       snapshot.rsplit("/", 1)[0] if snapshot else None, tags.get("config_path"))


def _model_version(client, uri: str):
    """The ModelVersion of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = ref.rpartition("/")
    if not name or not version.isdigit():
        raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(name, version)


def check_model_config(product_dir: Path, cfg: PipelineConfig, config_path: str) -> None:
    """The saved model must match ``cfg.model``: inputs (tokenizer, image size) and the untrained baseline come from it.

    Raises:
        ValueError: naming the differing fields, the model folder and the config file.
    """
    from dataclasses import asdict

    from dashclip_core.models.encoders import MODEL_CONFIG, saved_model_config

    saved, wanted = flatten(asdict(saved_model_config(product_dir))), flatten(asdict(cfg.model))
    differ = sorted(k for k in saved.keys() | wanted.keys() if k != "blip_checkpoint" and saved.get(k) != wanted.get(k))
    if differ:
        raise ValueError(f"{product_dir / MODEL_CONFIG} differs from model.* in {config_path} in field(s) "
                         f"{['model.' + k for k in differ]}; pass the config the model was trained with (--config)")


def read_run_inputs(run_dir: str, cfg: PipelineConfig):
    """(products, labels) of a DAG run: the validated snapshot and the labels the run trained and evaluated on."""
    import pandas as pd

    from dashclip_core.storage import localize

    def step_dir(step: Step) -> Path:
        return localize(f"{run_dir.rstrip('/')}/{step}", cfg.storage.s3_endpoint_url, cfg.cache_dir())

    def existing(path: Path, step: Step) -> Path:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; --run-dir must be a DAG run folder with {step}/{path.name}")
        return path

    clean = existing(CatalogGate(step_dir(Step.VALIDATE_CATALOG)).clean, Step.VALIDATE_CATALOG)
    labels = existing(Labels(step_dir(Step.LABEL_PAIRS)).labels, Step.LABEL_PAIRS)
    return pd.read_parquet(clean), pd.read_parquet(labels)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Recompute (never read back) the full report for ``--model`` on a run's snapshot and eval labels."""
    from dashclip_core.evaluation.report import run_evaluation
    from dashclip_core.evaluation.rerank import DEFAULT_RERANK_K
    from dashclip_core.models.encoders import load_product_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_products

    try:
        src = resolve_model(args.model)
        config_path = args.config or src.config_path or DEFAULT_CONFIG
        cfg = PipelineConfig.from_file(config_path)
        run_dir = args.run_dir or src.run_dir
        if run_dir is None:
            raise ValueError(f"{args.model}: no catalog_snapshot tag tells which run to evaluate on; pass --run-dir")
        check_model_config(src.product_dir, cfg, config_path)
        products, labels = read_run_inputs(run_dir, cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"dashclip evaluate: {err}", file=sys.stderr)
        return 2
    product_emb = embed_products(load_product_encoder(src.product_dir), InputBuilder(cfg.model), products)  # (N, D)
    result = run_evaluation(cfg, products, labels, products["product_id"].tolist(), product_emb, src.query_dir, src.product_dir,
                            rerank_k=args.rerank_k or DEFAULT_RERANK_K)
    report = {"model": args.model, "run_dir": str(run_dir), "config": config_path, **result.report}
    print(f"model {args.model}\nrun   {run_dir} ({report['n_eval_queries']} held-out queries, {report['n_products']} products)\n")
    print("\n".join(metrics_table(report["systems"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(args.out) + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)  # never leave half a file at the output path
    print(f"wrote {args.out}")
    return 0


# ---- parser ------------------------------------------------------------------------------------


def add_library_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``embed``, ``search`` and ``evaluate`` to ``sub`` (the subparsers of a ``dashclip`` parser)."""
    p = sub.add_parser("embed", help="embed products or queries with a registered model or a run folder")
    p.add_argument("kind", choices=["products", "queries"])
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or a DAG run folder")
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("search", help="nearest products for a query with the champion's index")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    p.add_argument("--alias", default="champion")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("evaluate", help="recompute the evaluation report of a model on a DAG run's snapshot and labels")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a DAG run folder")
    p.add_argument("--config", help=f"config the model was trained with (default: the version's config_path tag, else {DEFAULT_CONFIG})")
    p.add_argument("--run-dir", dest="run_dir", help=f"DAG run folder with {Step.VALIDATE_CATALOG} and {Step.LABEL_PAIRS} "
                   "(default: the run folder given as --model, or the registered version's catalog_snapshot run)")
    p.add_argument("--out", type=Path, default=DEFAULT_REPORT)
    p.add_argument("--rerank-k", dest="rerank_k", type=int, default=None, help="ANN candidates the ITM head re-ranks (default 20)")
    p.set_defaults(func=cmd_evaluate)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO if os.environ.get("DASHCLIP_VERBOSE") else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """The library commands alone (no Airflow needed); the installed ``dashclip`` is ``orchestration.cli:main``."""
    configure_logging()
    parser = argparse.ArgumentParser(prog="dashclip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_library_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
