# The one list of dldna_fused's native sources and compiler flags. CMakeLists.txt include()s this
# file; setup.py reads the same set() lines. Paths are relative to the repository root.

# Op schemas, argument checks and the CPU kernels: every build.
set(DLDNA_FUSED_SOURCES
    csrc/ops.cpp
    csrc/common/checks.cpp
    csrc/common/adam_args.cpp
    csrc/common/lion_sophia_args.cpp
    csrc/common/adafactor_args.cpp
    csrc/common/adafactor_gpu_plan.cpp
    csrc/common/grad_norm_args.cpp
    csrc/common/lowbit_args.cpp
    csrc/common/quantization.cpp
    csrc/cpu/parallel.cpp
    csrc/cpu/kernels_default.cpp
    csrc/cpu/kernels_avx2.cpp
    csrc/cpu/kernels_avx512.cpp
    csrc/cpu/adam_cpu.cpp
    csrc/cpu/lion_sophia_cpu.cpp
    csrc/cpu/adafactor_cpu.cpp
    csrc/cpu/grad_norm_cpu.cpp
    csrc/cpu/lowbit_cpu.cpp
)

# CUDA kernels: built whenever torch has CUDA and nvcc exists (see setup.py for the switches).
set(DLDNA_FUSED_CUDA_SOURCES
    csrc/cuda/multi_tensor_apply.cu
    csrc/cuda/adam_cuda.cu
    csrc/cuda/lion_sophia_cuda.cu
    csrc/cuda/adafactor_cuda.cu
    csrc/cuda/grad_norm_cuda.cu
    csrc/cuda/lowbit_cuda.cu
)

# The Python module dldna_fused._C (setup.py only; the CMake build is a plain shared library).
set(DLDNA_FUSED_PYTHON_SOURCES
    csrc/python_module.cpp
)

# C++ tests of the CPU kernels, run by ctest.
set(DLDNA_FUSED_CPP_TEST_SOURCES
    csrc/tests/test_cpu_kernels.cpp
)

# -fopenmp: at::parallel_for is inline, and under torch's OpenMP backend it only runs in parallel
# when the caller is compiled with OpenMP. At run time the GOMP symbols bind to the libgomp.so.1
# torch has already loaded, so torch.set_num_threads governs our kernels too.
set(DLDNA_FUSED_CXX_FLAGS -O3 -fopenmp -Wall -Wextra -Wno-unused-parameter -Wno-psabi)
set(DLDNA_FUSED_LINK_FLAGS -fopenmp)
# No --use_fast_math: the kernels are parity-tested against fp32 references.
set(DLDNA_FUSED_NVCC_FLAGS -O3 --expt-relaxed-constexpr -lineinfo)
set(DLDNA_FUSED_DEBUG_FLAGS -O0 -g)
