# dashclip — the README's two commands: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
CONFIG ?= configs/demo.yaml
PIP := $(BIN)/pip --disable-pip-version-check -q
IMPORT_CHECK := import torch, airflow, ray, mlflow, faiss, great_expectations, transformers, openai, bm25s, dashclip_core, orchestration

# The venv's console scripts first: `airflow standalone` starts its components as `airflow …` subprocesses.
export PATH := $(BIN):$(PATH)

# All local state lives in one ignored folder.
export DASHCLIP_HOME ?= $(CURDIR)/.dashclip
export AIRFLOW_HOME ?= $(DASHCLIP_HOME)/airflow
export AIRFLOW_CONFIG ?= $(CURDIR)/airflow.cfg
export AIRFLOW__CORE__DAGS_FOLDER ?= $(CURDIR)/dags
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN ?= sqlite:///$(AIRFLOW_HOME)/airflow.db
export MLFLOW_TRACKING_URI ?= sqlite:///$(DASHCLIP_HOME)/mlflow/mlflow.db
# Offline by default: nothing is downloaded at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S := 0.2
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER := 0
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::DeprecationWarning

.PHONY: install run test test-fast drills airflow mlflow lock lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) install torch==2.13.0 -c constraints.txt 2>&1 | grep -v '^WARNING: Location' || true
	$(PIP) install -r requirements-dev.txt -c requirements.lock 2>&1 | grep -v '^WARNING: Location' || true
	$(PIP) install --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
	# import check; quiet on success (faiss's loader logs its CPU probing), the traceback on failure
	$(BIN)/python -c "$(IMPORT_CHECK)" > /dev/null 2>&1 || $(BIN)/python -c "$(IMPORT_CHECK)"
	touch $@

install: $(VENV)/.installed

$(AIRFLOW_HOME)/airflow.db: | $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (tail -20 $(AIRFLOW_HOME)/db-migrate.log; exit 1)

run: install $(AIRFLOW_HOME)/airflow.db
	$(BIN)/dashclip run --config $(CONFIG)

# Import contracts first (pyproject [tool.importlinter]: seconds), then the tests.
# The drills' pytest wrappers (tests/drills, marker `drill`) are left to `make drills`, which runs the same
# drills; `.ci/run` runs both targets. `pytest tests/drills` runs the wrappers on their own.
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not drill"

# Fault drills (README "Fault drills"): one row per injected fault; exit 1 unless every row lost 0 data.
drills: install
	$(BIN)/python -m drills

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The API server and the task runners must sign/verify task tokens with one secret; generated once,
# kept in the ignored state folder (never in git).
$(AIRFLOW_HOME)/jwt_secret:
	mkdir -p $(AIRFLOW_HOME)
	umask 077; $(PY) -c "import secrets; print(secrets.token_urlsafe(48))" > $@

# Airflow UI on http://127.0.0.1:8080 (trigger dashclip_nightly with its params form). Bound to this machine only,
# with a login: user admin, its password generated and printed by the first start, then kept (mode 600, umask)
# in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated. tests/test_airflow_ui.py starts the API
# server with this recipe's variables.
airflow: install $(AIRFLOW_HOME)/airflow.db $(AIRFLOW_HOME)/jwt_secret
	@echo "Airflow UI: http://127.0.0.1:8080  user: admin  password: printed below on the first start, then in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated"
	umask 077; AIRFLOW__API_AUTH__JWT_SECRET="$$(cat $(AIRFLOW_HOME)/jwt_secret)" AIRFLOW__API__HOST=127.0.0.1 \
		AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=admin:admin \
		$(BIN)/airflow standalone

# MLflow UI on http://localhost:5000 (runs, curves, registered models and aliases).
mlflow: install
	mkdir -p $(DASHCLIP_HOME)/mlflow
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

lock: install
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//' > requirements.lock

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(DASHCLIP_HOME)
