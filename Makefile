# The two commands of a newcomer: `make demo` and `make test`. Both create .venv when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nanosil-installed
# xTB and BLAS threads: parallelism comes from processes (see ../shared/notes), never oversubscribe.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements-setup.txt driver/models/_gm_kernels.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-setup.txt
	$(PY) -m pip install --quiet -e '.[pyscf,dev]'
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

test: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo_output .pytest_cache
