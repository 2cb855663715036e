// The fused path compiled for AVX-512 (Note [ISA translation units] in
// fused_ops.h): float32 in 16-lane vectors (vec16.h) and float64 in 8-lane
// ones (vec8d.h), tiles of up to 24 zmm accumulators.
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")

#include "vec16.h"
#include "vec8d.h"
// The vector headers first: fused_ops.h's templates find their exp_/tanh_.
#include "fused_ops.h"

namespace fusedrnn {
namespace cpu {

constexpr FusedF32 kFusedAvx512 = fused_ops<simd::Vec16>();
constexpr FusedF64 kFusedAvx512F64 = fused_ops<simd::Vec8d>();

}  // namespace cpu
}  // namespace fusedrnn
