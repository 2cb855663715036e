// The time loop of the fused CPU paths, shared by the float32 and float64
// (fused_ops.h) and bfloat16 (fused_avx512_bf16.cpp) translation units: the
// spin-barrier step loop, step buffers, and the forward epilogues and drivers,
// templated on the
// vector type V (vec16.h, vec8.h, vec8d.h), the storage type S (activations,
// gates, h) and the GEMM that forms a tile. The cell state and all gate math
// are in V's element type V::T (float32 for bfloat16 storage).
//
// Everything here has internal linkage (the unnamed namespace): each ISA's
// translation unit gets its own copy, compiled for its own instruction set, so
// the linker never hands one unit's copy to the other (Note [ISA translation
// units] in fused_ops.h). Include only from those units, with a vector header.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../gates.h"
#include "../cpu/spin_barrier.h"
#include "dot_gemm.h"
#include "../cpu/step_buffers.h"
#include "panel_gemm.h"
#include "transpose.h"

namespace fusedrnn {
namespace cpu {
namespace {

using at::Tensor;

constexpr int kGateNV = 1;  // vectors per gate in a forward panel: V::kLanes units

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A vector of storage type S to V's element type and back (bfloat16 to
// float32: round to nearest even, NaN kept, as c10::BFloat16). The bfloat16
// branch is instantiated only in the unit compiled with AVX512-BF16, with V =
// Vec16.
template <typename V, typename S>
inline V load_v(const S* p, typename V::Mask m) {
  if constexpr (std::is_same_v<S, typename V::T>) {
    return V::load(p, m);
  } else {
    const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
}

template <typename V, typename S>
inline void store_v(S* p, V v, typename V::Mask m) {
  if constexpr (std::is_same_v<S, typename V::T>) {
    v.store(p, m);
  } else {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v.v));
  }
}

// Note [streaming the saved gates]
// What a training forward saves (gates, cell states: tens of MB, read again
// only by the backward, after the whole sequence) is written past the caches
// where a vector fills a cache line, so that it does not evict the step's
// panels of W_hh from L2; run_steps fences the streaming stores before its
// threads join. On the 2-core Xeon with AMX (interleaved, float32 training,
// T=100 B=64 H=512): LSTM 1%, GRU 4% faster; at B=16 H=256, even.
template <typename V, typename S>
inline void store_past_caches(S* p, V v, typename V::Mask m) {
  if constexpr (std::is_same_v<S, typename V::T> && sizeof(typename V::Reg) == 64) {
    if (m == V::mask(V::kLanes) && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
      V::stream(p, v.v);
      return;
    }
  }
  store_v<V>(p, v, m);
}

// Note [one parallel region per sequence]
// A fork/join per time step costs tens of microseconds when idle OpenMP
// threads sleep (OMP_WAIT_POLICY=PASSIVE), as much as a whole small step. So
// the time loop runs inside one parallel region, each thread on its own
// contiguous panel range, with a spin barrier between steps
// (cpu/spin_barrier.h).

// body(step, p0, p1) for step in [0, steps), panels [p0, p1) per thread, a
// barrier after every step. body must not throw.
template <typename Body>
void run_steps(int64_t steps, int64_t P, const Body& body) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), P);
  if (nt <= 1 || at::in_parallel_region()) {
    for (int64_t s = 0; s < steps; ++s) body(s, 0, P);
    _mm_sfence();  // Note [streaming the saved gates]
    return;
  }
  SpinBarrier barrier(static_cast<int>(nt));
  // No num_threads clause (GOMP thread-pool trouble, as ATen notes); threads
  // beyond nt leave at once.
#pragma omp parallel
  {
    const int64_t tid = omp_get_thread_num();
    if (tid < nt) {
      const int64_t p0 = P * tid / nt, p1 = P * (tid + 1) / nt;
      for (int64_t s = 0; s < steps; ++s) {
        body(s, p0, p1);
        barrier.wait();
      }
      _mm_sfence();
    }
  }
}

