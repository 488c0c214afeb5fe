# Two commands do all the set-up on a fresh machine:
#   make demo   - venv + install + a demo pipeline end to end (no broker needed)
#   make test   - venv + install with test extras + lint, types and the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck docs install install-dev install-docs chromium wal2json rabbitmq package extras pythons bench bench-overhead clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[delta]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed $(VENV)/.installed-docs

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-docs: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@ $(VENV)/.installed

install-docs: $(VENV)/.installed-docs

demo: install
	$(PY) -m microstream.demo

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install-dev
	$(VENV)/bin/mypy

# The dashboard's browser test (tests/test_ui_browser.py) drives headless Chromium from
# Debian's packages; CI runs as root on a fresh Debian machine, so it is installed here.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "make: /usr/bin/chromium is missing and this is not root: the browser test will be skipped (apt-get install chromium)"; fi

# The PostgreSQL CDC tests decode the WAL with the wal2json plugin, packaged by Debian for the
# PostgreSQL 15 of the machine image; installed here as root, skipped by the tests otherwise.
wal2json:
	@if [ ! -x /usr/lib/postgresql/15/bin/postgres ] || [ -e /usr/lib/postgresql/15/lib/wal2json.so ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15-wal2json; \
	else echo "make: wal2json is missing and this is not root: the PostgreSQL CDC tests will be skipped (apt-get install postgresql-15-wal2json)"; fi

# The RabbitMQ stream tests start a private node of Debian's rabbitmq-server (its stream plugin
# is built in; the tests enable it for their node only). Installed here as root, skipped otherwise.
rabbitmq:
	@if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server; \
	else echo "make: rabbitmq-server is missing and this is not root: the RabbitMQ stream tests will be skipped (apt-get install rabbitmq-server)"; fi

# The documentation site (mkdocs.yml) into site/: --strict, so a broken link or anchor, a
# reference that does not resolve or a docstring that does not parse fails the build.
# The two variables only silence a notice mkdocs' plugins print on every build.
docs: install-docs
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict

test: lint typecheck docs chromium wal2json rabbitmq
	$(PY) -m pytest --durations=30 $(PYTEST_ARGS)

# Packaging (CI runs these after `make test`): the sdist and wheel build and pass
# `twine check`; each extra installs alone from the wheel into a fresh venv and works
# (.ci/check_extras.py); the core test set passes on the lowest and highest supported
# Python (pyenv's, as on this machine image), each in a venv made from the `test` extra.
package: install-dev
	rm -rf dist
	$(PY) -m build --outdir dist . >/dev/null
	$(VENV)/bin/twine check --strict dist/*

extras: package
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) .ci/check_extras.py $(EXTRAS)

# Engine, windows, joins, state and oracle tests; no service, no Spark (the kill
# matrices run on the main Python only).
CORE_TESTS := tests/test_oracle.py tests/test_window_oracle.py tests/test_windows.py \
	tests/test_watermark.py tests/test_stream_join.py tests/test_state.py \
	tests/test_keyed_rows.py tests/test_key_groups.py tests/test_physical_plan.py \
	tests/test_execution.py tests/test_frame.py tests/test_projection.py \
	tests/test_sessions_dedup.py tests/test_stateful_fn.py tests/test_chained_aggregation.py \
	tests/test_emit_triggers.py tests/test_edges_of_time.py tests/test_event_time_keys.py \
	tests/test_cumulate.py tests/test_checkpoint_checksums.py tests/test_range_commits.py \
	tests/test_top_k.py tests/test_match_recognize.py tests/test_match_recognize_oracle.py
PYTHONS ?= 3.10 3.13

pythons: install-dev
	@for v in $(PYTHONS); do \
		interp="$$(pyenv prefix $$v 2>/dev/null)/bin/python"; \
		if [ ! -x "$$interp" ]; then interp="$$(command -v python$$v || true)"; fi; \
		if [ -z "$$interp" ]; then echo "make: Python $$v is not installed (pyenv install $$v)"; exit 1; fi; \
		echo "== core tests on $$($$interp --version)"; \
		$(VENV)/bin/uv venv -q --allow-existing -p "$$interp" .venv-$$v && \
		$(VENV)/bin/uv pip install -q -p .venv-$$v/bin/python -e '.[test]' && \
		.venv-$$v/bin/python -m pytest -q -p no:cacheprovider -k "not sigkill" $(CORE_TESTS) || exit 1; \
	done

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@ $(VENV)/.installed

# Nexmark on every system (the bench extra brings the peers), then the latency run;
# rewrites the table in benchmarks/README.md and benchmarks/results/nexmark.png.
bench: $(VENV)/.installed-bench
	$(PY) benchmarks/nexmark/run.py --readme $(BENCH_ARGS)
	$(PY) benchmarks/nexmark/latency.py

bench-overhead: install
	$(PY) benchmarks/batch_overhead.py

clean:
	rm -rf $(VENV) .venv-3.* dist site demo_data .pytest_cache .mypy_cache .ruff_cache
