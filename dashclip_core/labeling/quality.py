"""How well a teacher agrees with held-out human labels, and the gate its labels must pass before use.

DashCLIP checks its fine-tuned labelling model against human judgements before letting it grade pairs at
scale; this module is that check for any :class:`~dashclip_core.labeling.base.Labeler`:

- :func:`teacher_quality`: accuracy, per-class precision/recall/F1, macro-F1, Cohen's kappa and the confusion
  matrix (rows = human grade, columns = teacher grade) of aligned label arrays.
- :func:`evaluate_teacher`: labels held-out human pairs through the Labeler interface and scores them; a failed
  (or missing) result counts as wrong and is reported as ``n_failed``.
- :func:`check_quality`: raises :class:`~dashclip_core.labeling.errors.QualityGateError` naming every threshold
  that is not met; :func:`gate_thresholds` reads the thresholds from the config.
- :func:`write_quality_report`: the JSON report and the confusion-matrix PNG (file names from
  :class:`dashclip_core.layout.Labels`) for the step folder / MLflow.

Only numpy and pandas at import; matplotlib is imported when the PNG is drawn.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import LABELS, PRODUCT_FIELDS, Labeler, LabelRequest
from dashclip_core.labeling.errors import QualityGateError
from dashclip_core.layout import Labels

logger = logging.getLogger(__name__)

TEACHER_METRICS = ("accuracy", "kappa", "macro_f1")  # what the gate checks (and what is logged as teacher/<name>)


def teacher_quality(y_true: Sequence[int], y_pred: Sequence[int | None], labels: Sequence[int] = LABELS) -> dict:
    """Agreement of teacher grades with human grades.

    A prediction that is not one of ``labels`` (None, -1: a failed label) is wrong: it lowers accuracy and the
    recall of its true class, and counts in ``n_invalid``. It sits in no column of the confusion matrix. Kappa
    treats it as an extra "failed" category that no human chose: with C the (K, K+1) table,
    p_o = trace / n, p_e = sum_k rows_k * cols_k / n^2, kappa = (p_o - p_e) / (1 - p_e) (Cohen 1960, Eq. 1);
    with no failures this is the usual kappa.
    F1 of a class with no true and no predicted pair is 0 (scikit-learn's ``zero_division=0``).

    Args:
        y_true: human grades, each one of ``labels``.
        y_pred: teacher grades aligned with ``y_true``.
        labels: the grade values, in confusion-matrix order.

    Returns:
        dict with n, n_invalid, accuracy, macro_f1, kappa, labels, confusion (list of lists, rows = true),
        and per_class {label: {precision, recall, f1, support}} (keys are str, for JSON).

    Raises:
        ValueError: the arrays differ in length, or a human grade is not one of ``labels``.
    """
    labels = [int(v) for v in labels]
    y_true = list(y_true)
    y_pred = list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    pos = {v: i for i, v in enumerate(labels)}
    bad = [(i, v) for i, v in enumerate(y_true) if _as_label(v) not in pos]
    if bad:
        raise ValueError(f"y_true: {len(bad)} value(s) outside {labels}, e.g. index {bad[0][0]}: {bad[0][1]!r}")
    k, n = len(labels), len(y_true)
    t = np.array([pos[_as_label(v)] for v in y_true], np.int64)
    p = np.array([pos.get(_as_label(v), k) for v in y_pred], np.int64)  # k = the "failed" column
    table = np.zeros((k, k + 1), np.int64)
    np.add.at(table, (t, p), 1)
    cm = table[:, :k]

    tp = np.diag(cm).astype(np.float64)
    support = table.sum(1).astype(np.float64)  # true pairs of each class (failed ones included)
    predicted = cm.sum(0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)

    if n:
        p_o = tp.sum() / n
        p_e = float((support * predicted).sum()) / n**2
        kappa = float((p_o - p_e) / (1 - p_e)) if p_e < 1 else 1.0
        accuracy = float(p_o)
    else:
        kappa = accuracy = float("nan")
    return {
        "n": n,
        "n_invalid": int(table[:, k].sum()),
        "accuracy": accuracy,
        "macro_f1": float(f1.mean()) if n else float("nan"),
        "kappa": kappa,
        "labels": labels,
        "confusion": cm.tolist(),
        "per_class": {str(v): {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                               "support": int(support[i])} for i, v in enumerate(labels)},
    }


def _as_label(v) -> int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def check_quality(report: dict, min_accuracy: float | None = None, min_kappa: float | None = None,
                  min_macro_f1: float | None = None) -> dict:
    """Gate a quality report; a threshold left at None is not checked. A NaN metric fails its threshold.

    Returns:
        ``report`` unchanged, when every threshold is met.

    Raises:
        QualityGateError: naming each failed threshold with the measured value, e.g.
            "teacher quality gate failed on 312 held-out pairs: kappa 0.213 < min_kappa 0.4".
    """
    failures = []
    for metric, threshold in zip(TEACHER_METRICS, (min_accuracy, min_kappa, min_macro_f1)):
        if threshold is None:
            continue
        value = report.get(metric, float("nan"))
        if not value >= threshold:  # also catches NaN
            failures.append(f"{metric} {value:.3f} < min_{metric} {threshold}")
    if failures:
        extra = f" ({report['n_failed']} failed labels counted as wrong)" if report.get("n_failed") else ""
        raise QualityGateError(f"teacher quality gate failed on {report.get('n', '?')} held-out pairs{extra}: "
                               + "; ".join(failures), failures, report)
    return report


def gate_thresholds(cfg: LabelingConfig) -> dict[str, float | None]:
    """:func:`check_quality`'s keyword arguments from ``labeling.min_teacher_*`` (a macro-F1 minimum of 0 is not checked)."""
    return {"min_accuracy": cfg.min_teacher_accuracy, "min_kappa": cfg.min_teacher_kappa,
            "min_macro_f1": cfg.min_teacher_macro_f1 or None}


def pairs_with_product_text(pairs: pd.DataFrame, products: pd.DataFrame) -> pd.DataFrame:
    """Join title/description/category/aisle from ``products`` onto (query, product_id, label, ...) rows.

    The result is what :meth:`CrossEncoderTeacher.fit` and :func:`evaluate_teacher` take.

    Raises:
        ValueError: a labelled product_id is not in ``products`` (names how many and a few ids).
    """
    missing = sorted(set(pairs["product_id"]) - set(products["product_id"]))
    if missing:
        raise ValueError(f"{len(missing)} labelled product_id(s) are not in the products table, e.g. {missing[:5]}")
    fields = products[["product_id", *[f for f in PRODUCT_FIELDS if f in products.columns]]]
    out = pairs.drop(columns=[f for f in PRODUCT_FIELDS if f in pairs.columns]).merge(fields, on="product_id", how="left")
    for f in PRODUCT_FIELDS:
        if f not in out.columns:
            out[f] = None
    return out


def evaluate_teacher(teacher: Labeler, held_out: pd.DataFrame) -> dict:
    """Label held-out human pairs through ``teacher.label`` and score them with :func:`teacher_quality`.

    Args:
        teacher: any Labeler.
        held_out: columns query, label and the product fields title/description/category/aisle (missing ones are
            treated as empty); product_id when present (otherwise each row gets its own id).

    Returns:
        The quality dict plus ``n_failed`` (failed or missing results, each counted as wrong) and ``labeler_id``.
        Several rows of one (query, product_id) pair (several annotators) share the teacher's one grade.
    """
    rows = held_out.reset_index(drop=True)
    ids = rows["product_id"].astype(str) if "product_id" in rows.columns else pd.Series([f"row{i}" for i in range(len(rows))])
    requests, seen = [], set()
    for i, r in enumerate(rows.to_dict("records")):
        key = (str(r["query"]), ids[i])
        if key in seen:
            continue
        seen.add(key)
        requests.append(LabelRequest(query=key[0], product_id=key[1],
                                     **{f: r[f] if isinstance(r.get(f), str) else None for f in PRODUCT_FIELDS}))
    grade: dict[tuple[str, str], int | None] = {}
    for res in teacher.label(requests):  # results may come back in any order: match them by pair
        grade[(res.query, res.product_id)] = res.label if res.status == "ok" else None
    pred = [grade.get((str(q), ids[i])) for i, q in enumerate(rows["query"])]
    report = teacher_quality(rows["label"].tolist(), pred)
    report["n_failed"] = report["n_invalid"]
    report["labeler_id"] = teacher.labeler_id
    if report["n_failed"]:
        logger.warning("evaluate_teacher: %d of %d held-out pairs got no label from %s (counted as wrong)",
                       report["n_failed"], report["n"], teacher.labeler_id)
    return report


def write_quality_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the report as JSON and its confusion matrix as a PNG (counts, row-normalised colour) into ``out_dir``,
    under the names of :class:`dashclip_core.layout.Labels` (``teacher_quality`` / ``teacher_confusion_png``).

    Returns:
        {"json": path, "confusion_png": path}, ready for ``mlflow.log_artifact``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    files = Labels(out_dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    json_path = files.teacher_quality
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True, default=_json_default))

    cm = np.asarray(report["confusion"], np.float64)
    labels = report.get("labels", list(range(len(cm))))
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = Figure(figsize=(4.2, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), [str(v) for v in labels])
    ax.set_yticks(range(len(labels)), [str(v) for v in labels])
    ax.set_xlabel("teacher grade")
    ax.set_ylabel("human grade")
    ax.set_title(f"n={report.get('n')}  acc={report.get('accuracy', float('nan')):.3f}  "
                 f"kappa={report.get('kappa', float('nan')):.3f}  F1={report.get('macro_f1', float('nan')):.3f}",
                 fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the human grade's row")
    fig.tight_layout()
    png_path = files.teacher_confusion_png
    fig.savefig(png_path)
    return {"json": json_path, "confusion_png": png_path}


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