// Forward panel p of w [G*H, K], L = V::kLanes hidden units with all their
// gates each, k in groups of KP (1, or 2 for the bfloat16 pairs; K a multiple
// of KP), zeros past H:
//   panel[k / KP][g * L + j][k % KP] = w[g * H + L p + j][k]
template <typename V, typename S, int KP>
void pack_gate_panel(const S* w, int64_t H, int64_t K, int64_t G, int64_t p, S* panel) {
  constexpr int64_t kLanes = V::kLanes;
  const int64_t width = G * kGateNV * kLanes;
  const int rows = static_cast<int>(std::min<int64_t>(kLanes, H - p * kLanes));
  if constexpr (sizeof(S) * KP == 4 && has_transpose_block(kLanes)) {
    // float32 (AVX-512, AVX2) or bfloat16 pairs (AVX-512): a k group is one
    // 32-bit unit, and each gate's L units of a panel are L consecutive rows
    // of w, so the panel is an L x L transpose of 32-bit units (transpose.h)
    // per gate.
    const int64_t KU = K / KP;  // units per row
    const float* src = reinterpret_cast<const float*>(w);
    float* dst = reinterpret_cast<float*>(panel);
    for (int64_t g = 0; g < G; ++g) {
      pack_rows_into_panel<kLanes>(src + (g * H + p * kLanes) * KU, KU, rows, dst, width,
                                   g * kLanes);
    }
  } else {
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const S* row = j < rows ? w + (g * H + p * kLanes + j) * K : nullptr;
        const int64_t c = g * kLanes + j;
        for (int64_t k = 0; k < K; ++k) {
          panel[(k / KP) * KP * width + c * KP + k % KP] = row ? row[k] : S(0);
        }
      }
    }
  }
}

// All forward panels of w [G*H, K]: packed[p] is pack_gate_panel's panel p.
template <typename V, typename S, int KP>
Tensor pack_gate_panels(const Tensor& w, int64_t G) {
  const int64_t H = w.size(0) / G, K = w.size(1), P = ceil_div(H, V::kLanes);
  const int64_t width = G * kGateNV * V::kLanes, size = K * width;
  Tensor packed = empty_for_steps({P, K, width}, w.options());
  const S* src = w.data_ptr<S>();
  S* dst = packed.data_ptr<S>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_gate_panel<V, S, KP>(src, H, K, G, p, dst + p * size);
  });
  return packed;
}

// ------------------------------------------------------------------ forward epilogues
// Each gets rec: a tile of recurrent terms (V::T), rows m0..m0+mr, row
// stride ldr, and the panel index p; it indexes step-local buffers [B, ...]
// and runs the gate math of gates.h on V::kLanes hidden units at a time.
template <typename V, typename S>
struct LstmForwardEpi {
  using E = typename V::T;
  int64_t H;
  const S *x, *bias;  // [B, 4H], [4H]
  E* c;               // [B, H] running cell state
  S* h;               // [B, H] h_t
  S* gates;           // [B, 4H] or null
  E* cells;           // [B, H] or null
  S* h_state;         // [B, H] h_t again, or null (Note [packed input on the fused forward])
  void prefetch(int64_t m0, int mr, int64_t p) const {  // Note [prefetching the epilogue's rows]
    prefetch_rows(x, 4, H, m0, mr, p * V::kLanes, V::kLanes, V::kLanes);
  }
  void operator()(const typename V::T* rec, int64_t ldr, int64_t m0, int mr, int64_t p) const {
    constexpr int64_t kLanes = V::kLanes;
    const int64_t u0 = p * kLanes;
    const auto m = V::mask(H - u0);
    const S* bb = bias + u0;
    const V bi = load_v<V>(bb, m), bf = load_v<V>(bb + H, m), bg = load_v<V>(bb + 2 * H, m),
            bo = load_v<V>(bb + 3 * H, m);
    for (int r = 0; r < mr; ++r) {
      const int64_t b = m0 + r;
      const E* t = rec + r * ldr;
      const S* xb = x + b * 4 * H + u0;
      E* cb = c + b * H + u0;
      V i, f, g, o, c_new, h_new;
      lstm_forward_point<V>(
          load_v<V>(t, m) + load_v<V>(xb, m) + bi,
          load_v<V>(t + kLanes, m) + load_v<V>(xb + H, m) + bf,
          load_v<V>(t + 2 * kLanes, m) + load_v<V>(xb + 2 * H, m) + bg,
          load_v<V>(t + 3 * kLanes, m) + load_v<V>(xb + 3 * H, m) + bo,
          load_v<V>(cb, m), i, f, g, o, c_new, h_new);
      store_v<V>(cb, c_new, m);
      store_v<V>(h + b * H + u0, h_new, m);
      if (h_state) store_v<V>(h_state + b * H + u0, h_new, m);
      if (gates) {
        S* gb = gates + b * 4 * H + u0;
        store_past_caches<V>(gb, i, m);
        store_past_caches<V>(gb + H, f, m);
        store_past_caches<V>(gb + 2 * H, g, m);
        store_past_caches<V>(gb + 3 * H, o, m);
        store_past_caches<V>(cells + b * H + u0, c_new, m);
      }
    }
  }
};

