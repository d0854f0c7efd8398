"""Evaluation plots, each written as one PNG: training curves, zero-shot confusion of the worst
classes, and query -> top-5 product grids.

matplotlib is imported inside the functions and drives a ``Figure`` through the Agg canvas directly
(no ``pyplot``): no display is needed on Airflow workers or in CI, and no global backend state is touched.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

TRAINING_PREFIXES = ("stage1/", "stage2/")
OTHER = "(other)"  # column that sums the predicted classes cut by ``max_cols``


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=100)
    return out_path


# ---- (a) training curves -----------------------------------------------------------------------


def training_curve_histories(tracking_uri: str, run_id: str, prefixes: Sequence[str] = TRAINING_PREFIXES) -> dict[str, list[tuple[int, float]]]:
    """Per-step histories ``key -> [(step, value), ...]`` of an MLflow run's training metrics.

    Training logs every step as ``<stage>/<name>`` (``MetricsLogger``), each epoch mean as
    ``<stage>/epoch_<name>`` and, once at the end, run summaries under the same prefix
    (``stage1/n_pairs``, ``stage1/final_loss_itc``). Kept: keys under ``prefixes`` that are not epoch
    means and have more than one point (a value logged once is a summary, not a curve).
    Ordered by prefix, then key.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = client.get_run(run_id).data.metrics
    out = {}
    for prefix in prefixes:
        for key in sorted(k for k in keys if k.startswith(prefix) and not k[len(prefix) :].startswith("epoch_")):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            if len(history) > 1:
                out[key] = history
    return out


def plot_training_curves(tracking_uri: str, run_id: str, out_path: Path, prefixes: Sequence[str] = TRAINING_PREFIXES) -> Path:
    """One subplot per per-step training metric (see :func:`training_curve_histories`).

    Raises:
        ValueError: the run has no per-step metric under ``prefixes``.
    """
    histories = training_curve_histories(tracking_uri, run_id, prefixes)
    if not histories:
        raise ValueError(f"MLflow run {run_id} at {tracking_uri}: no per-step metric under {list(prefixes)}; nothing to plot")
    ncols = min(4, len(histories))
    nrows = math.ceil(len(histories) / ncols)
    fig = _figure(4 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, history) in zip(axes, histories.items()):
        steps, values = zip(*history)
        ax.plot(steps, values, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(histories) :]:
        ax.set_visible(False)
    fig.suptitle(f"training curves (MLflow run {run_id[:8]})", fontsize=10)
    return _save(fig, out_path)


# ---- (b) zero-shot confusion of the worst classes ----------------------------------------------


def class_recall(true: Sequence[str], pred: Sequence[str]) -> pd.DataFrame:
    """Per true class: ``n`` photos, ``correct`` and ``recall`` = correct / n."""
    if len(true) != len(pred):
        raise ValueError(f"class_recall: {len(true)} true labels but {len(pred)} predictions")
    df = pd.DataFrame({"true": list(true), "correct": np.asarray(true, dtype=object) == np.asarray(pred, dtype=object)})
    out = df.groupby("true").agg(n=("correct", "size"), correct=("correct", "sum"))
    out["recall"] = out["correct"] / out["n"]
    return out


def worst_classes(true: Sequence[str], pred: Sequence[str], n: int = 12) -> list[str]:
    """The ``n`` true classes of lowest recall; ties: more photos first (0/5 is stronger evidence
    of a problem than 0/1), then by name so the choice is deterministic."""
    recall = class_recall(true, pred).reset_index()
    ranked = recall.sort_values(["recall", "n", "true"], ascending=[True, False, True])
    return ranked["true"].head(n).tolist()


