# Quick start:  make train  (main job on the embedded mini dataset)  |  make train-det  (detection main job on the
# embedded mini COCO set)  |  make test  (build + checks + tests)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.inc' -o -name '*.cu' -o -name '*.cuh') setup.py
export MAX_JOBS ?= 2

.PHONY: setup build cuda-check test test-all sdist-check train train-det demo bench gpu-check torch-check clean

setup: $(DEPS)

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

# Incremental: rebuilt only when a C++/CUDA source or setup.py changes.
$(BUILT): $(DEPS) $(CSRC)
	$(PY) -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

# Compiles every .cu to object files for sm_80 and sm_90 so CUDA code cannot rot on CPU-only machines.
cuda-check: $(DEPS)
	@if command -v nvcc >/dev/null 2>&1; then $(PY) tools/check_cuda_compile.py; \
	else echo "nvcc not found: skipping the CUDA compile check"; fi

# Idle OpenMP workers sleep instead of spinning: on small shared machines spinning workers of one op starve
# the next (tools/train.py sets the same default). The environment's own value wins.
test test-all: export OMP_WAIT_POLICY ?= PASSIVE

test: build cuda-check
	$(PY) -m pytest -q

test-all: build cuda-check
	$(PY) -m pytest -q -m ""

# Installs like a user: builds the source archive, installs it (compiling the ops) into a fresh virtual
# environment with the pinned torch, and uses it from a folder outside the checkout (tools/check_sdist.py).
# A few minutes on 2 cores, so `make test` leaves it out; .ci/run runs both.
sdist-check: $(DEPS)
	$(PY) tools/check_sdist.py

# --resume: a second `make train` continues (or, when finished, re-evaluates) the run instead of refusing its work dir.
train: build
	$(PY) tools/train.py --config mini/r18d8_sn_c1_deepsup --work-dir work_dirs/mini --resume

# Prints COCOeval's bbox and segm tables, then the box and mask AP lines (--resume: as for `make train`).
train-det: build
	$(PY) tools/train.py --config mini/mask_rcnn_r18_fpn_sn --work-dir work_dirs/mini_det --resume

demo: build
	$(PY) tools/demo.py --config mini/r18d8_sn_c1_deepsup --checkpoint work_dirs/mini/latest.pth \
		--image data/mini_ade/ADEChallengeData2016/images/validation --out work_dirs/mini/demo

bench: build
	$(PY) benchmarks/run_all.py

# On a GPU machine whose python has a CUDA build of torch (no .venv, no network): builds for the local GPU, runs
# the CUDA tests and the GPU benchmarks, prints the pass/fail summary of the GPU targets (tools/gpu_check.py).
gpu-check:
	$(PYTHON) tools/gpu_check.py

# The test suite against another torch in its own virtual environment, by default the oldest that pyproject.toml
# accepts (TORCH=2.11.0 picks one, PYTHON=python3.12 the interpreter): CPU kernels, a clone of HEAD
# (tools/check_torch_version.py). Downloads that torch.
torch-check:
	$(PYTHON) tools/check_torch_version.py $(TORCH)

clean:
	rm -rf build *.egg-info normkit/*.so $(BUILT) build/cuda_check
