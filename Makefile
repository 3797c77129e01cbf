# EditForge — two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

# Everything runs offline, with Prefect's state kept under the project.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW := ignore
export EDITFORGE_CACHE := $(CURDIR)/.cache/editforge

.PHONY: install browser demo demo-tiny config-docs world-models test test-fast lint docs docs-build bench bench-scale bench-captions bench-fanout bench-world reliability server deploy worker lock compat clean

install: $(STAMP)

# (Re)create the virtualenv when it is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# The data pipeline, then the separate training flow on the shards it wrote, on the synthetic world
# (tasks/world): small models trained on drawn shapes, shipped in tasks/world/weights/.
demo: $(STAMP)
	$(PY) -m flows.generate --preset world
	$(PY) -m flows.train --preset world

# The same on random-init tiny models (the `demo` preset the tests use: noise images, relaxed thresholds,
# the DINOv2/SSIM rungs on).
demo-tiny: $(STAMP)
	$(PY) -m flows.generate --preset demo
	$(PY) -m flows.train --preset demo

# docs/config.md from the config model (tests/tasks/common/test_config_docs.py fails when it is stale)
config-docs: $(STAMP)
	$(PY) -m tasks.common.config_docs > docs/config.md

# Rebuild the shipped world models (deterministic; about 15 CPU-minutes).
world-models: $(STAMP)
	$(PY) -m tasks.world.build

# the browser the UI tests drive (Debian's chromium; playwright is told its path, it downloads nothing)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# two pytest workers, a test file each at a time (a module's server and workers stay in one process)
test: $(STAMP) browser
	$(VENV)/bin/ruff check flows tasks prompts seed_annotations tests bench
	$(VENV)/bin/ruff format --check flows tasks prompts seed_annotations tests bench
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/mkdocs build --strict
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not flow and not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check flows tasks prompts seed_annotations tests bench
	$(VENV)/bin/ruff format --check flows tasks prompts seed_annotations tests bench
	$(VENV)/bin/lint-imports --no-logo

# The docs site (mkdocs.yml): `make docs` serves it on http://127.0.0.1:8000 (DOCS_ADDR to change);
# `make docs-build` (also run by `make test`) builds it into .cache/site, failing on a broken link or a missing page
# (not --quiet: it hides the warnings that --strict turns into a failure).
DOCS_ADDR ?= 127.0.0.1:8000
docs: $(STAMP)
	$(VENV)/bin/mkdocs serve --dev-addr $(DOCS_ADDR)

docs-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# The throughput benchmarks (minutes); the scale rehearsals have their own targets (tens of minutes each).
bench: $(STAMP)
	$(PY) bench/text_throughput.py
	$(PY) bench/render_throughput.py
	$(PY) bench/judge_throughput.py

bench-scale: $(STAMP)
	$(PY) bench/scale.py

bench-captions: $(STAMP)
	$(PY) bench/captions_scale.py

bench-fanout: $(STAMP)
	$(PY) bench/fanout.py

bench-world: $(STAMP)
	$(PY) bench/world_pass_rates.py
	$(PY) bench/review_world.py
	$(PY) bench/world_lm.py

# Kill every stage at 20 seeded points, resume, compare every output byte (bench/reliability.py).
reliability: $(STAMP)
	$(PY) bench/reliability.py

# A cluster (docs/cluster.md; infra/walkthrough.sh runs these in order). Every target talks to the server
# an exported PREFECT_API_URL names (default http://127.0.0.1:4200/api); `make server` listens on its host and
# port, with PREFECT_UI_API_URL (default: the same URL) set before it starts and its state in
# PREFECT_SERVER_HOME. GPUS: GPU partitions at once across the server (the editforge-gpu tag's limit);
# POOL_TYPE=kubernetes: the Kubernetes pools editforge-k8s-*; POOL / NAME: the pool and name of a worker.
API_URL     := $(or $(PREFECT_API_URL),http://127.0.0.1:4200/api)
UI_API_URL  := $(or $(PREFECT_UI_API_URL),$(API_URL))
API_HOSTPORT := $(firstword $(subst /, ,$(patsubst https://%,%,$(patsubst http://%,%,$(API_URL)))))
SERVER_HOST ?= $(firstword $(subst :, ,$(API_HOSTPORT)))
SERVER_PORT ?= $(or $(word 2,$(subst :, ,$(API_HOSTPORT))),4200)
PREFECT_SERVER_HOME ?= $(CURDIR)/.prefect-server
# the flow runs' heartbeats (every 30 s each, for the zombie automation) kept an hour (docs/monitoring.md)
HEARTBEAT_RETENTION := {"prefect.flow-run.heartbeat": 3600}
GPUS      ?= 1
POOL_TYPE ?= process
POOL      ?= editforge-cpu
server: $(STAMP)
	PREFECT_HOME=$(PREFECT_SERVER_HOME) PREFECT_API_URL=$(API_URL) PREFECT_UI_API_URL=$(UI_API_URL) \
		PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES='$(HEARTBEAT_RETENTION)' \
		$(VENV)/bin/prefect server start --host $(SERVER_HOST) --port $(SERVER_PORT)

deploy: $(STAMP)
	PREFECT_API_URL=$(API_URL) $(PY) -m flows.deploy --gpus $(GPUS) $(if $(filter kubernetes,$(POOL_TYPE)),--kubernetes)

worker: $(STAMP)
	PREFECT_API_URL=$(API_URL) $(VENV)/bin/prefect worker start --pool $(POOL) --limit 1 $(if $(NAME),--name $(NAME))

# infra/requirements.lock (the image's pinned packages) from this venv's resolved versions, after a pyproject change
# (the image-only packages the dev venv lacks, e.g. bitsandbytes, are installed aside into .cache/lock-extras)
lock: $(STAMP)
	@missing="$$($(PY) infra/lock.py --missing)"; [ -z "$$missing" ] || \
		eval $(PY) -m pip install --quiet --disable-pip-version-check --no-deps --target .cache/lock-extras $$missing
	PYTHONPATH=$(CURDIR)/.cache/lock-extras $(PY) infra/lock.py

# The demo's trained model on an older stack: transformers 4.x and diffusers 0.32 (no deps: torch and the rest
# are the project's) in .compat/, ahead of the project's own on PYTHONPATH (infra/compat_check.py).
COMPAT := "transformers==4.46.3" "diffusers==0.32.2" "huggingface_hub==0.26.5" "tokenizers==0.20.3"
compat: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target .compat $(COMPAT)
	@ls -d runs/demo/train/*/part-00000/model >/dev/null 2>&1 || $(MAKE) demo
	PYTHONPATH=$(CURDIR)/.compat $(PY) infra/compat_check.py "$$(ls -dt runs/demo/train/*/part-00000/model | head -1)" \
		"$$($(PY) -c 'from tasks.common.tiny import ensure_tiny; print(ensure_tiny("diffusion"))')"

clean:
	rm -rf runs .prefect .cache