template <typename V, typename S>
struct GruForwardEpi {
  int64_t H;
  const S *x, *bias, *h_prev;  // [B, 3H], [3H], [B, H]
  S* h;                        // [B, H] h_t
  S* gates;                    // [B, 4H] or null
  S* h_state;                  // [B, H] h_t again, or null (as the LSTM's)
  void prefetch(int64_t m0, int mr, int64_t p) const {  // Note [prefetching the epilogue's rows]
    prefetch_rows(x, 3, H, m0, mr, p * V::kLanes, V::kLanes, V::kLanes);
  }
  void operator()(const typename V::T* rec, int64_t ldr, int64_t m0, int mr, int64_t p) const {
    constexpr int64_t kLanes = V::kLanes;
    const int64_t u0 = p * kLanes;
    const auto m = V::mask(H - u0);
    const S* bb = bias + u0;
    const V br = load_v<V>(bb, m), bz = load_v<V>(bb + H, m), bn = load_v<V>(bb + 2 * H, m);
    for (int r = 0; r < mr; ++r) {
      const int64_t b = m0 + r;
      const typename V::T* t = rec + r * ldr;
      const S* xb = x + b * 3 * H + u0;
      const V hn = load_v<V>(t + 2 * kLanes, m) + bn;
      V rr, z, nn, h_new;
      gru_forward_point<V>(load_v<V>(xb, m), load_v<V>(xb + H, m), load_v<V>(xb + 2 * H, m),
                           load_v<V>(t, m) + br, load_v<V>(t + kLanes, m) + bz, hn,
                           load_v<V>(h_prev + b * H + u0, m), rr, z, nn, h_new);
      store_v<V>(h + b * H + u0, h_new, m);
      if (h_state) store_v<V>(h_state + b * H + u0, h_new, m);
      if (gates) {
        S* gb = gates + b * kGruSaved * H + u0;
        store_past_caches<V>(gb, rr, m);
        store_past_caches<V>(gb + H, z, m);
        store_past_caches<V>(gb + 2 * H, nn, m);
        store_past_caches<V>(gb + 3 * H, hn, m);
      }
    }
  }
};

struct Steps {
  int64_t T;
  bool reverse;
  int64_t time_at(int64_t s) const { return reverse ? T - 1 - s : s; }
};

// Note [packed input on the fused forward]
// Packed input (batch_sizes given) runs the same loop with step t's rows
// (batch_sizes[t], batch rows 0.. of the longest sequences) at their first row
// of x_proj and the output. A step's product reads all of h_{t-1} while the
// epilogues write h_t, and in reverse the batch grows, rows joining from h0,
// so the state lives in two [B, H] buffers, both h0 at first: step s reads
// buffer s % 2, and its epilogues write h_t to the output and to buffer
// (s + 1) % 2. The cell state is updated in place by row, as for padded input.
// h_n is each row's output at its last step; what is saved for backward is
// in the generic loop's packed row order, whose backward reads it.
struct StepRows {
  std::vector<int64_t> rows, first;  // per time step: rows, first row
  StepRows(int64_t T, int64_t B, c10::IntArrayRef batch_sizes) : rows(T, B), first(T) {
    for (int64_t t = 0, n = 0; t < T; ++t) {
      if (!batch_sizes.empty()) rows[t] = batch_sizes[t];
      first[t] = n;
      n += rows[t];
    }
  }
};

