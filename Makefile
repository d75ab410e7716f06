# etbench: `make test` and `make bench` are all a new user needs (README.md).
# Setup installs $(TORCH_SPEC) *before* the project, so pip never pulls a CUDA build of torch
# on a CPU box; on a GPU machine pass e.g. TORCH_SPEC='torch==2.11.0 --index-url ...'.  A machine
# with no package index but a CUDA torch installs from a wheelhouse instead (`make wheelhouse`
# where there is an index, then `make setup WHEELHOUSE=dir` there: see "Offline GPU machines").

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# A folder made by `make wheelhouse`: `make setup WHEELHOUSE=dir` installs from it with no index,
# into a venv that sees $(PYTHON)'s own torch (--system-site-packages), and never replaces that torch.
WHEELHOUSE ?=
# Where `make wheelhouse` puts it, and for which Python (the GPU box's).
WHEELHOUSE_OUT ?= dist/wheelhouse
WHEELHOUSE_PYTHON ?= 3.12
WHEELHOUSE_MAX_MIB ?= 40
PROFILE ?= quick
# The device whose peak FLOP/s is re-probed around `make bench` (the quick profile runs on the CPU).
BENCH_DEVICE ?= $(if $(filter quick,$(PROFILE)),cpu,auto)
STAMP := $(VENV)/.etbench-stamp
# What the venv's torch came from: $(TORCH_SPEC), or the wheelhouse (whose torch is the
# interpreter's own).  Rewritten only when a spec or wheelhouse is *given* (command line or
# environment) and differs, so `make setup TORCH_SPEC=...` reinstalls torch while a later plain
# `make test` keeps whatever the venv was set up with.
TORCH_SPEC_FILE := $(VENV)/.torch-spec
SPEC_RECORDED := $(strip $(file < $(TORCH_SPEC_FILE)))
SPEC_GIVEN := $(filter-out default file undefined,$(origin TORCH_SPEC))
# A venv set up from a wheelhouse stays on it (a changed pyproject.toml reinstalls from it too).
ifeq ($(WHEELHOUSE)$(SPEC_GIVEN),)
ifeq ($(firstword $(SPEC_RECORDED)),wheelhouse)
WHEELHOUSE := $(word 2,$(SPEC_RECORDED))
endif
endif
SETUP_KEY := $(strip $(if $(WHEELHOUSE),wheelhouse $(abspath $(WHEELHOUSE)),$(TORCH_SPEC)))
ifeq ($(wildcard $(TORCH_SPEC_FILE)),)
SPEC_CHANGED := missing
else ifneq ($(WHEELHOUSE)$(SPEC_GIVEN),)
ifneq ($(SPEC_RECORDED),$(SETUP_KEY))
SPEC_CHANGED := changed
endif
endif
ASV := $(PY) -m asv
ASV_CONF := asv.conf.json
COMMIT = $(shell git rev-parse HEAD)
SHORT = $(shell git rev-parse --short=12 HEAD)
RUNS = results/runs/$(SHORT)
PLOTS = results/plots/$(SHORT)
HTML_DIR := results/html
SITE_CACHE := .cache/site-vendor
PREVIEW_PORT ?= 8000
RANGE ?= HEAD~1..HEAD
# asv stores and graphs results per machine name: the profile is part of it, so quick and full
# numbers never land on one graph.
ASV_MACHINE ?= $(shell hostname)-$(PROFILE)
# torch.compile caches stay inside the project, not in /tmp.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
# So are DeepSpeed's JIT-built ops (built by `make setup`): a cache shared by two environments is
# rebuilt by each in turn (its build flags name the environment's torch).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: setup test bench history publish preview check-site clean wheelhouse gpu-check FORCE

