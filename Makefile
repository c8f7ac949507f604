# Two commands do everything on a fresh machine:
#   make book   build the HTML site in _build/html
#   make test   unit tests, strict nbval on every notebook, the book build,
#               and the built site checked in headless Chromium
# Optional: make test-portable   strict nbval again under other CPU kernels,
#               one thread, and offline (see tests/portability.sh)
#           make slides   rebuild the chapter decks (make book builds them too)
#           make pdf      the book as one PDF, in English and in Japanese
#                         (installs TeX Live from Debian)
#           make student  the student edition: site and notebooks, no solutions
# Both create .venv and install the pinned requirements when needed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard book/*.ipynb))

# TensorFlow reads these once, at import: keep its C++ log lines out of
# notebook outputs and the HTML.  (companion/__init__.py sets them too.)
export TF_CPP_MIN_LOG_LEVEL := 2
export TF_ENABLE_ONEDNN_OPTS := 0
export PYTHONHASHSEED := 0
# Stored outputs are computed, and tested, on the CPU only: a reader's
# COMPANION_DEVICE (see companion/device.py) never reaches make's commands,
# nor COMPANION_LANGUAGE (the figures' language, companion/plots/language.py).
unexport COMPANION_DEVICE COMPANION_LANGUAGE

.PHONY: book test test-portable unit nbval site notebooks lab lab-source screenshots benchmark benchmark-quick clean history slides pdf student

$(STAMP): requirements.txt requirements-no-deps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-no-deps.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The releases the version history runs (transformers 4.45-4.52, Keras 3.6
# and 3.7) and reads (transformers 4.45.0, Keras 2.9-2.11), each in its own
# folder under .history/; about 330 MiB, downloaded once (wheels are kept).
HISTORY := .history/installed.json
$(HISTORY): $(STAMP) companion/experiments/history.py
	$(BIN)/python -c "from companion.experiments import history; history.install()"

history: $(HISTORY)

# reveal.js for the slides, from PyPI (see tools/slides.py), once.
REVEAL := .slides-deps/revealjs/dist/reveal.js
$(REVEAL): $(STAMP)
	$(BIN)/python tools/slides.py --fetch .slides-deps/revealjs

book: $(STAMP) $(REVEAL)
	rm -rf _build
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going
	$(BIN)/python tools/slides.py _build/html/slides .slides-deps/revealjs
	$(BIN)/python tools/translations.py build ja _build/html/ja
	@echo "Open the book: file://$(CURDIR)/_build/html/index.html"
	@echo "The Japanese edition: file://$(CURDIR)/_build/html/ja/index.html"

# The chapter decks alone, both editions, into the built site (after `make book`).
slides: $(STAMP) $(REVEAL)
	@test -f _build/html/index.html || { echo "run make book first"; exit 1; }
	$(BIN)/python tools/slides.py _build/html/slides .slides-deps/revealjs
	$(BIN)/python tools/translations.py slides ja _build/html/ja/slides

# The whole book as one PDF through XeLaTeX: _build/book.pdf, also copied
# into the site (_build/html/book.pdf, which every page links) when the site
# is built; and the Japanese edition's, from the same copy of the sources
# as its site (_build/ja-src, tools/translations.py prepare: xeCJK and the
# Noto CJK fonts, book/_latex/bookja.sty): _build/book-ja.pdf, copied to
# _build/html/ja/book.pdf when the Japanese site is built.  Installs TeX
# Live from Debian when it is missing, then checks both PDFs (tests/pdf).
pdf: $(STAMP)
	bash tools/system_packages.sh pdf
	$(BIN)/python -m companion.plots.pipeline book/images/pipeline.pdf
	rm -rf _build/pdf _build/pdf-ja
	$(BIN)/jupyter-book build . --builder pdflatex --path-output _build/pdf
	cp _build/pdf/_build/latex/book.pdf _build/book.pdf
	if [ -d _build/html ]; then cp _build/book.pdf _build/html/book.pdf; fi
	$(BIN)/python tools/translations.py prepare ja _build/ja-src
	COMPANION_LANGUAGE=ja $(BIN)/python -m companion.plots.pipeline _build/ja-src/book/images/pipeline.pdf
	$(BIN)/jupyter-book build _build/ja-src --builder pdflatex --path-output _build/pdf-ja
	cp _build/pdf-ja/_build/latex/book.pdf _build/book-ja.pdf
	if [ -d _build/html/ja ]; then cp _build/book-ja.pdf _build/html/ja/book.pdf; fi
	$(BIN)/python -m pytest tests/pdf -q -rs -s

# The student edition: the site (_build/student/html) and the notebooks
# (_build/student/notebooks) with every solution removed; then checked
# (tests/student).  The full edition keeps the solutions, tested as ever.
student: $(STAMP) $(REVEAL)
	$(BIN)/python tools/student_edition.py _build/student
	$(BIN)/python -m pytest tests/student -q

unit: $(STAMP) $(HISTORY)
	$(BIN)/python -m pytest tests --ignore=tests/site --ignore=tests/pdf --ignore=tests/student

# The built site in headless Chromium (skipped, with the reason, when no
# Chromium is installed; required under CI).
site: $(STAMP)
	$(BIN)/python -m pytest tests/site

nbval: $(STAMP) $(HISTORY)
	$(BIN)/python -m pytest --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg $(NOTEBOOKS)

test: unit nbval book site

# The portability pass: every stored output must be the same under
# PyTorch's generic kernels on one thread, under AVX2 kernels, and natively
# with no network.  .ci/run runs it after `make test`.
test-portable: $(STAMP) $(HISTORY)
	bash tests/portability.sh $(BIN)/python $(NOTEBOOKS)

# Re-execute every notebook and save its outputs in place (after a change
# to the package or a chapter).
notebooks: $(STAMP) $(HISTORY)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=600 \
		--CoalesceStreamsPreprocessor.enabled=True $(NOTEBOOKS)

# Chapter 6's benchmark.  Its peers (torchtune, Cut Cross-Entropy, Liger
# Kernel and what they import) go into .bench-deps, a folder of their own,
# never into .venv; the benchmark reads them from there.
BENCH_DEPS := .bench-deps
$(BENCH_DEPS)/.installed: requirements-benchmark.txt $(STAMP)
	$(BIN)/python -m pip install --quiet --upgrade --no-deps --target $(BENCH_DEPS) \
		-r requirements-benchmark.txt
	touch $@

benchmark: $(BENCH_DEPS)/.installed
	$(BIN)/python benchmarks/loss_memory.py

benchmark-quick: $(BENCH_DEPS)/.installed
	$(BIN)/python benchmarks/loss_memory.py --quick

screenshots: $(STAMP)
	$(BIN)/python tests/site/screenshots.py

# JupyterLab on copies of the chapters in _build/lab, with every glued
# number, cross-reference and citation written in (tools/lab_notebooks.py);
# jupyterlab-myst draws the math and the exercises.  Edit the chapters
# themselves with `make lab-source`.
lab: $(STAMP)
	$(BIN)/python tools/lab_notebooks.py book _build/lab
	$(BIN)/jupyter lab _build/lab/

lab-source: $(STAMP)
	$(BIN)/jupyter lab book/

clean:
	rm -rf _build .pytest_cache .hypothesis