// Where step s (processing order) reads h_{t-1} and, packed, where its
// epilogues also write h_t: padded, h0 or the output of the step before;
// packed, the state buffers hs [2, B, H] (Note [packed input on the fused
// forward]).
template <typename S>
struct StepStates {
  const S *h0, *out;  // [B, H], the output's rows
  S* hs;              // [2 B, H], or null (padded)
  int64_t B, H;
  const StepRows& sr;
  const Steps& st;
  const S* read(int64_t s) const {
    if (hs) return hs + s % 2 * B * H;
    return s == 0 ? h0 : out + sr.first[st.time_at(s - 1)] * H;
  }
  S* write(int64_t s) const { return hs ? hs + (s + 1) % 2 * B * H : nullptr; }
};

// h_n [B, H] of packed input: each batch row's output at its last step, in
// processing order (the rows a step has that the next one has not).
inline Tensor last_states(const Tensor& out, const StepRows& sr, const Steps& st, int64_t B) {
  Tensor h_n = at::empty({B, out.size(1)}, out.options());
  for (int64_t s = 0; s < st.T; ++s) {
    const int64_t t = st.time_at(s), rows = sr.rows[t];
    const int64_t next = s + 1 < st.T ? std::min(rows, sr.rows[st.time_at(s + 1)]) : 0;
    if (next < rows) {
      h_n.narrow(0, next, rows - next).copy_(out.narrow(0, sr.first[t] + next, rows - next));
    }
  }
  return h_n;
}


// The forward drivers' Gemm for vector type V and storage type S: panels
// packed with k in groups of KP (pack_gate_panels), the tile product of Mma
// (panel_gemm.h's MmaVec, fused_avx512_bf16.cpp's MmaBf16) through run_panels.
template <typename V_, typename S_, typename Mma, int KP>
struct PanelGemm {
  using V = V_;
  using S = S_;
  using Packed = typename Mma::Packed;
  static Tensor pack_gates(const Tensor& w, int64_t G) {
    return pack_gate_panels<V, S, KP>(w, G);
  }
  template <int NV, typename Epi>
  static void run(int64_t p0, int64_t p1, int64_t M, int64_t K, const S* a, int64_t lda,
                  const Packed* packed, const Epi& epi) {
    run_panels<V, NV, Mma>(p0, p1, M, K, a, lda, 1, packed, epi);
  }
  // A single step packs W_hh whole here (bfloat16's k pairs); fused_ops.h's
  // VecGemm, float32 and float64, has other ways (the driver's single_step).
  template <int NV, typename Epi>
  static bool single_step(int64_t, int64_t, int64_t, const S*, const S*, const Epi&) {
    return false;
  }
};

// An epilogue of panel p handed to run_panels as panel 0 of a single packed
// panel.
template <typename Epi>
struct PanelAt {
  const Epi& epi;
  int64_t p;
  void prefetch(int64_t m0, int mr, int64_t) const { epi.prefetch(m0, mr, p); }
  template <typename R>
  void operator()(const R* rec, int64_t ldr, int64_t m0, int mr, int64_t) const {
    epi(rec, ldr, m0, mr, p);
  }
};

