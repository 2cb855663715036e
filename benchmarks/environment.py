"""The environment a benchmark runs in: what is recorded with every result, and
the re-execution for --omp-passive and --as-avx2-cpu.

Note [measured in the user's environment]
The benchmarks set no OpenMP (or MKL, oneDNN) variable on their own: a user
who swaps torch.nn.LSTM for fusedrnn.LSTM runs with whatever their shell has,
usually nothing, and the numbers should be the ones they will see. The
variables that are in force are recorded with every result instead. Setting
OMP_WAIT_POLICY=PASSIVE (threads sleep between parallel regions instead of
spinning) changes the picture a lot: every parallel region then pays for
waking its threads, which costs a library with many small regions per step
(oneDNN's LSTM) several times its time at small sizes, while fusedrnn runs a
sequence in one region. So that case is only measured on request
(--omp-passive), and its results are labelled as such everywhere: in the
JSON, in table and plot titles, and in the file names.

Note [an AVX2 CPU emulated]
fusedrnn's AVX2 path forced on an AVX-512 CPU (FUSEDRNN_CPU_ISA=avx2) runs
against a torch that still uses AVX-512: no user has that pair. A user on an
AVX2 CPU runs fusedrnn's AVX2 path against ATen's and oneDNN's AVX2 kernels.
--as-avx2-cpu measures that case on this machine: it holds all three to AVX2
(FUSEDRNN_CPU_ISA, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL's
MKL_ENABLE_INSTRUCTIONS, set before torch loads) and labels the results so;
the clock, caches and cores stay this CPU's.

This module imports nothing heavy at import time: reexec_if_asked() must run
before torch loads, because the OpenMP runtime and torch read their variables
once, when they start.
"""
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

OMP_PASSIVE_FLAG = "--omp-passive"
AVX2_CPU_FLAG = "--as-avx2-cpu"
# Note [an AVX2 CPU emulated] (MKL: torch.nn.GRU's and the projections' GEMMs)
AVX2_CPU_VARIABLES = {"FUSEDRNN_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
                      "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# Prefixes of the variables that change how the threading and math libraries
# behave; every one present is recorded. LD_PRELOAD too (a preloaded OpenMP
# runtime or allocator changes timings as much).
RUNTIME_VARIABLE_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "DNNL_", "ONEDNN_", "FUSEDRNN_")
RUNTIME_VARIABLES_EXTRA = ("LD_PRELOAD", "ATEN_CPU_CAPABILITY")
# The /proc/cpuinfo flags that decide which GEMM and gate kernels can run
# (fusedrnn's AVX-512 path needs avx512f, vl, dq and bw, its AVX2 path avx2 and
# fma); any flag starting with "amx" is recorded as well.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512vl", "avx512dq", "avx512bw", "avx512_bf16",
             "avx512_fp16")
VARIANT_OMP_PASSIVE = "omp-passive"
# The knobs that force fusedrnn's CPU path (Note [choosing the CPU path] in
# csrc/cpu/cpu_isa.h); auto or unset: the widest path the CPU has.
CPU_PATH_KNOBS = ("FUSEDRNN_CPU_ISA", "FUSEDRNN_CPU_PATH")


def asked_variables(argv):
    """The variables the options in argv set: OMP_WAIT_POLICY=PASSIVE for
    --omp-passive, AVX2_CPU_VARIABLES for --as-avx2-cpu."""
    wanted = {}
    if OMP_PASSIVE_FLAG in argv:
        wanted["OMP_WAIT_POLICY"] = "PASSIVE"
    if AVX2_CPU_FLAG in argv:
        wanted.update(AVX2_CPU_VARIABLES)
    return wanted


def reexec_if_asked(argv=None):
    """With --omp-passive or --as-avx2-cpu on the command line and their
    variables not yet set: set them and re-execute this process, so that they
    are in force before torch (and its OpenMP runtime) loads. Call first
    thing in a benchmark's __main__, before anything imports torch."""
    argv = sys.argv[1:] if argv is None else argv
    missing = {k: v for k, v in asked_variables(argv).items() if os.environ.get(k) != v}
    if not missing:
        return
    if "torch" in sys.modules:
        raise SystemExit(f"{' '.join(f for f in (OMP_PASSIVE_FLAG, AVX2_CPU_FLAG) if f in argv)}: "
                         "torch is already loaded in this process; give the option on the "
                         "command line")
    os.environ.update(missing)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def check_asked(argv):
    """Raises SystemExit when an option's variables are not in force (the
    process was not started through reexec_if_asked)."""
    missing = [k for k, v in asked_variables(argv).items() if os.environ.get(k) != v]
    if missing:
        raise SystemExit(f"{', '.join(missing)} must be set before torch loads; give the option "
                         "on the command line")


