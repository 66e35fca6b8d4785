# Two commands do everything on a fresh machine:
#   make demo   install into .venv if needed, then run the main job on the built-in corpus
#   make test   install into .venv if needed, then run the whole test suite on 2 cores
#   make bench  the side-by-side benchmarks; writes docs/benchmarks.md
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp depends on what defines the install, so editing setup.py or constraints.txt reinstalls,
# and a second `make` with nothing changed installs nothing.
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/demo

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo --config configs/demo.py --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 tests

# CPU-sized benchmarks, under 10 minutes (the first run also pretrains the store benchmark's teacher):
# writes docs/benchmarks.md, docs/bench_*.png and docs/store.md
bench: $(STAMP)
	$(PY) -m benchmarks.run_all --out docs

clean:
	rm -rf $(VENV) workdirs