# The FORCE-and-compare idiom, compared when make reads this file (so `make -n` and `make -q`
# tell the truth too): the spec file is remade -- and with it $(STAMP) -- only when it is missing
# or a spec/wheelhouse was given that differs from the one recorded.
ifneq ($(SPEC_CHANGED),)
$(TORCH_SPEC_FILE): FORCE
endif
$(TORCH_SPEC_FILE):
	@mkdir -p $(VENV)
	@if [ -f $@ ]; then echo "setup: torch was '$$(cat $@)', now '$(SETUP_KEY)': setting the venv up again"; fi
	@printf '%s\n' '$(SETUP_KEY)' >$@
	@# a venv set up before its spec was recorded had the default one: nothing to redo for it
	$(if $(and $(filter missing,$(SPEC_CHANGED)),$(filter torch==2.13.0,$(SETUP_KEY))),@if [ -f $(STAMP) ]; then touch -r $(STAMP) $@; fi)

FORCE:

$(STAMP): pyproject.toml $(TORCH_SPEC_FILE)
ifeq ($(WHEELHOUSE),)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# a changed spec: the old torch goes first (pip keeps an installed 2.13.0+cpu for 'torch==2.13.0 --index-url .../cu130')
	$(if $(filter changed,$(SPEC_CHANGED)),$(PY) -m pip uninstall -q -y torch)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,slurm,ray]'
else
	@# offline: the interpreter's own (CUDA) torch, visible through --system-site-packages, pinned
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m impls.wheelhouse install $(WHEELHOUSE)
endif
	@# DeepSpeed JIT-compiles its CPU Adam (ZeRO-Offload) on first use (~45 s per environment):
	@# built here, so no benchmark or test pays for it (a failed build is recorded: the zero
	@# technique then refuses offload_optimizer=cpu with its reason).
	$(PY) -m impls.engines.deepspeed_ops
	touch $@

setup: $(STAMP)

# A folder of wheels for `make setup WHEELHOUSE=...` on a machine with no package index and its
# own CUDA torch: every dependency but torch (and triton, nvidia-*, cuda-*), for CPython
# $(WHEELHOUSE_PYTHON) manylinux x86_64, at this venv's versions, within $(WHEELHOUSE_MAX_MIB) MiB
# (MANIFEST.txt there: the wheels, and what was left out and why).
wheelhouse: $(STAMP)
	$(PY) -m impls.wheelhouse build $(WHEELHOUSE_OUT) --python $(WHEELHOUSE_PYTHON) --max-mib $(WHEELHOUSE_MAX_MIB)

test: $(STAMP)
	$(PY) -m pytest -q

# Benchmark the working tree (profile $(PROFILE)) in this environment, then plots and the site.
# BENCH=regex limits the suites, e.g. `make bench BENCH=BaselineStep`.  asv forks every benchmark
# from a server that has imported the suites -- and with them torch, the training loop and the
# profile's synthetic data (benchmarks/common.py: preload; no kernel has run, no thread pool is
# up) -- instead of starting a new interpreter per parameter combination: ~0.02 s instead of ~0.2 s
# each, and no setup_cache pays for the imports again.
bench: $(STAMP)
ifneq ($(DRY_RUN),)
	@# Plan instead of running: every recipe of every class validated on `meta` for the target,
	@# with its predicted time and peak memory (benchmarks/dry_run.py; DRY_RUN_ARGS e.g.
	@# '--gpus 8 --memory 80GiB --flops bfloat16=350e12,float32=40e12').  Nothing trains.
	$(PY) -m benchmarks.dry_run --profile $(PROFILE) $(DRY_RUN_ARGS)
