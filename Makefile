# The two commands of the README: `make demo` (run the workshop sequence, notebooks 01-06, into reports/)
# and `make test` (unit tests and the notebooks in smoke mode). `make appendix` runs notebook 07 (your own
# torchvision model) into reports/appendix; `make lab` opens the notebooks.
PY := .venv/bin/python

.PHONY: setup demo appendix prefetch lab test test-fast clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/run_notebooks.py --out reports

appendix: setup
	$(PY) scripts/run_notebooks.py --appendix --out reports/appendix

# Before a workshop: run the sequence and the appendix once at default settings, so every trained model,
# learned curve, PAM run, path, loss plane and merge result is in the cache ($$CCATOOLKIT_CACHE, default
# ~/.cache/ccatoolkit) and `make demo` is fast.
prefetch: setup
	$(PY) scripts/run_notebooks.py --all --out reports/prefetch --no-html

lab: setup
	.venv/bin/jupyter lab notebooks/

test: setup
	CCATOOLKIT_SMOKE=1 MPLBACKEND=Agg $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider $(PYTEST_ARGS)

test-fast: setup
	MPLBACKEND=Agg $(PY) -m pytest tests -m "not slow and not browser" $(PYTEST_ARGS)

clean:
	rm -rf reports .pytest_cache