def runtime_variables(environ=None):
    """{name: value} of every threading / math-library variable in force."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in sorted(environ)
            if k.startswith(RUNTIME_VARIABLE_PREFIXES) or k in RUNTIME_VARIABLES_EXTRA}


def variant(variables):
    """'omp-passive' when the results are measured with OMP_WAIT_POLICY=PASSIVE
    (by --omp-passive or set by the user), else None (the default)."""
    return VARIANT_OMP_PASSIVE if str(variables.get("OMP_WAIT_POLICY", "")).upper() == "PASSIVE" \
        else None


def _cpuinfo():
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_field(text, name):
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return None


def cpu_isa(cpuinfo=None):
    """torch's dispatch capability and the ISA flags of /proc/cpuinfo that
    matter for the GEMMs: {'torch_capability', 'flags': {flag: bool}}."""
    import torch

    text = _cpuinfo() if cpuinfo is None else cpuinfo
    have = set((_cpuinfo_field(text, "flags") or "").split())
    flags = {f: f in have for f in ISA_FLAGS}
    flags.update({f: True for f in sorted(have) if f.startswith("amx")})
    return {"torch_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": flags if have else None}


def fusedrnn_cpu_path(environ=None):
    """The path fusedrnn's CPU ops take in this process: {'isa': 'avx512',
    'avx2' or 'generic', 'forced': whether a knob of CPU_PATH_KNOBS chose it}."""
    import torch

    import fusedrnn  # noqa: F401 (registers torch.ops.fusedrnn)

    environ = os.environ if environ is None else environ
    forced = any(environ.get(k, "auto") not in ("", "auto") for k in CPU_PATH_KNOBS)
    return {"isa": torch.ops.fusedrnn._cpu_isa(), "forced": forced}


def cpu_cores(cpuinfo=None):
    """Logical CPUs, those this process may run on, and physical cores."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    cores, phys, core = set(), None, None
    for line in text.splitlines() + [""]:
        key = line.split(":", 1)[0].strip()
        if key == "physical id":
            phys = line.split(":", 1)[1].strip()
        elif key == "core id":
            core = line.split(":", 1)[1].strip()
        elif not line.strip():
            if core is not None:
                cores.add((phys, core))
            phys, core = None, None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {"logical": os.cpu_count(), "usable": usable, "physical": len(cores) or None}