def confusion_block(true: Sequence[str], pred: Sequence[str], rows: Sequence[str], max_cols: int = 20) -> tuple[list[str], np.ndarray]:
    """Confusion counts restricted to the true classes ``rows``.

    Columns: the row classes themselves first (so the diagonal is visible), then the other classes
    those rows are predicted as, most frequent first, up to ``max_cols`` class columns in all; the
    predictions cut that way are summed in a last ``(other)`` column, so every row still adds up to
    that class's photo count.

    Returns:
        (column names, counts (len(rows), len(columns)) int array).

    Raises:
        ValueError: ``max_cols`` is smaller than the number of rows.
    """
    if max_cols < len(rows):
        raise ValueError(f"confusion_block: max_cols={max_cols} cannot hold the {len(rows)} row classes")
    row_set = set(rows)
    pairs = [(t, p) for t, p in zip(true, pred) if t in row_set]
    others = Counter(p for _, p in pairs if p not in row_set)
    extra = [c for c, _ in sorted(others.items(), key=lambda kv: (-kv[1], kv[0]))]
    keep = extra[: max_cols - len(rows)]
    columns = list(rows) + keep + ([OTHER] if len(extra) > len(keep) else [])
    index = {c: i for i, c in enumerate(columns)}
    r_index = {c: i for i, c in enumerate(rows)}
    counts = np.zeros((len(rows), len(columns)), dtype=int)
    for t, p in pairs:
        counts[r_index[t], index[p] if p in index else index[OTHER]] += 1
    return columns, counts


def plot_confusion_worst(true: Sequence[str], pred: Sequence[str], out_path: Path, n: int = 12, max_cols: int = 20,
                         title: str = "zero-shot fine classes: lowest recall") -> Path:
    """Confusion matrix of the ``n`` lowest-recall classes (rows) against what they are predicted as.

    Cells are coloured by the share of the row's photos and labelled with counts; row labels carry
    correct/total.

    Raises:
        ValueError: no predictions.
    """
    if len(true) == 0:
        raise ValueError("plot_confusion_worst: no predictions to plot")
    rows = worst_classes(true, pred, n)
    columns, counts = confusion_block(true, pred, rows, max(max_cols, len(rows)))
    recall = class_recall(true, pred)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = _figure(max(6.0, 0.45 * len(columns) + 3), max(3.5, 0.4 * len(rows) + 2.5))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (r, c), v in np.ndenumerate(counts):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7, color="white" if shares[r, c] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), [_short(c) for c in columns], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{_short(r)} ({recall.at[r, 'correct']}/{recall.at[r, 'n']})" for r in rows], fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (correct/photos)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="share of the row's photos", shrink=0.8)
    return _save(fig, out_path)


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ---- (c) query -> top-5 grids ------------------------------------------------------------------


def plot_query_results(rankings: dict[str, list[str]], products: pd.DataFrame, judgments: pd.DataFrame, out_path: Path,
                       queries: Sequence[str] | None = None, top: int = 5, min_relevant_label: int = 1, max_queries: int = 4,
                       title: str = "top results per query", images=None) -> Path:
    """A row per query with its top ``top`` products: the photo (thumbnail of ``image_uri``) or, for a
    product without one, a text tile with its title. Each cell is titled with the product title and
    its judged relevance (``relevant (label)``, ``not relevant (label)`` or ``unjudged``).

    Args:
        rankings: query -> product ids, best first.
        products: rows with ``product_id``, ``title``, ``image_uri``.
        judgments: ``query``, ``product_id``, ``label`` (the eval judgments).
        out_path: PNG to write.
        queries: which queries (default: the first ``max_queries`` of ``rankings``).
        top: products per row.
        min_relevant_label: labels >= this are "relevant" (as in the metrics).
        images: the :class:`~dashclip_core.storage.images.ImagePolicy` photos are read under; default
            ``TRUSTED_INPUT`` (the gate already checked the rows' roots): regular files only, with byte /
            pixel caps and a deadline, so a photo swapped for a FIFO or a bomb cannot stall the step.

    Raises:
        ValueError: a query has no ranking, or no query to plot.
    """
    queries = list(queries if queries is not None else list(rankings)[:max_queries])[:max_queries]
    if not queries:
        raise ValueError("plot_query_results: no query to plot")
    missing = [q for q in queries if q not in rankings]
    if missing:
        raise ValueError(f"plot_query_results: no ranking for quer(y/ies) {missing[:5]}")
    by_id = products.drop_duplicates("product_id").set_index("product_id")
    labels = judgments.groupby(["query", "product_id"])["label"].max().to_dict()
    fig = _figure(2.3 * top + 1.2, 2.7 * len(queries))
    axes = fig.subplots(len(queries), top, squeeze=False)
    for r, query in enumerate(queries):
        for c in range(top):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            ids = rankings[query]
            if c >= len(ids):
                ax.set_visible(False)
                continue
            row = by_id.loc[ids[c]] if ids[c] in by_id.index else None
            product_title = _text(row["title"]) if row is not None else None
            _draw_product(ax, row, product_title, images)
            verdict, colour = _relevance(labels.get((query, ids[c])), min_relevant_label)
            ax.set_title(f"{c + 1}. {textwrap.shorten(product_title or '(no title)', 26, placeholder='…')}\n{verdict}",
                         fontsize=7, color=colour)
        axes[r][0].set_ylabel(textwrap.fill(query, 18), fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_path)


