"""Builds fusedrnn._C: the CPU kernels always, the CUDA kernels when a CUDA
toolchain and a CUDA build of torch are present (a visible GPU is not needed).

Knobs (environment):
  FUSEDRNN_CUDA=auto|0|1   auto (default): build CUDA when nvcc and torch.version.cuda exist
  FUSEDRNN_X86=auto|0      auto (default): the fused AVX-512 and AVX2 CPU paths where the
                           compiler targets x86-64; 0 leaves them out (the generic CPU path only)
  TORCH_CUDA_ARCH_LIST     CUDA architectures; default: the visible GPU's, else "8.0;9.0+PTX"
  CUDA_HOME                the toolkit root, when it cannot be found from nvcc
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and bool(
        glob.glob(os.path.join(path, "lib64", "libcudart.so*"))
        or glob.glob(os.path.join(path, "lib", "libcudart.so*"))
    )


def find_cuda_home():
    """The folder holding bin/nvcc and lib64/libcudart.so.

    `nvcc` on PATH may be a wrapper script outside the toolkit, which makes
    torch guess a wrong CUDA_HOME; nvcc itself reports where it lives (_HERE_)
    in a dry run.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if _is_toolkit_root(env):
        return env
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        try:
            dry = subprocess.run(
                [nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60
            )
            m = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
            if m:
                candidates.append(os.path.dirname(m.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for c in candidates:
        if _is_toolkit_root(c):
            return os.path.realpath(c)
    return None


def nvidia_pip_includes(torch_file):
    """cuBLAS & co. headers shipped by the nvidia-* wheels that CUDA torch pulls in.

    They sit beside that torch (site-packages/nvidia/*/include), which need not be
    this interpreter's own site-packages: a venv made with --system-site-packages,
    or a .pth path, finds torch in a base environment.
    """
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(torch_file)))]
    roots += [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    found = []
    for root in dict.fromkeys(os.path.realpath(r) for r in roots):
        found += sorted(d for d in glob.glob(os.path.join(root, "nvidia", "*", "include"))
                        if os.path.isdir(d))
    return found


def targets_x86_64(cxx):
    """Whether the C++ compiler builds for x86-64, where the fused CPU paths (AVX-512
    and AVX2 intrinsics, x86 CPU feature checks) compile; see Note [x86-only fused path]."""
    mode = os.environ.get("FUSEDRNN_X86", "auto").lower()
    if mode not in ("auto", "0"):
        sys.exit(f"FUSEDRNN_X86 must be auto or 0, got {mode!r}")
    if mode == "0":
        return False
    try:
        target = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True,
                                timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        target = ""
    target = (target or platform.machine()).lower()
    return target.startswith(("x86_64", "amd64"))


# Each compiled for its own instruction set (a `#pragma GCC target` at the top),
# in the order the linker must see them: Note [ISA translation units].
X86_SOURCES = ["csrc/x86/fused_avx2.cpp", "csrc/x86/fused_avx512.cpp",
               "csrc/x86/fused_avx512_bf16.cpp"]


def check_link_order(sources):
    """setuptools links the objects in the sorted order of their sources; those of
    X86_SOURCES must come after every other one, in the order given."""
    x86 = [s for s in X86_SOURCES if s in sources]
    if sorted(sources)[len(sources) - len(x86):] != x86:
        sys.exit(f"fusedrnn: {x86} must sort after every other source, in that order "
                 "(Note [ISA translation units] in csrc/x86/fused_ops.h)")


def want_cuda(torch_cuda, cuda_home):
    mode = os.environ.get("FUSEDRNN_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FUSEDRNN_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    have = torch_cuda is not None and cuda_home is not None
    if mode == "1" and not have:
        sys.exit(
            "FUSEDRNN_CUDA=1 but no CUDA build is possible: "
            + ("torch is a CPU-only build" if torch_cuda is None else "nvcc was not found")
        )
    if not have:
        why = "torch is a CPU-only build" if torch_cuda is None else "nvcc was not found"
        print(f"fusedrnn: {why}; this is a CPU-only build.")
    return have


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads
        # CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, get_cxx_compiler

    use_cuda = want_cuda(torch.version.cuda, cuda_home)
    sources = ["csrc/autograd_kernel.cpp", "csrc/layer_autograd.cpp", "csrc/ops.cpp",
               "csrc/plain_ops.cpp", "csrc/cpu/reg_cpu.cpp", "csrc/cpu/rnn_cpu.cpp",
               "csrc/cpu/step_buffers.cpp", "csrc/persistent/emulate.cpp"]
    # x86-64 only, each for its instruction set, linked last: see Note [x86-only
    # fused path] and Note [ISA translation units].
    x86_sources, macros = [], []
    if targets_x86_64(get_cxx_compiler()):
        x86_sources = X86_SOURCES
        macros = [("FUSEDRNN_X86", None)]
    else:
        print("fusedrnn: no x86-64 target; the CPU kernels are the generic path only.")
    # -fopenmp: at::parallel_for is a header template; without OpenMP in this
    # build it runs on one thread. libgomp is the one torch already loaded.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if not use_cuda:
        return [CppExtension("fusedrnn._C", sources + x86_sources, define_macros=macros,
                             extra_compile_args={"cxx": cxx}, extra_link_args=link)], None
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    print(f"fusedrnn: building CUDA kernels with {cuda_home} "
          f"for {os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPU')}")
    ext = CUDAExtension(
        "fusedrnn._C",
        sources + ["csrc/cuda/rnn_cuda.cu", "csrc/cuda/reg_cuda.cu", "csrc/persistent/persistent.cu"]
        + x86_sources,
        define_macros=macros,
        include_dirs=nvidia_pip_includes(torch.__file__),
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        extra_link_args=link,
    )
    return [ext], cuda_home


def main():
    exts, _ = extensions()
    for ext in exts:
        check_link_order(ext.sources)
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="fusedrnn",
        version="0.1.0",
        packages=["fusedrnn"],
        ext_modules=exts,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
