// Large step buffers for the fused CPU paths (Note [reused step buffers]).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fusedrnn {
namespace cpu {

// An uninitialised CPU tensor for a buffer written step by step (outputs,
// saved gates, gate gradients, x_proj, packed weights, weight gradients):
// at::empty's, but buffers of 512 KiB or more come from a cache of memory that
// earlier calls have touched.
at::Tensor empty_for_steps(at::IntArrayRef sizes, const at::TensorOptions& options);

// What the cache holds unused, in bytes (for tests), and a way to give it back.
int64_t step_buffer_cache_bytes();
void release_step_buffer_cache();

}  // namespace cpu
}  // namespace fusedrnn
