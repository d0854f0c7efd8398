"""The console of ``dashclip run`` (orchestration/console.py): step lines, progress, error tails; no Airflow needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from orchestration.console import LogFollower, StepReporter, error_tail, format_seconds, progress_message, step_line
from orchestration.runs import TaskState, in_run_order

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ti(task_id: str, state: str, start: float | None = None, end: float | None = None, try_number: int = 1) -> TaskState:
    at = (lambda s: None if s is None else T0 + timedelta(seconds=s))
    return TaskState(task_id, state, at(start), at(end), None if end is None or start is None else end - start, try_number)


def test_format_seconds() -> None:
    assert format_seconds(None) == "-"
    assert format_seconds(8.24) == "8.2 s"
    assert format_seconds(65.4) == "1m 05s"
    assert format_seconds(3600) == "60m 00s"


def test_step_line_names_state_and_time() -> None:
    assert step_line("train_stage1", "success", 65.0).split() == ["ok", "train_stage1", "success", "1m", "05s"]
    assert step_line("validate_catalog", "failed", 3.25).split() == ["FAIL", "validate_catalog", "failed", "3.2", "s"]
    assert step_line("label_pairs", "success", 2.0, try_number=2).endswith("(try 2)")
    assert step_line("build_index", "upstream_failed", None).split()[:3] == ["--", "build_index", "upstream_failed"]


def test_progress_message_from_airflow_and_ray_lines() -> None:
    airflow = ("2026-12-02T05:14:23.399813Z [info     ] cross-encoder fit: epoch 1/4, mean loss 1.0892 "
               "[dashclip_core.labeling.cross_encoder] loc=cross_encoder.py:294")
    assert progress_message(airflow) == "cross-encoder fit: epoch 1/4, mean loss 1.0892"
    ray = "\x1b[36m(RayTrainWorker pid=12597)\x1b[0m stage1 epoch 2/4: loss 3.2100, 41.0 samples/s"
    assert progress_message(ray) == "stage1 epoch 2/4: loss 3.2100, 41.0 samples/s"
    assert progress_message("(pid=1) PlacementGroupCleaner: Failed to query Ray Train Controller actor state, epoch 1/2") is None
    assert progress_message("2026-12-02T05:10:21Z [info     ] Task started [airflow] loc=x.py:1") is None


def test_reporter_prints_each_end_once_and_progress_every_interval() -> None:
    rep = StepReporter(every=20)
    assert rep.update([ti("extract_catalog", "running", 0)], T0 + timedelta(seconds=5)) == []
    first = rep.update([ti("extract_catalog", "success", 0, 8.2), ti("label_pairs", "running", 9)], T0 + timedelta(seconds=10))
    assert [r.line.split()[:3] for r in first] == [["ok", "extract_catalog", "success"]]
    assert first[0].ended.task_id == "extract_catalog" and not first[0].failed

    rep.saw_log_lines(["noise", "2026 [info     ] cross-encoder fit: epoch 2/4, mean loss 0.5 [x] loc=y"], T0 + timedelta(seconds=25))
    states = [ti("extract_catalog", "success", 0, 8.2), ti("label_pairs", "running", 9)]
    progress = rep.update(states, T0 + timedelta(seconds=30))
    assert len(progress) == 1 and progress[0].ended is None
    assert progress[0].line.split()[:4] == ["..", "label_pairs", "running", "21.0"]
    assert progress[0].line.endswith("cross-encoder fit: epoch 2/4, mean loss 0.5")
    assert rep.update(states, T0 + timedelta(seconds=35)) == []  # not again before `every` seconds
    assert len(rep.update(states, T0 + timedelta(seconds=50))) == 1

    failed = rep.update([ti("extract_catalog", "success", 0, 8.2), ti("label_pairs", "failed", 9, 60), ti("train_stage1", "upstream_failed")],
                        T0 + timedelta(seconds=61))
    assert [r.line.split()[0] for r in failed] == ["FAIL", "--"]
    assert failed[0].failed and not failed[1].failed


def test_progress_seen_before_a_step_started_is_not_shown_for_it() -> None:
    rep = StepReporter(every=20)
    rep.saw_log_lines(["stage1 epoch 4/4: loss 1.0, 9.0 samples/s"], T0 + timedelta(seconds=1))
    (line,) = rep.update([ti("train_stage2", "running", 2)], T0 + timedelta(seconds=30))
    assert "stage1" not in line.line


def test_a_retry_reports_again() -> None:
    rep = StepReporter()
    assert rep.update([ti("label_pairs", "up_for_retry", 0, 5)], T0)[0].failed
    again = rep.update([ti("label_pairs", "success", 130, 140, try_number=2)], T0 + timedelta(seconds=141))
    assert again[0].line.split()[:3] == ["ok", "label_pairs", "success"] and again[0].line.endswith("(try 2)")


def test_tasks_that_ran_come_first_in_start_order_then_the_rest_in_dag_order() -> None:
    states = [ti("train_stage1", "upstream_failed", 30, 30), ti("validate_catalog", "failed", 10, 12), ti("label_pairs", "upstream_failed", 29, 29),
              ti("extract_catalog", "success", 0, 9), ti("register_model", "none")]
    assert [t.task_id for t in in_run_order(states)] == ["extract_catalog", "validate_catalog", "label_pairs", "train_stage1", "register_model"]


def test_error_tail_starts_at_the_last_error_and_drops_noise() -> None:
    lines = ["[info     ] fine", "Traceback (most recent call last):", '  File "a.py", line 1', "ValueError: old",
             "2026-12-02T05:32:35.1Z [info     ] more", "(pid=9) PlacementGroupCleaner: Failed to query Ray Train Controller actor state",
             "2026-12-02T05:32:35.2Z [error    ] Task failed with exception [task]", "Traceback (most recent call last):",
             '  File "steps.py", line 86, in validate_catalog', '    fail(f"catalog gate failed")',
             "AirflowFailException: catalog gate failed: 96 rows < 100000", "see report.json", "",
             "2026-12-02T05:32:35.3Z [info     ] ::group::Post Execute [task]", "2026-12-02T05:32:36Z [info     ] DagRun Finished", "DagRun failed"]
    tail = error_tail(lines, n=12)
    assert tail[0] == "Traceback (most recent call last):" and tail[-2:] == ["AirflowFailException: catalog gate failed: 96 rows < 100000", "see report.json"]
    assert error_tail(lines, n=2) == tail[-2:]
    assert error_tail(["a", "2026 [error    ] boom", "detail", "b"], n=5) == ["2026 [error    ] boom", "detail", "b"]
    assert error_tail(["a", "(pid=1) PlacementGroupCleaner: Failed to query Ray Train Controller", "b", "c"], n=2) == ["b", "c"]
    assert error_tail([]) == []


def test_log_follower_reads_only_new_complete_lines(tmp_path) -> None:
    log = tmp_path / "run.log"
    follower = LogFollower(log)
    assert follower.new_lines() == []  # not created yet
    log.write_bytes(b"one\ntwo\rthree\npart")
    assert follower.new_lines() == ["one", "two", "three"]
    with open(log, "ab") as f:
        f.write(b"ial\nfour\n")
    assert follower.new_lines() == ["partial", "four"]
    assert follower.new_lines() == []