// Note [a single step panel by panel]
// A single step with more rows than dot_gemm's reads each panel of W_hh once,
// so packing all of W_hh first (a copy of it through memory, in a parallel
// region of its own) only adds traffic: each thread packs one panel at a
// time into a buffer that stays in cache and runs all B rows over it, as
// gemm_panelwise does for the projection. 2-core Xeon with AMX, float32, the
// forward op at T=1, interleaved, panel by panel / all packed first: LSTM
// B=64 H=256 249 / 271 us, B=128 H=256 410 / 424 us, GRU B=48 H=300 174 / 204
// us, B=256 H=256 509 / 516 us; LSTM B=64 H=512 (training) 938 / 924 us.
// Rows a [B, H], w [G*H, H] (V's element type); panels to epi (Gemm::run's).
template <typename Gemm, int NV, typename Epi>
void step_panel_by_panel(int64_t B, int64_t H, int64_t G, const typename Gemm::S* a,
                         const typename Gemm::S* w, const Epi& epi) {
  using V = typename Gemm::V;
  using S = typename Gemm::S;
  constexpr int64_t L = V::kLanes;
  const int64_t P = ceil_div(H, L);
  at::parallel_for(0, P, ceil_div(P, at::get_num_threads()), [&](int64_t p0, int64_t p1) {
    thread_local std::vector<S> panel;
    panel.resize(static_cast<size_t>(H * G * kGateNV * L));
    for (int64_t p = p0; p < p1; ++p) {
      pack_gate_panel<V, S, 1>(w, H, H, G, p, panel.data());
      Gemm::template run<NV>(0, 1, B, H, a, H, panel.data(), PanelAt<Epi>{epi, p});
    }
  });
}

// Where the forward tiles' layout (panel p: gate g's units L p.. at g L)
// holds gate pre-activation n of G*H (gate n / H, unit n % H).
template <int64_t L>
inline int64_t tile_column(int64_t n, int64_t H, int64_t G) {
  const int64_t g = n / H, u = n % H;
  return u / L * G * L + g * L + u % L;
}

// The forward epilogues of all panels, in parallel, over recurrent terms rec
// [B, P G L] already in the tiles' layout (tile_column).
template <typename V, typename Epi>
void epilogues_over(const typename V::T* rec, int64_t B, int64_t H, int64_t G, const Epi& epi) {
  constexpr int64_t L = V::kLanes;
  const int64_t P = ceil_div(H, L), ld = P * G * L;
  at::parallel_for(0, P, ceil_div(P, at::get_num_threads()), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) epi(rec + p * G * L, ld, 0, B, p);
  });
}

// Note [a single step without packing]
// A cell is a layer of one step, for which packing W_hh into gate panels
// cost more than the step itself. With few rows (dot_gemm's), one step
// computes the recurrent terms as dot products along W_hh's rows, straight
// into the layout of the forward tiles (panel p: gate g's units L p.. at
// g L), and runs the epilogue over them. On the 2-core AMD EPYC, LSTMCell
// inference at B=1: H=256, the op 45 -> 22 us (the module 78 -> 59 us,
// nn.LSTMCell 50 us); H=1024, the module 1.31 -> 0.50 ms (nn.LSTMCell
// 1.47 ms). Returns whether it ran.
template <typename V, typename S, typename Epi>
bool single_step_unpacked(int64_t B, int64_t H, int64_t G, const S* a, const S* w,
                          const Epi& epi) {
  using E = typename V::T;
  if constexpr (!std::is_same_v<S, E>) {
    return false;
  } else {
    if (B > dot_max_rows<V>()) return false;
    constexpr int64_t L = V::kLanes;
    const int64_t ld = ceil_div(H, L) * G * L;
    std::vector<E> rec(static_cast<size_t>(B * ld));
    E* r = rec.data();
    const auto rec_at = [r, H, G, ld](int64_t m, int64_t n) -> E& {
      return r[m * ld + tile_column<L>(n, H, G)];
    };
    // One parallel region: each thread's panels, their G gates' dot products,
    // then their epilogues. Against two regions (all dot products, then all
    // epilogues), 2-core Xeon, the forward op at B=1: H=16 12.9-13.0 -> 10.7-11.3
    // us, H=256 28.1-28.4 -> 26.6-27.0 us; from 8 rows at H=1024 within 1%.
    const int64_t P = ceil_div(H, L);
    at::parallel_for(0, P, ceil_div(P, at::get_num_threads()), [&](int64_t p0, int64_t p1) {
      const int64_t u0 = p0 * L, u1 = std::min(H, p1 * L);
      for (int64_t g = 0; g < G; ++g) {
        dot_columns<V>(B, H, a, H, w, nullptr, rec_at, g * H + u0, g * H + u1);
      }
      for (int64_t p = p0; p < p1; ++p) epi(r + p * G * L, ld, 0, B, p);
    });
    return true;
  }
}