def _git_commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def tf32_flags():
    """TF32 state: legacy flags and torch's fp32_precision settings."""
    import torch

    flags = {}
    for name, get in [
        ("cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
        ("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
        ("cuda.matmul.fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision),
        ("cudnn.rnn.fp32_precision", lambda: torch.backends.cudnn.rnn.fp32_precision),
        ("mkldnn.matmul.fp32_precision", lambda: torch.backends.mkldnn.matmul.fp32_precision),
    ]:
        try:
            flags[name] = get()
        except (AttributeError, RuntimeError):
            flags[name] = None
    return flags


def record(device, threads):
    """Everything a result depends on besides the code: hardware, library
    versions, threads, and the runtime variables in force."""
    import torch

    import fusedrnn

    text = _cpuinfo()
    variables = runtime_variables()
    env = {
        "device": device,
        "cpu_model": _cpuinfo_field(text, "model name") or platform.processor()
        or platform.machine(),
        "cpu_cores": cpu_cores(text),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_isa": cpu_isa(text),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_mhz_reported": _float(_cpuinfo_field(text, "cpu MHz")),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "runtime_variables": variables,
        "variant": variant(variables),
        "omp_passive_option": OMP_PASSIVE_FLAG in sys.argv[1:],
        "torch": torch.__version__,
        "torch_parallel_info": _parallel_backend(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "tf32_at_start": tf32_flags(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fusedrnn_commit": _git_commit(),
        "fusedrnn_backends": fusedrnn.backends(),
        "fusedrnn_cpu_path": fusedrnn_cpu_path(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
                    "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "gpu_sms": props.multi_processor_count,
                    "gpu_count": torch.cuda.device_count()})
    return env


def _parallel_backend():
    """The OpenMP runtime and the libraries' thread settings as torch reports them."""
    import torch

    try:
        return [ln.strip() for ln in torch.__config__.parallel_info().splitlines() if ln.strip()]
    except (AttributeError, RuntimeError):
        return None


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def load_average():
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


# -- reading a recorded environment (older results hold fewer fields) ------------
def recorded_variables(env):
    """The runtime variables of a recorded environment; results written before
    they were all recorded hold OMP_WAIT_POLICY and OMP_NUM_THREADS only."""
    if "runtime_variables" in env:
        return env["runtime_variables"]
    return {k: env[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if env.get(k) is not None}


def recorded_variant(env):
    return env.get("variant") if "variant" in env else variant(recorded_variables(env))


def variables_text(env):
    """'OMP_WAIT_POLICY=PASSIVE (--omp-passive)', or that none was set."""
    v = recorded_variables(env)
    if not v:
        return "no OpenMP/MKL/oneDNN variable set (library defaults)"
    text = ", ".join(f"{k}={val}" for k, val in v.items())
    return text + (" (--omp-passive)" if env.get("omp_passive_option") else "")


def variant_title(env):
    """Suffix for titles: ' [OMP_WAIT_POLICY=PASSIVE]' for that variant,
    ' [an AVX2 CPU emulated: ...]' for --as-avx2-cpu's, and ' [fusedrnn's
    avx2 path, forced]' where only fusedrnn's path was forced; else ''."""
    omp = " [OMP_WAIT_POLICY=PASSIVE]" if recorded_variant(env) == VARIANT_OMP_PASSIVE else ""
    if emulated_avx2_cpu(env):
        return omp + " [an AVX2 CPU emulated: fusedrnn, ATen, oneDNN and MKL held to AVX2]"
    forced = forced_cpu_path(env)
    return omp + (f" [fusedrnn's {forced} path, forced]" if forced else "")


def emulated_avx2_cpu(env):
    """Whether a recorded environment held fusedrnn, ATen and oneDNN to AVX2
    (Note [an AVX2 CPU emulated])."""
    v = recorded_variables(env)
    return forced_cpu_path(env) == "avx2" and all(
        str(v.get(k, "")).lower() == val.lower() for k, val in AVX2_CPU_VARIABLES.items()
        if k not in CPU_PATH_KNOBS)


def forced_cpu_path(env):
    """The CPU path a knob forced in a recorded environment ('avx2', ...), or None."""
    path = env.get("fusedrnn_cpu_path") or {}
    return path.get("isa") if path.get("forced") else None


def cpu_path_tag(env):
    """'-as-avx2' for result file names of an emulated AVX2 CPU, '-avx2' when
    a knob forced only fusedrnn's CPU path, else ''."""
    if emulated_avx2_cpu(env):
        return "-as-avx2"
    forced = forced_cpu_path(env)
    return f"-{forced}" if forced else ""


def isa_text(env):
    """'torch CPU capability AVX512; flags: avx2 fma avx512f; 2 logical CPUs;
    fusedrnn CPU path avx512' from a recorded environment."""
    isa = env.get("cpu_isa") or {}
    cap = isa.get("torch_capability") or env.get("cpu_capability")
    flags = isa.get("flags")
    parts = [f"torch CPU capability {cap}"] if cap else []
    if flags:
        parts.append("flags: " + (" ".join(f for f, on in flags.items() if on) or "none of "
                                  + " ".join(ISA_FLAGS)))
    cores = env.get("cpu_cores") or {}
    n = cores.get("usable") or env.get("cpu_logical_cores")
    if n:
        parts.append(f"{n} logical CPUs" + (f" ({cores['physical']} physical cores)"
                                            if cores.get("physical") else ""))
    path = env.get("fusedrnn_cpu_path")
    if path:
        knobs = recorded_variables(env)
        parts.append(f"fusedrnn CPU path {path['isa']}" + (
            " (forced: " + ", ".join(f"{k}={knobs[k]}" for k in CPU_PATH_KNOBS if k in knobs)
            + ")" if path.get("forced") else ""))
    return "; ".join(parts)
