// Note [reused step buffers]
// A training step of an LSTM at T=100, B=64, H=512 allocates about 250 MB of
// buffers that it writes step by step: x_proj, the output, the saved gates,
// the gate gradients. From a fresh mmap on every call, each page is faulted
// in and zeroed by the kernel on first touch; with transparent huge pages,
// which halve that cost on an idle machine (111 -> 78 ms for that training
// forward), the kernel may first compact memory, synchronously: on a machine
// with fragmented memory we measured 0.15-0.33 s of system time per training
// step, more than the step's arithmetic. So the buffers of 512 KiB or more come
// from a cache: freed ones are kept, already touched, for later calls, as
// PyTorch's CUDA caching allocator keeps device memory. A request takes the
// smallest cached block that holds it and is at most twice its size.
// release_step_buffer_cache() (fusedrnn.empty_cpu_cache()) gives all unused
// memory back. Tensors keep a resizable storage on this allocator, as
// at::empty's do. Blocks of 2 MiB or more are whole huge pages; smaller ones
// (from 512 KiB: a layer of H=256's packed weights and weight gradients,
// which glibc's malloc gave back and faulted in again on every call) go by
// 64 KiB, without the hint.
//
// Note [what the step-buffer cache keeps]
// The cache keeps as much unused memory as was handed out at once within the
// last one or two windows of kWindow requests (at least kMinLimit, at most a
// quarter of the machine's memory): a training step of an LSTM at T=100,
// B=128, H=2048 hands out about 1.4 GB, and a fixed 1 GiB limit unmapped part
// of it after every step, to fault it in again on the next (1.5-1.95 s of
// system time in a 6.5 s step). Over the limit, the blocks given back
// longest ago go first, and before mapping fresh memory the cache unmaps
// blocks that no request has taken within kWindow requests: blocks that an
// earlier layer size left behind and the present one cannot use. Evicting the
// largest blocks first instead threw away the present call's own buffers and
// kept a previous size's smaller ones.
#include "step_buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>

namespace fusedrnn {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(1) << 21;
constexpr size_t kMinCached = size_t(512) << 10;  // smaller buffers: at::empty
constexpr size_t kSmallUnit = size_t(64) << 10;   // blocks under a huge page: 64 KiB steps
constexpr size_t kMinLimit = size_t(1) << 30;     // unused bytes the cache may always keep
constexpr uint64_t kWindow = 128;                 // requests (Note [what the step-buffer cache keeps])

class StepBufferCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCached) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t unit = n >= kHugePage ? kHugePage : kSmallUnit;
    const size_t bytes = (n + unit - 1) & ~(unit - 1);
    void* p = take(bytes);
    if (p == nullptr) {
      drop_stale();
      p = map(bytes);
      handed_out(bytes);
    }
    return {p, new Block{this, p, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [bytes, b] : free_) munmap(b.p, bytes);
    free_.clear();
    cached_ = 0;
  }

 private:
  struct Block {
    StepBufferCache* cache;
    void* p;
    size_t bytes;
  };
  struct Free {
    void* p;
    uint64_t given_back;  // requests_ then
  };

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    b->cache->give_back(b->p, b->bytes);
    delete b;
  }

  // Anonymous memory; from 2 MiB on, aligned to 2 MiB with the huge-page hint.
  static void* map(size_t bytes) {
    if (bytes < kHugePage) {
      void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      return p;
    }
    const size_t span = bytes + kHugePage;
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    const auto begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (begin + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
    if (aligned > begin) munmap(raw, aligned - begin);
    const uintptr_t end = begin + span, used_end = aligned + bytes;
    if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
    madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
    return reinterpret_cast<void*>(aligned);
  }

  // A cached block for `bytes` (counted as a request), or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (++requests_ % kWindow == 0) {
      peak_before_ = peak_now_;
      peak_now_ = live_;
    }
    const auto it = free_.lower_bound(bytes);
    if (it == free_.end() || it->first > 2 * bytes) return nullptr;
    void* p = it->second.p;
    cached_ -= it->first;
    live_ += it->first;
    peak_now_ = std::max(peak_now_, live_);
    free_.erase(it);
    return p;
  }

  void handed_out(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_ += bytes;
    peak_now_ = std::max(peak_now_, live_);
  }

  void give_back(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_ -= bytes;
    free_.emplace(bytes, Free{p, requests_});
    cached_ += bytes;
    static const size_t max_limit = std::max<size_t>(
        kMinLimit, size_t(sysconf(_SC_PHYS_PAGES)) * size_t(sysconf(_SC_PAGESIZE)) / 4);
    const size_t limit = std::min(std::max({kMinLimit, peak_now_, peak_before_}), max_limit);
    while (cached_ > limit) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second.given_back < oldest->second.given_back) oldest = it;
      unmap(oldest);
    }
  }

  // Before fresh memory is mapped: unmap the blocks no request took lately.
  void drop_stale() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end();) {
      const auto next = std::next(it);
      if (requests_ - it->second.given_back > kWindow) unmap(it);
      it = next;
    }
  }

  void unmap(std::multimap<size_t, Free>::iterator it) {
    munmap(it->second.p, it->first);
    cached_ -= it->first;
    free_.erase(it);
  }

  std::mutex mutex_;
  std::multimap<size_t, Free> free_;  // size -> block
  size_t cached_ = 0;                 // bytes in free_
  size_t live_ = 0;                   // bytes handed out and not given back
  uint64_t requests_ = 0;
  size_t peak_now_ = 0, peak_before_ = 0;  // most live bytes in this window and the last
};

// Never destroyed: tensors freed during interpreter shutdown still return here.
StepBufferCache& cache() {
  static auto* c = new StepBufferCache();
  return *c;
}

}  // namespace

at::Tensor empty_for_steps(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::Tensor(at::detail::empty_generic(
      sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
      c10::typeMetaToScalarType(options.dtype()), options.memory_format_opt()));
}

int64_t step_buffer_cache_bytes() { return cache().cached_bytes(); }

// A uint8 tensor of n bytes from the cache, for the tests of its policy.
at::Tensor step_buffer(int64_t n) { return empty_for_steps({n}, at::TensorOptions(at::kByte)); }

void release_step_buffer_cache() { cache().clear(); }

// fusedrnn.empty_cpu_cache() and the tests' view of the cache.
TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def("_step_buffer_cache_bytes() -> int", &step_buffer_cache_bytes);
  m.def("_empty_step_buffer_cache() -> ()", &release_step_buffer_cache);
  m.def("_step_buffer(int n) -> Tensor", &step_buffer);
}

}  // namespace cpu
}  // namespace fusedrnn
