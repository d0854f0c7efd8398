"""The LLM API's URL and key come from an Airflow connection (here an AIRFLOW_CONN_* env var)."""

from __future__ import annotations

import json

import pytest

from tasks.connections import credentials_from_airflow_connection

KEY = "sk-test-Zq81secret"


def test_credentials_from_airflow_connection(monkeypatch):
    conn = {"conn_type": "http", "host": "llm.internal", "schema": "http", "port": 8443, "password": KEY}
    monkeypatch.setenv("AIRFLOW_CONN_DASHCLIP_LLM_TEST", json.dumps(conn))
    assert credentials_from_airflow_connection("dashclip_llm_test") == ("http://llm.internal:8443/v1", KEY)


def test_a_missing_connection_raises_airflow_not_found():
    from airflow.sdk.exceptions import AirflowNotFoundException

    with pytest.raises(AirflowNotFoundException):
        credentials_from_airflow_connection("dashclip_llm_no_such_connection")