// A single step (T = 1) without packing all of W_hh, where a way takes it:
// dot products for a few rows, else Gemm::single_step<NV> (VecGemm's, in
// fused_ops.h: W_hh in place or panel by panel; the bfloat16 Gemms' none). Rows a [B, H], w
// [G*H, H], tiles to epi as Gemm::run's. Returns whether it ran.
template <typename Gemm, int NV, typename Epi>
bool single_step(int64_t T, int64_t B, int64_t H, int64_t G, const typename Gemm::S* a,
                 const typename Gemm::S* w, const Epi& epi) {
  if (T != 1) return false;
  if (single_step_unpacked<typename Gemm::V>(B, H, G, a, w, epi)) return true;
  return Gemm::template single_step<NV>(B, H, G, a, w, epi);
}

// ------------------------------------------------------------------ forward drivers
// Gemm: the tile product for one vector and storage type: Gemm::V, Gemm::S;
// Gemm::Packed, the element type of its packed weights; Gemm::pack_gates(w
// [G*H, H], G) the forward panels; Gemm::run<NV>(p0, p1, M, K, a, lda, packed,
// epi) runs panels [p0, p1) over rows a [M, K] (row stride lda), handing each
// tile (V::T) to epi. Same contracts as lstm_forward_impl / gru_forward_impl in
// recurrence.h, for padded x_proj [T, B, G*H]; arguments already checked.
template <typename Gemm>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_steps(
    const Tensor& x_proj, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const Tensor& b_hh, bool reverse, bool train, c10::IntArrayRef batch_sizes) {
  using V = typename Gemm::V;
  using S = typename Gemm::S;
  using E = typename V::T;
  constexpr auto kAcc = c10::CppTypeToScalarType<E>::value;
  const bool packed = !batch_sizes.empty();  // Note [packed input on the fused forward]
  const int64_t H = w_hh.size(1), B = h0.size(0);
  const int64_t T = packed ? static_cast<int64_t>(batch_sizes.size()) : x_proj.size(0);
  const int64_t N = packed ? x_proj.size(0) : T * B;
  const Steps st{T, reverse};
  const StepRows sr(T, B, batch_sizes);
  const Tensor x = x_proj.contiguous(), bias = b_hh.contiguous(), h0c = h0.contiguous();
  const Tensor w = w_hh.contiguous();
  Tensor out = empty_for_steps({N, H}, x.options());
  Tensor c = c0.to(kAcc).contiguous().clone();  // the cell state stays in E
  Tensor gates = empty_for_steps({train ? N : 0, kLstmGates * H}, x.options());
  Tensor cells = empty_for_steps({train ? N : 0, H}, x.options().dtype(kAcc));
  Tensor hs = packed ? h0c.repeat({2, 1}) : Tensor();
  S* o = out.data_ptr<S>();
  const S *xp = x.data_ptr<S>(), *bp = bias.data_ptr<S>(), *h0p = h0c.data_ptr<S>();
  E* cp = c.data_ptr<E>();
  S* gp = train ? gates.data_ptr<S>() : nullptr;
  E* clp = train ? cells.data_ptr<E>() : nullptr;
  const StepStates<S> states{h0p, o, packed ? hs.data_ptr<S>() : nullptr, B, H, sr, st};
  const auto epi_at = [&](int64_t s) {
    const int64_t f = sr.first[st.time_at(s)];
    return LstmForwardEpi<V, S>{H, xp + f * 4 * H, bp, cp, o + f * H,
                                gp ? gp + f * 4 * H : nullptr, clp ? clp + f * H : nullptr,
                                states.write(s)};
  };
  if (!single_step<Gemm, kLstmGates * kGateNV>(T, sr.rows[0], H, kLstmGates, states.read(0),
                                                w.data_ptr<S>(), epi_at(0))) {
    const Tensor pw = Gemm::pack_gates(w, kLstmGates);
    const auto* wp = pw.data_ptr<typename Gemm::Packed>();
    run_steps(T, ceil_div(H, V::kLanes), [&](int64_t s, int64_t p0, int64_t p1) {
      Gemm::template run<kLstmGates * kGateNV>(p0, p1, sr.rows[st.time_at(s)], H,
                                               states.read(s), H, wp, epi_at(s));
    });
  }
  if (packed) return {out, last_states(out, sr, st, B), c.to(x.scalar_type()), gates, cells};
  Tensor h_n = out.narrow(0, sr.first[st.time_at(T - 1)], B).clone();
  return {out.view({T, B, H}), h_n, c.to(x.scalar_type()), gates, cells};
}