else
	@t0=$$(date +%s); \
	$(ASV) machine --yes --machine $(ASV_MACHINE) --config $(ASV_CONF) >/dev/null && \
	$(PY) -m impls.cli peak --device $(BENCH_DEVICE) --bench-log $(PLOTS)/peak.json --phase start && \
	t1=$$(date +%s) && \
	ETBENCH_PROFILE=$(PROFILE) ETBENCH_RUNS_DIR=$(CURDIR)/$(RUNS) ETBENCH_BENCH_RUN=$$t0-$$$$ \
	  $(ASV) run --config $(ASV_CONF) --machine $(ASV_MACHINE) --python=same --set-commit-hash $(COMMIT) --show-stderr \
	  --launch-method forkserver \
	  $(if $(BENCH),--bench '$(BENCH)') && \
	t2=$$(date +%s) && \
	$(PY) -m impls.cli peak --device $(BENCH_DEVICE) --bench-log $(PLOTS)/peak.json --phase end && \
	t3=$$(date +%s) && \
	{ if [ -d $(RUNS) ]; then $(PY) -m impls.report $(RUNS) -o $(PLOTS); \
	  else echo "no run records: the selected suites ($(BENCH)) train nothing, so no plots"; fi; } && \
	t4=$$(date +%s) && \
	$(PY) -m impls.benchtime --machine $(ASV_MACHINE) --commit $(COMMIT) --out $(PLOTS)/bench_time.json \
	  --phase "peak probes=$$(( t1 - t0 + t3 - t2 ))" --phase "asv=$$(( t2 - t1 ))" --phase "report=$$(( t4 - t3 ))" \
	  >$(PLOTS)/bench_time.txt && \
	$(MAKE) --no-print-directory publish && \
	t5=$$(date +%s) && \
	cat $(PLOTS)/bench_time.txt && echo "  phase publish                                    $$(( t5 - t4 )).0 s" && \
	echo "make bench: done in $$(( t5 - t0 )) s; plots in $(PLOTS), site in $(HTML_DIR): browse with 'make preview'"
endif

# Benchmark past commits, each installed in its own pinned virtualenv (asv.conf.json).
history: $(STAMP)
	$(ASV) machine --yes --machine $(ASV_MACHINE) --config $(ASV_CONF) >/dev/null
	ETBENCH_PROFILE=$(PROFILE) ETBENCH_RUNS_DIR=$(CURDIR)/results/runs/history \
	  $(ASV) run --config $(ASV_CONF) --machine $(ASV_MACHINE) --show-stderr $(RANGE)
	$(MAKE) --no-print-directory publish

# asv's site, whose front page becomes etbench's report (asv's own index moves to asv.html): per
# family the tables, interactive plots (Vega-Lite) and the PNGs of the newest results/runs/<commit>,
# results/plots/<commit> and results/isoflop/<commit>-*, and compare.html against the commit before.
# asv 0.6's pages load jQuery/flot/bootstrap from CDNs and the report names Vega's: `vendor` replaces
# them with copies from pinned npm registry packages (cached in $(SITE_CACHE), so later publishes
# work offline).
publish: $(STAMP)
	$(ASV) publish --config $(ASV_CONF)
	$(PY) -m impls.site build $(HTML_DIR) --runs-root results/runs --plots-root results/plots --isoflop-root results/isoflop
	$(PY) -m impls.site vendor $(HTML_DIR) --cache $(SITE_CACHE)

# Served over HTTP (asv's pages fetch JSON with XHR, which browsers refuse for file://), on 127.0.0.1 only.
preview:
	@test -f $(HTML_DIR)/index.html || { echo "no $(HTML_DIR)/index.html: run 'make bench' first"; exit 1; }
	@echo "Serving $(HTML_DIR) at http://127.0.0.1:$(PREVIEW_PORT)/  (Ctrl-C to stop)"
	@$(PY) -m http.server --bind 127.0.0.1 --directory $(HTML_DIR) $(PREVIEW_PORT)

# Render the published site in headless Chromium (apt-get install -y chromium) and screenshot it:
# the front page (results/site.png) and asv's page (results/site-asv.png).
check-site: $(STAMP)
	$(PY) -m impls.site check $(HTML_DIR) --screenshot results/site.png --asv-screenshot results/site-asv.png

# Every CUDA path once (issue 22): a PASS / FAIL / REFUSED table with the key numbers and every
# run's record (~5 min on one H100, ~30 s on a CPU, where the GPU rows are refused with reasons).
GPU_CHECK_OUT ?= results/gpu-check/$(shell hostname)-$(shell date +%Y%m%d-%H%M%S)
gpu-check: $(STAMP)
	$(PY) -m impls.gpucheck --out $(GPU_CHECK_OUT)

clean:
	rm -rf results/asv results/html results/runs results/plots results/gpu-check .asv
