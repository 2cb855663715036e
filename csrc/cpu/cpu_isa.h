// Which CPU path runs: the instruction set of the fused float32 kernels
// (csrc/x86/), or the generic loop of recurrence.h.
//
// Note [choosing the CPU path]
// By default the widest fused path this CPU and this build have: AMX (AVX-512
// with AMX-BF16 tiles, which only bfloat16 uses: the step products on them,
// Note [AMX tiles for the step product] in x86/amx_tiles.h, and the large
// products on oneDNN's, rnn_cpu.cpp), else AVX-512
// (F, VL, DQ, BW), else AVX2 with FMA, else the generic loop (also on builds
// without the x86 path: Note [x86-only fused path] in rnn_cpu.cpp).
// FUSEDRNN_CPU_ISA=amx|avx512|avx2|generic forces one, so that one machine
// runs (and tests) every path; auto or unset is the default, and a path the
// CPU or the build lacks is an error. FUSEDRNN_CPU_PATH=generic, the older
// knob, is FUSEDRNN_CPU_ISA=generic and wins over it (FUSEDRNN_CPU_PATH=auto:
// no effect). Both are read on every call, which costs nothing next to an
// op, so a test can switch paths between calls. Forcing a narrower path runs
// what a CPU without the wider one runs: avx512 on an AMX CPU, the bfloat16
// kernels of AVX512-BF16; avx2 on an AVX-512 machine, the float32 path for
// bfloat16 too (Note [half types on the fused float32 path]).
#pragma once

#include <c10/util/Exception.h>

#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdlib>
#include <string>

namespace fusedrnn {

enum class CpuIsa { kGeneric, kAvx2, kAvx512, kAmx };

// Whether the path runs the AVX-512 kernels (AMX's float32 and float64 are
// AVX-512's).
inline bool avx512_path(CpuIsa isa) { return isa == CpuIsa::kAvx512 || isa == CpuIsa::kAmx; }

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAmx:
      return "amx";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

#ifdef FUSEDRNN_X86
inline bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return ok;
}

inline bool has_avx512_bf16() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// AMX-BF16 tiles, and Linux's leave to use them (a process asks once; without
// it the first tile instruction faults).
inline bool has_amx_bf16() {
  static const bool ok = [] {
    if (!has_avx512_bf16() || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-bf16")) {
      return false;
    }
#ifdef __linux__
    constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;  // asm/prctl.h
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
#else
    return false;
#endif
  }();
  return ok;
}
inline bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

// The path in force (Note [choosing the CPU path]); raises on a bad knob.
inline CpuIsa cpu_isa() {
  const char* path_knob = std::getenv("FUSEDRNN_CPU_PATH");
  const std::string path = path_knob ? path_knob : "";
  TORCH_CHECK(path.empty() || path == "auto" || path == "generic",
              "FUSEDRNN_CPU_PATH must be auto or generic, got '", path, "'");
  const char* isa_knob = std::getenv("FUSEDRNN_CPU_ISA");
  const std::string isa = isa_knob ? isa_knob : "";
  TORCH_CHECK(isa.empty() || isa == "auto" || isa == "amx" || isa == "avx512" || isa == "avx2" ||
                  isa == "generic",
              "FUSEDRNN_CPU_ISA must be auto, amx, avx512, avx2 or generic, got '", isa, "'");
  if (path == "generic" || isa == "generic") return CpuIsa::kGeneric;
#ifdef FUSEDRNN_X86
  if (isa == "amx") {
    TORCH_CHECK(has_amx_bf16(),
                "FUSEDRNN_CPU_ISA=amx, but this CPU (or its operating system) lacks AMX-BF16 "
                "with AVX512-BF16");
    return CpuIsa::kAmx;
  }
  if (isa == "avx512") {
    TORCH_CHECK(has_avx512(),
                "FUSEDRNN_CPU_ISA=avx512, but this CPU lacks AVX-512 (F, VL, DQ, BW)");
    return CpuIsa::kAvx512;
  }
  if (isa == "avx2") {
    TORCH_CHECK(has_avx2(), "FUSEDRNN_CPU_ISA=avx2, but this CPU lacks AVX2 or FMA");
    return CpuIsa::kAvx2;
  }
  if (has_amx_bf16()) return CpuIsa::kAmx;
  return has_avx512() ? CpuIsa::kAvx512 : has_avx2() ? CpuIsa::kAvx2 : CpuIsa::kGeneric;
#else
  TORCH_CHECK(isa.empty() || isa == "auto", "FUSEDRNN_CPU_ISA=", isa,
              ", but this build has no fused x86 path (it was not compiled for x86-64)");
  return CpuIsa::kGeneric;
#endif
}

}  // namespace fusedrnn