def _draw_product(ax, row, product_title: str | None, images=None) -> None:
    """The product's photo, or a grey text tile when it has none (or it cannot be read)."""
    from dashclip_core.storage.images import TRUSTED_INPUT, ImageRejected, open_image

    uri = _text(row["image_uri"]) if row is not None else None
    note = "no image"
    if uri:
        try:
            with open_image(uri, images if images is not None else TRUSTED_INPUT, draft_size=(160, 160)) as im:
                thumb = im.convert("RGB")
                thumb.thumbnail((160, 160))
            ax.imshow(np.asarray(thumb))
            return
        except ImageRejected as err:  # a missing, refused or corrupt file is shown, not hidden
            logger.warning("plot_query_results: product %r: %s", row.name, err)
            note = f"image unreadable: {err.reason_code}"
    ax.set_facecolor("#eeeeee")
    ax.text(0.5, 0.5, textwrap.fill(product_title or "(no title)", 18) + f"\n\n[{note}]", ha="center", va="center",
            fontsize=7, transform=ax.transAxes)


def _relevance(label, min_relevant_label: int) -> tuple[str, str]:
    if label is None:
        return "unjudged", "dimgray"
    if label >= min_relevant_label:
        return f"relevant ({int(label)})", "green"
    return f"not relevant ({int(label)})", "firebrick"


def _text(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


# ---- all of them for one evaluation ------------------------------------------------------------


def write_evaluation_plots(outputs, products: pd.DataFrame, out_dir: Path, min_relevant_label: int = 1,
                           mlflow_run: dict | None = None, images=None) -> list[Path]:
    """The plots of one evaluation (an :class:`~dashclip_core.evaluation.report.EvaluationOutputs`) into ``out_dir``.

    Writes ``zero_shot_confusion_worst.png`` (when there are held-out photos), ``query_top5_ann.png`` and
    ``query_top5_itm_rerank.png`` (the report's sample queries), and ``training_curves.png`` when
    ``mlflow_run`` = {"tracking_uri", "run_id"} names the MLflow run the training logged into.
    """
    written = []
    if not outputs.zero_shot.empty:
        written.append(plot_confusion_worst(outputs.zero_shot["fine_true"].tolist(), outputs.zero_shot["fine_pred"].tolist(),
                                            out_dir / "zero_shot_confusion_worst.png"))
    samples = list(outputs.report["sample_queries"])
    for system, name in (("dashclip", "ann"), ("dashclip_itm_rerank", "itm_rerank")):
        written.append(plot_query_results(outputs.rankings[system], products, outputs.judgments, out_dir / f"query_top5_{name}.png",
                                          queries=samples, min_relevant_label=min_relevant_label, title=f"top-5 per query: {system}",
                                          images=images))
    if mlflow_run is not None:
        written.append(plot_training_curves(mlflow_run["tracking_uri"], mlflow_run["run_id"], out_dir / "training_curves.png"))
    return written
