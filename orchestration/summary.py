"""The summary of a DAG run: its tasks (from Airflow), then what its steps published (through
:mod:`dashclip_core.layout`): each gate's Data Docs, the evaluation table, the index, the registered model,
sample queries."""

from __future__ import annotations

from dashclip_core.cli import metrics_table
from dashclip_core.config import PipelineConfig
from dashclip_core.layout import DAG_ID, VIEWS, RunLayout, Step
from dashclip_core.redaction import redact_text, register_config_secrets
from dashclip_core.storage import RunPaths, read_json
from orchestration.runs import TaskState, task_states


def run_layout(run_id: str, cfg: PipelineConfig) -> RunLayout:
    return RunLayout(RunPaths(cfg.storage_root(), DAG_ID, run_id, cfg.storage.s3_endpoint_url, cfg.cache_dir()))


def data_docs_lines(layout: RunLayout, summaries: dict[Step, dict]) -> list[str]:
    """One line per published gate (a summary with ``data_docs``, a failed gate's included): its outcome and
    a file:// link to its Great Expectations Data Docs (of the local copy when the run is on S3)."""
    lines = []
    for step, summary in summaries.items():
        if summary.get("data_docs"):
            index = (layout.folder(step).dir / summary["data_docs"]).resolve()
            outcome = "passed" if summary.get("passed") else "FAILED"
            lines.append(f"  {step.value:24s} {outcome:7s} {index.as_uri()}")
    return ["", "data docs (Great Expectations) per gate:", *lines] if lines else []


def summary_lines(run_id: str, config_path: str, wall: float | None = None, tasks: list[TaskState] | None = None) -> list[str]:
    """The summary as lines; ``tasks`` defaults to the run's task states read from Airflow."""
    cfg = PipelineConfig.from_file(config_path)
    layout = run_layout(run_id, cfg)
    out = ["", f"=== {DAG_ID} run {run_id} (config {config_path}) ==="]
    if wall is not None:
        out.append(f"wall time: {wall:.0f} s")
    out += ["", f"{'task':24s} {'state':16s} {'seconds':>8s}"]
    for t in task_states(run_id) if tasks is None else tasks:
        out.append(f"{t.task_id:24s} {t.state:16s} {t.duration if t.duration is not None else float('nan'):8.1f}")

    def step_summary(step: Step) -> dict | None:
        return read_json(layout.folder(step).summary) if layout.is_done(step) else None

    gates = [step for step in Step if hasattr(VIEWS[step], "data_docs")]  # the gates' views know their Data Docs
    out.extend(data_docs_lines(layout, {step: s for step in gates if (s := step_summary(step)) is not None}))
    if (ev := step_summary(Step.EVALUATE)) is not None:
        out += ["", f"eval on held-out queries ({ev['n_eval_queries']}):"]
        out.extend(metrics_table(ev["systems"]))
    if (idx := step_summary(Step.BUILD_INDEX)) is not None:
        out.append("")
        out.append(f"index: {idx['factory']} with {idx['ntotal']} products (dim {idx['dim']}), "
                   f"recall@10 vs exact {idx['recall@10_vs_exact']:.3f}"
                   + (f" (gate >= {idx['min_recall_at_10']:g}: {'passed' if idx.get('passed') else 'FAILED'})"
                      if "min_recall_at_10" in idx else ""))
    if (emb := step_summary(Step.BACKFILL_EMBEDDINGS)) is not None and "n_embedded" in emb:
        out.append(f"backfill: {emb['n_embedded']} products embedded, {emb['n_reused']} reused (unchanged content and model)")
    if (reg := step_summary(Step.REGISTER_MODEL)) is not None:
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(reg["aliases"].items()))
        out.append(f"registered: {reg['model_name']} version {reg['version']} (aliases: {aliases}); {reg['decision']['reason']}")
        out.extend(f"  -> {reg['model_name']}@{alias}" for alias, version in sorted(reg["aliases"].items()) if version == reg["version"])
    if layout.is_done(Step.EVALUATE):
        report = read_json(layout.evaluation().report)
        out += ["", "top-5 for sample queries:"]
        for q, hits in report["sample_queries"].items():
            out.append(f"  {q!r}:")
            out.extend(f"      {h['product_id']}  {h['title'] or '(image-only product)'}  [{h['category']}]" for h in hits)
    out += ["", f"run folder: {layout.paths.run_uri}"]
    register_config_secrets(cfg.to_dict())
    return [redact_text(line) for line in out]  # the console is outside the process too: same rule as logs and XComs
