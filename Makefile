# kipnb: two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= build/run
PIN    := requirements/ci.txt
STAMP  := $(VENV)/.installed
# glibc keeps freed host memory mapped: XLA:CPU otherwise page-faults its ~240 MB scratch
# memory in again on every training step (~40 % of a ConvNet step's CPU time; results are
# bit-identical). See kipnb.experts.reuse_host_memory.
export MALLOC_ARENA_MAX = 1
export MALLOC_MMAP_MAX_ = 0
export MALLOC_TRIM_THRESHOLD_ = 2147483647

# setuptools prints an "Editable installation" notice (about same-named folders in the
# working directory) on every editable install, even under -q; it asks nothing of a user.
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: run test setup data lint lab bench clean pin student grade repro repro-readme ntenv

run: $(STAMP) data          ## execute every notebook on Fashion-MNIST into $(OUT)
	$(BIN)/python -m kipnb.run --output $(OUT)

NTENV ?= build/ntenv
$(NTENV)/bin/python:        # neural-tangents 0.6.5 in its own pinned environment (kernel_speed rows, NT fixtures)
	$(PYTHON) -m venv $(NTENV)
	$(NTENV)/bin/pip install -q jax==0.4.30 jaxlib==0.4.30 neural-tangents==0.6.5 \
	    tf2jax==0.3.6 "tensorflow-cpu==2.17.*" "numpy<2"
ntenv: $(NTENV)/bin/python  ## the pinned neural-tangents 0.6.5 environment in build/ntenv

REPRO_OUT ?= build/repro
repro: $(STAMP) data $(NTENV)/bin/python ## every cpu row of every repro/ spec (1-2 h on 2 cores by host: 61 and 127 min measured; reruns reuse) -> results/
	MPLBACKEND=agg $(BIN)/python -m kipnb.run --repro all --profile cpu -o $(REPRO_OUT) --keep-going
	$(BIN)/python -m kipnb.repro readme

repro-readme: $(STAMP)      ## results/ from the specs' current published figures, then README's tables
	$(BIN)/python -m kipnb.repro refresh
	$(BIN)/python -m kipnb.repro readme

TEST_WORKERS ?= 2
test: $(STAMP)              ## the whole suite, notebooks included ($(TEST_WORKERS) pytest-xdist workers, one test file each)
	MPLBACKEND=agg $(BIN)/python -m pytest tests -q --durations=10 -n $(TEST_WORKERS) --dist loadfile

setup: $(STAMP)

$(STAMP): pyproject.toml $(PIN)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(QUIET_EDITABLE) $(BIN)/python -m pip install -q -c $(PIN) -e ".[dev,course]"
	touch $(STAMP)

data: $(STAMP)              ## find Fashion-MNIST (Debian package, cache) or download it with checksums
	$(BIN)/python -m kipnb.data fetch fashion_mnist

student: $(STAMP)           ## student copies of the notebooks (nbgrader preprocessors) into build/student
	$(BIN)/python -m kipnb.course student --output build/student

SUBMISSIONS ?= submitted
grade: $(STAMP)             ## execute $(SUBMISSIONS)/<student>/*.ipynb with hidden tests -> build/grades/scores.{csv,md}
	$(BIN)/python -m kipnb.course grade $(SUBMISSIONS) --output build/grades $(GRADE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check kipnb tests benchmarks notebooks

lab: $(STAMP)               ## JupyterLab on the notebooks
	$(QUIET_EDITABLE) $(BIN)/python -m pip install -q -c $(PIN) -e ".[dev,lab]"
	$(BIN)/jupyter lab notebooks

pin:                        ## re-pin the newest versions the registry serves (then run make test)
	rm -rf build/pin && $(PYTHON) -m venv build/pin
	build/pin/bin/python -m pip install -q --upgrade pip
	build/pin/bin/python -m pip install -q -e ".[dev,course]"
	build/pin/bin/python -m pip freeze --exclude-editable | grep -v '^kipnb' > $(PIN)

clean:
	rm -rf build $(VENV)