template <typename Gemm>
std::tuple<Tensor, Tensor, Tensor> gru_forward_steps(const Tensor& x_proj, const Tensor& h0,
                                                     const Tensor& w_hh, const Tensor& b_hh,
                                                     bool reverse, bool train,
                                                     c10::IntArrayRef batch_sizes) {
  using V = typename Gemm::V;
  using S = typename Gemm::S;
  const bool packed = !batch_sizes.empty();  // Note [packed input on the fused forward]
  const int64_t H = w_hh.size(1), B = h0.size(0);
  const int64_t T = packed ? static_cast<int64_t>(batch_sizes.size()) : x_proj.size(0);
  const int64_t N = packed ? x_proj.size(0) : T * B;
  const Steps st{T, reverse};
  const StepRows sr(T, B, batch_sizes);
  const Tensor x = x_proj.contiguous(), bias = b_hh.contiguous(), h0c = h0.contiguous();
  const Tensor w = w_hh.contiguous();
  Tensor out = empty_for_steps({N, H}, x.options());
  Tensor gates = empty_for_steps({train ? N : 0, kGruSaved * H}, x.options());
  Tensor hs = packed ? h0c.repeat({2, 1}) : Tensor();
  S* o = out.data_ptr<S>();
  const S *xp = x.data_ptr<S>(), *bp = bias.data_ptr<S>(), *h0p = h0c.data_ptr<S>();
  S* gp = train ? gates.data_ptr<S>() : nullptr;
  const StepStates<S> states{h0p, o, packed ? hs.data_ptr<S>() : nullptr, B, H, sr, st};
  const auto epi_at = [&](int64_t s) {
    const int64_t f = sr.first[st.time_at(s)];
    return GruForwardEpi<V, S>{H, xp + f * 3 * H, bp, states.read(s), o + f * H,
                               gp ? gp + f * kGruSaved * H : nullptr, states.write(s)};
  };
  if (!single_step<Gemm, kGruGates * kGateNV>(T, sr.rows[0], H, kGruGates, states.read(0),
                                               w.data_ptr<S>(), epi_at(0))) {
    const Tensor pw = Gemm::pack_gates(w, kGruGates);
    const auto* wp = pw.data_ptr<typename Gemm::Packed>();
    run_steps(T, ceil_div(H, V::kLanes), [&](int64_t s, int64_t p0, int64_t p1) {
      const auto epi = epi_at(s);
      Gemm::template run<kGruGates * kGateNV>(p0, p1, sr.rows[st.time_at(s)], H, epi.h_prev, H,
                                              wp, epi);
    });
  }
  if (packed) return {out, last_states(out, sr, st, B), gates};
  Tensor h_n = out.narrow(0, sr.first[st.time_at(T - 1)], B).clone();
  return {out.view({T, B, H}), h_n, gates};
}

}  // namespace
}  // namespace cpu
}  // namespace fusedrnn
