#pragma once
// The CPU multi-tensor launcher, written once for every optimizer: all tensors of a call are cut
// into one flat list of chunks, and the chunks are spread over torch's intra-op threads together.
// A step over 2000 small tensors therefore costs one parallel region, not 2000.

#include <cstdint>
#include <vector>

#include "cpu/kernel_table.h"

namespace dldna_fused::cpu {

// Elements per chunk: large enough to amortize the per-chunk call, small enough that one large
// tensor still splits over every thread.
constexpr int64_t kChunkElements = 32768;

// Chunks covering `numels[i]` elements of each tensor i; zero-size tensors get none.
std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels);

// Runs `kernel(chunks[b..e))` over the threads; each thread gets a contiguous run of chunks and at
// least ~kChunkElements * 2 elements of work, so tiny calls stay on the calling thread.
void parallel_over_chunks(const std::vector<Chunk>& chunks, int64_t total_elements,
                          void (*kernel)(const void* launch, const Chunk* chunks, int64_t n),
                          const void* launch);

template <typename Launch>
void parallel_over_chunks(const std::vector<Chunk>& chunks, int64_t total_elements,
                          void (*kernel)(const Launch&, const Chunk*, int64_t), const Launch& launch) {
  // One erased signature keeps the threading code out of the headers.
  struct Thunk {
    void (*kernel)(const Launch&, const Chunk*, int64_t);
    const Launch* launch;
  } thunk{kernel, &launch};
  parallel_over_chunks(
      chunks, total_elements,
      [](const void* t, const Chunk* c, int64_t n) {
        const auto* self = static_cast<const Thunk*>(t);
        self->kernel(*self->launch, c, n);
      },
      &thunk);
}

}  // namespace dldna_fused::cpu
