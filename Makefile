# The two commands of the README: `make demo` and `make test`.  Each sets up everything it needs
# on a fresh machine with nothing but Python 3 (a venv with pinned versions), then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum requirements-dev.txt | cut -d' ' -f1)
# never let a caller's PYTHONPATH put the source tree in front of the installed package
RUN    := env -u PYTHONPATH
# nvcc for the CUDA kernels (built when nvcc is there, GPU or not; see setup.py).  /usr/local/bin/nvcc
# may be a wrapper, from which CUDA_HOME cannot be guessed.
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME

.PHONY: setup wheel install demo paper test fuzz sanitize bench bench-conv bench-suite cmake-check gpu-check clean

$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip==25.3
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

# the wheel, built against the venv's torch (never with build isolation: see ../shared/TOOLCHAIN.md)
wheel: setup
	rm -rf dist build spectral_ext.egg-info
	$(RUN) $(PY) -m build --wheel --no-isolation

install: wheel
	$(RUN) $(PY) -m pip install -q --no-deps --force-reinstall dist/*.whl

# the main job: a small CNN on scikit-learn's digits, with and without the regularizer.
# -P: the installed package, not the source tree in the current directory.
demo: install
	$(RUN) $(PY) -P -m spectral_ext.experiments.digits

# the paper runner (README, "The papers, reproducible"): ARGS="--quick --out DIR" writes every
# output in under a minute; ARGS="--dataset mnist1d --seeds 0,1,2 ..." for a real run
paper: install
	$(RUN) $(PY) -P -m spectral_ext.experiments.paper $(ARGS)

# the whole suite against the installed wheel (`pytest`, not `python -m pytest`, keeps the
# source tree off sys.path, and pyproject.toml's --import-mode=append keeps benchmarks/ from
# putting it first; tests/test_installed.py checks it), and the benchmark suites once each as
# plain tests on their small sets
test: install
	$(RUN) $(VENV)/bin/pytest tests benchmarks -p no:cacheprovider -q -rs --benchmark-disable

# the differential fuzzer's long mode (tests/fuzz.py: every backend that runs here against a
# float64 oracle; `make test` runs its quick mode).  ARGS="--backends cpu --cases 20000 --seed 7"
fuzz: install
	$(RUN) $(PY) -P tests/fuzz.py $(ARGS)

# The C++ CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer (no CUDA), installed
# into build-sanitize/site (not the venv), and the backend tests, the C++ input checks, the step
# plan's tests (stale pointers would show here) and the fuzzer's quick mode run against them,
# with libasan preloaded into Python.  Any report fails.
SAN_DIR := build-sanitize
SAN_LIBS = $(shell g++ -print-file-name=libasan.so):$(shell g++ -print-file-name=libubsan.so)
sanitize: setup
	rm -rf $(SAN_DIR) build dist spectral_ext.egg-info
	SPECTRAL_EXT_SANITIZE=1 SPECTRAL_EXT_CUDA=0 $(RUN) $(PY) -m build --wheel --no-isolation --outdir $(SAN_DIR)/dist
	rm -rf build spectral_ext.egg-info
	$(RUN) $(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(SAN_DIR)/site $(SAN_DIR)/dist/*.whl
	env PYTHONPATH=$(abspath $(SAN_DIR)/site) LD_PRELOAD=$(SAN_LIBS) \
	  ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(VENV)/bin/pytest tests/test_sanitized_build.py tests/test_backends.py tests/test_errors.py \
	  tests/test_fuzz.py tests/test_plan.py -p no:cacheprovider -q -rs -k "sanitized or cpu or cpp or plan"

# the benchmark table (benchmarks/RESULTS.md says what was measured); the repo root goes at the
# END of sys.path, so the installed spectral_ext is imported and benchmarks/ is found.
bench: install
	$(RUN) $(PY) -P -c "import runpy, sys; sys.path.append('.'); runpy.run_module('benchmarks', run_name='__main__', alter_sys=True)" $(ARGS)

# conv_norm="operator" against "matricized" (benchmarks/conv_operator.py): the two sigmas of real
# networks' convs (random init, and the digits CNN after training) and the cost of one step
# (ARGS="--what cost --cost-models vgg16-cifar")
bench-conv: install
	$(RUN) $(PY) -P -c "import runpy, sys; sys.path.append('.'); runpy.run_module('benchmarks.conv_operator', run_name='__main__', alter_sys=True)" $(ARGS)

# the pytest-benchmark suites, timed (ARGS="--bench-sets resnet50 --benchmark-json out.json")
bench-suite: install
	$(RUN) $(VENV)/bin/pytest benchmarks -p no:cacheprovider -q --benchmark-only $(ARGS)

# CMakeLists.txt builds the same sources (checked in CI so it does not rot), here as the portable
# (-march baseline) variant, so both configurations are compiled in CI; the build is loaded under
# the checkout's Python package and steps a plan through plan_step (its pybind11 cast of the plan
# must find torch's ScriptObject type: a mismatched pybind11 ABI would fail here)
cmake-check: setup
	rm -rf build-cmake
	$(RUN) cmake -S . -B build-cmake -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) -DSPECTRAL_EXT_CPU_ARCH= \
	  $(if $(wildcard $(CUDA_HOME)/bin/nvcc),-DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(RUN) cmake --build build-cmake
	$(RUN) $(PY) -P -c "import sys, glob; sys.path.insert(0, '.'); import importlib.util as u; \
	  import torch; spec = u.spec_from_file_location('spectral_ext._C', glob.glob('build-cmake/_C*.so')[0]); \
	  m = u.module_from_spec(spec); spec.loader.exec_module(m); sys.modules['spectral_ext._C'] = m; \
	  import spectral_ext as se; ws = [torch.randn(5, 4, requires_grad=True)]; \
	  sig = m.plan_step(se.functional.make_step_plan(ws, se.init_vectors(ws)), 0.1, 1); \
	  assert sig.shape == (1,) and ws[0].grad.abs().sum() > 0, 'plan_step of the cmake build'; \
	  print('cmake build loads and steps a plan; openmp =', m.openmp(), '; cuda kernels =', m.cuda_compiled(), m.cuda_archs())"

# on a machine with a CUDA GPU and its own torch (no venv): build from source, then the stages
# asked for (STAGES=sanitize,test,bench: compute-sanitizer, the native suite, the GPU table),
# results under $$OUT (benchmarks/gpu_check.sh); every call builds, so each is self-contained
gpu-check:
	bash benchmarks/gpu_check.sh $(STAGES)

clean:
	rm -rf build build-cmake build-sanitize dist *.egg-info spectral_ext/_C*.so
