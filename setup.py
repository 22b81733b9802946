"""Builds dldna_fused._C, the native ops, with torch's cpp_extension.

Switches (environment variables; the README's "Build" section repeats them):

* ``DLDNA_FUSED_CUDA=1`` builds the CUDA kernels and fails if that is impossible, ``=0`` skips
  them; unset builds them whenever torch has CUDA and nvcc exists. No GPU is needed to build.
* ``TORCH_CUDA_ARCH_LIST`` (torch's own) picks the GPU architectures; unset, torch uses the visible
  GPUs', or ``"9.0"`` (H100/H200) where there is none.
* ``DEBUG=1`` compiles without optimization and with debug symbols.
* ``MAX_JOBS`` (torch's own) caps parallel compile jobs.
* ``CUDA_HOME`` (torch's own) points at the CUDA toolkit; /usr/local/cuda when unset and present.

Sources and flags come from csrc/sources.cmake, which the CMake build reads too.
Build with ``pip install --no-build-isolation -e .``: the extension must be compiled against the
torch already installed, not one pip would fetch into an isolated build environment.
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# Hopper (H100/H200): the architecture built where no GPU tells torch which one to use.
DEFAULT_CUDA_ARCH = "9.0"


def read_source_lists():
    """The set(NAME items...) lists of csrc/sources.cmake, as {NAME: [items]}."""
    text = (ROOT / "csrc" / "sources.cmake").read_text()
    text = re.sub(r"#[^\n]*", "", text)
    return {name: body.split() for name, body in re.findall(r"set\((\w+)\s+([^)]*)\)", text)}


def cuda_include_dirs():
    """Header folders of the pip CUDA packages (cusparse.h and friends live only there)."""
    dirs = []
    for entry in sys.path:
        candidate = Path(entry) / "nvidia" / "cu13" / "include"
        if candidate.is_dir() and str(candidate) not in dirs:
            dirs.append(str(candidate))
    return dirs


def build_cuda(torch, cpp_extension):
    requested = os.environ.get("DLDNA_FUSED_CUDA")
    has_nvcc = cpp_extension.CUDA_HOME is not None and shutil.which(
        "nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin") + os.pathsep + os.environ.get("PATH", "")
    )
    possible = torch.version.cuda is not None and bool(has_nvcc)
    if requested == "0":
        return False
    if requested == "1" and not possible:
        raise RuntimeError(
            "DLDNA_FUSED_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}"
        )
    return possible


def extensions():
    # torch guesses CUDA_HOME from the first nvcc on PATH; a wrapper script in /usr/local/bin makes
    # that /usr/local, which has no CUDA libraries. The toolkit's own folder is the right answer.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    lists = read_source_lists()
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = lists["DLDNA_FUSED_DEBUG_FLAGS"] if debug else []
    cxx = lists["DLDNA_FUSED_CXX_FLAGS"] + opt
    sources = lists["DLDNA_FUSED_SOURCES"] + lists["DLDNA_FUSED_PYTHON_SOURCES"]
    kwargs = dict(
        name="dldna_fused._C",
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=lists["DLDNA_FUSED_LINK_FLAGS"],
    )
    if build_cuda(torch, cpp_extension):
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # torch derives the list from the visible GPUs and fails when there are none.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH
            print(f"dldna_fused: no GPU and no TORCH_CUDA_ARCH_LIST; building for {DEFAULT_CUDA_ARCH}")
        system_includes = [f for d in cuda_include_dirs() for f in ("-isystem", d)]
        nvcc = lists["DLDNA_FUSED_NVCC_FLAGS"] + opt + system_includes
        ext = cpp_extension.CUDAExtension(
            sources=sources + lists["DLDNA_FUSED_CUDA_SOURCES"],
            extra_compile_args={"cxx": cxx + system_includes, "nvcc": nvcc},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = extensions()
setup(
    packages=find_packages(include=["dldna_fused", "dldna_fused.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
