"""Orchestration at the edge: the ``dashclip`` console script, running the DAG locally and reading Airflow's
record of its runs.

Layers (each imports only the ones below it): ``orchestration`` -> ``dags`` / ``tasks`` -> ``dashclip_core``.
``dashclip_core`` never imports this package or ``tasks``; Airflow is imported here only inside functions,
so ``dashclip embed/search/evaluate`` start without it.
"""
