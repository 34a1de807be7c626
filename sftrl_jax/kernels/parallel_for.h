// Work splitting for the kernels of this folder (included by blas_gemm.cc, causal_attention.cc and rope.cc).
//
// Blocks are claimed from an atomic counter by the calling thread and up to `threads` - 1 tasks of
// XLA's intra-op pool, so a pool task that starts after the caller has done all the work finds
// nothing left and never touches the buffers (which XLA may free once the handler returns).

#ifndef SFTRL_KERNELS_PARALLEL_FOR_H_
#define SFTRL_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace sftrl {

// Runs fn(block) for block in [0, blocks) on the caller and up to `threads` - 1 pool threads.
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t blocks, int64_t threads, Fn fn) {
  struct Shared {
    explicit Shared(Fn f, int64_t n) : fn(std::move(f)), blocks(n) {}
    Fn fn;
    int64_t blocks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
    void work() {
      int64_t done = 0;
      for (int64_t blk; (blk = next.fetch_add(1)) < blocks;) {
        fn(blk);
        ++done;
      }
      if (done) finished.fetch_add(done);
    }
  };
  auto sh = std::make_shared<Shared>(std::move(fn), blocks);
  const int64_t helpers = std::min<int64_t>(std::min<int64_t>(threads, pool.num_threads()), blocks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([sh] { sh->work(); });
  sh->work();
  while (sh->finished.load() < sh->blocks) std::this_thread::yield();
}

}  // namespace sftrl

#endif  // SFTRL_KERNELS_PARALLEL_FOR_H_
