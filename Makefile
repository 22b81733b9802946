# dldna_fused: `make demo` and `make test` are the two commands a new user runs (README.md).
# Both create .venv with the pinned requirements, build the extension, and are no-ops for any step
# whose inputs did not change.

PYTHON_BOOTSTRAP ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
# Hopper (H100/H200) unless the caller picks other GPU architectures.
export TORCH_CUDA_ARCH_LIST ?= 9.0

VENV_STAMP := $(VENV)/.requirements.stamp
EXT_STAMP := build/.extension.stamp
CMAKE_DIR := build/cmake
NATIVE_INPUTS := $(shell find csrc -type f) setup.py pyproject.toml CMakeLists.txt

.PHONY: all venv build cpp-test python-test test sweep demo bench figures clean

all: build

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt
	test -x $(PYTHON) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

build: $(EXT_STAMP)

$(EXT_STAMP): $(VENV_STAMP) $(NATIVE_INPUTS)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

# torch's CMake config looks for the CUDA toolkit its own build used; point it at ours.
CUDA_ROOT := $(wildcard /usr/local/cuda)
CMAKE_CUDA_ARGS := $(if $(CUDA_ROOT),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_ROOT) -DCUDAToolkit_ROOT=$(CUDA_ROOT))

# The CMake build of the same sources against libtorch, with the C++ kernel tests.
cpp-test: $(VENV_STAMP)
	cmake -S . -B $(CMAKE_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_CUDA_ARGS) \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython_EXECUTABLE=$(abspath $(PYTHON)) > $(CMAKE_DIR).configure.log 2>&1 \
	  || (cat $(CMAKE_DIR).configure.log; exit 1)
	cmake --build $(CMAKE_DIR)
	ctest --test-dir $(CMAKE_DIR) --output-on-failure

python-test: build
	MPLBACKEND=Agg $(PYTHON) -m pytest python_tests

test: build cpp-test python-test

# The seeded randomized differential test at 100x the size CI runs (python_tests/test_random_parity.py).
sweep: build
	DLDNA_SWEEP_CASES=10000 $(PYTHON) -m pytest -q python_tests/test_random_parity.py

bench: build
	$(VENV)/bin/dldna-fused bench --optimizer adamw,lion,sophia,adafactor
	$(VENV)/bin/dldna-fused bench --optimizer adamw --clip

# Every number and figure of the README's toolkit sections, from one run (docs/figures.sh).
figures: build
	docs/figures.sh $(PYTHON)

demo: bench

clean:
	rm -rf build dldna_fused/_C*.so *.egg-info
