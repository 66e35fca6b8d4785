# Two commands do everything on a fresh machine:
#   make demo   install into .venv if needed, then run the main job on the built-in corpus
#   make test   install into .venv if needed, then run the whole test suite on 2 cores
#   make bench  the side-by-side benchmarks; writes docs/benchmarks.md
#   make diffusion / distillspec / cfg_distill: one experiment end to end at CPU size (docs/<name>.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp depends on what defines the install, so editing setup.py or constraints.txt reinstalls,
# and a second `make` with nothing changed installs nothing.
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/demo

.PHONY: install demo test bench diffusion distillspec cfg_distill clean

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

# Guided + progressive diffusion distillation on the 2-D mixture and the 8x8 digits (docs/diffusion.md)
diffusion: $(STAMP)
	$(PY) -m experiments.guided_distill --config configs/guided_distill.py:2d --workdir workdirs/diffusion/2d
	$(PY) -m experiments.guided_distill --config configs/guided_distill.py:digits --workdir workdirs/diffusion/digits
	$(PY) -m benchmarks.diffusion_summary --mixture workdirs/diffusion/2d --digits workdirs/diffusion/digits

# DistillSpec: target (the demo's teacher embedded at a real target's size), raw and distilled drafts,
# speculative decoding measured (docs/distillspec.md); reuses the `make demo` teacher when it exists
distillspec: $(STAMP)
	$(PY) -m experiments.distillspec --config configs/distillspec.py --workdir workdirs/distillspec

# Diversity-rewarded CFG distillation for LMs: conditional teacher, classifier, students, interpolation
# (docs/cfg_distill.md)
cfg_distill: $(STAMP)
	$(PY) -m experiments.cfg_distill --config configs/cfg_distill.py --workdir workdirs/cfg_distill

clean:
	rm -rf $(VENV) workdirs
