# Set-up and common jobs. Everything installs into a local virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NMT := $(VENV)/bin/nmt
# The CPU build of torch; set TORCH_SPEC= (empty) to keep whatever torch pip picks for your GPU.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-run

.PHONY: install browser cjk-font demo demo-zh test test-fast bench bench-scale bench-serve gpu-bundle gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Prepare, train, translate and score on the bundled Tatoeba English-Spanish sample (CPU, offline),
# then draw where the model looked for one sentence, and its training curves.
demo: install
	$(NMT) prepare --tsv nmt/corpora/tatoeba-en-es-15k.tsv.gz --tsv-langs en,es --src en --tgt es \
		--valid-size 500 --test-size 1000 --vocab-size 4000 --out $(DEMO_DIR)/data --overwrite
	$(NMT) train recipes/tatoeba-en-es/transformer-cpu-demo.yaml --data $(DEMO_DIR)/data \
		--out $(DEMO_DIR)/model --overwrite
	$(NMT) translate $(DEMO_DIR)/model --input $(DEMO_DIR)/data/test.src.txt \
		--output $(DEMO_DIR)/test.hyp.txt --beam 5
	$(NMT) evaluate --hyp $(DEMO_DIR)/test.hyp.txt --ref $(DEMO_DIR)/data/test.tgt.txt
	echo "I would like a cup of coffee, please." | $(NMT) translate $(DEMO_DIR)/model --beam 5 \
		--attention $(DEMO_DIR)/attention
	$(NMT) plot $(DEMO_DIR)/model --out $(DEMO_DIR)/training-curves.png
	@echo "attention heat-map: $(DEMO_DIR)/attention/line-000001.png"
	@echo "training curves:    $(DEMO_DIR)/training-curves.png"

# Chinese->English on Tatoeba (../shared/data/tatoeba/cmn-eng.tsv.gz): split by English sentence,
# prepare (Traditional -> Simplified and the rest of the Chinese normalization), train the CPU
# recipe's fixed number of updates, score the test set, translate a few everyday sentences
# (recipes/tatoeba-zh-en/examples.zh) and draw where the model looked for 知识就是力量。
ZH_TSV ?= ../shared/data/tatoeba/cmn-eng.tsv.gz
ZH_RECIPE := recipes/tatoeba-zh-en
demo-zh: install cjk-font
	$(PY) recipes/tatoeba-zh-en/split.py $(ZH_TSV) $(DEMO_DIR)/zh-split
	$(NMT) prepare --train $(DEMO_DIR)/zh-split/train --valid $(DEMO_DIR)/zh-split/valid \
		--test $(DEMO_DIR)/zh-split/test --src zh --tgt en --vocab-size 8000 --out $(DEMO_DIR)/zh-data --overwrite
	$(NMT) train recipes/tatoeba-zh-en/transformer-cpu.yaml --data $(DEMO_DIR)/zh-data \
		--out $(DEMO_DIR)/zh-model --overwrite
	$(NMT) translate $(DEMO_DIR)/zh-model --input $(DEMO_DIR)/zh-data/test.src.txt \
		--output $(DEMO_DIR)/zh-test.hyp.txt --beam 5
	$(NMT) evaluate --hyp $(DEMO_DIR)/zh-test.hyp.txt --ref $(DEMO_DIR)/zh-data/test.tgt.txt
	$(NMT) translate $(DEMO_DIR)/zh-model --input $(ZH_RECIPE)/examples.zh --beam 5 | paste $(ZH_RECIPE)/examples.zh -
	head -1 $(ZH_RECIPE)/examples.zh | $(NMT) translate $(DEMO_DIR)/zh-model --prefix $(ZH_RECIPE)/knowledge.en --prefix-only \
		--attention $(DEMO_DIR)/zh-attention --attention-words >/dev/null
	@echo "attention heat-map of 知识就是力量。 -> Knowledge is power.: $(DEMO_DIR)/zh-attention/line-000001.png"

# A font with Chinese characters for the heat-map labels (Debian's WenQuanYi Micro Hei, as root;
# elsewhere the labels may be drawn as boxes).
cjk-font:
	@fc-list 2>/dev/null | grep -qi wqy || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei >/dev/null; \
	else echo "note: no Chinese font installed (fonts-wqy-microhei); heat-map labels may be drawn as boxes"; fi; }

# Debian's Chromium, for the web page's end-to-end test (as root; elsewhere that test is skipped).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: $(CHROMIUM) is missing and cannot be installed here; the web page test will be skipped"; fi; }

test: install browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The edit loop: every test but those marked slow (about 2 minutes on 2 cores).
test-fast: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

# Training and decoding speed on Multi30k (../shared/data/multi30k) on the device present.
BENCH_OUT ?= bench.json
bench: install
	$(NMT) bench --out $(BENCH_OUT)

# nmt serve under 1, 8 and 32 concurrent clients, batched and one request at a time:
# `make bench-serve SERVE_MODEL=DIR`.
SERVE_MODEL ?= runs/m30k-tf-cpu
bench-serve: install
	$(NMT) bench-serve $(SERVE_MODEL) --out bench-serve.json

# Prepare and training cost on a synthetic 4.5M-pair corpus and on one 10 times smaller.
SCALE_PAIRS ?= 4500000
bench-scale: install
	$(NMT) bench-scale --pairs $(SCALE_PAIRS) --out bench-scale.json

# Every GPU figure from one unattended command (at most 9 minutes), on a machine with a CUDA GPU
# and its own PyTorch: `make gpu-check GPU_CHECK_OUT=DIR`. It needs nothing from the network:
# `make gpu-bundle`, run beforehand where the package registry is reachable, gathers the
# Multi30k files and the wheels it needs beyond torch into $(GPU_BUNDLE) (for the GPU machine's
# Python, GPU_PYTHON_VERSION). `make gpu-check DRY=1` runs it on the CPU with tiny models.
GPU_BUNDLE ?= gpu-bundle
GPU_CHECK_OUT ?= gpu-check
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
gpu-bundle: install
	$(PY) -m nmt.gpu_check bundle --out $(GPU_BUNDLE) --python-version $(GPU_PYTHON_VERSION)

gpu-check: $(if $(DRY),install)
	$(if $(DRY),$(PY),$(GPU_PYTHON)) -m nmt.gpu_check run --out $(GPU_CHECK_OUT) \
		$(if $(wildcard $(GPU_BUNDLE)/bundle.json),--bundle $(GPU_BUNDLE)) $(if $(DRY),--dry-run) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
