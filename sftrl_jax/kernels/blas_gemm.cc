// fp32 matrix product for XLA:CPU through OpenBLAS, as an XLA FFI handler (built with
// `sftrl_jax/kernels/__init__.py`, with causal_attention.cc and rope.cc).
//
// SftrlGemmF32: c [M, N] = op(a) . op(b), with op(a) = a [M, K] (attribute trans_a = 0) or a^T for
// a [K, M] (= 1), and op(b) = b [K, N] (trans_b = 0) or b^T for b [N, K] (= 1). All row-major fp32.
// Leading axes, the same in a, b and c, are a batch: one such product per index (attention's
// q . k^T and p . v, with the batch and kv-head axes leading).
// The transposed forms are what a training step's backward pass needs (dx = g . w^T, dw = x^T . g):
// the BLAS reads the operand transposed, no copy is made.
//
// Why: on the 2-core x86-64 machine measured (docs/BENCHMARKS.md) OpenBLAS's sgemm ran most shapes
// of a training step faster than XLA:CPU's own matmul, most of all the weight gradients x^T . g
// (XLA transposes x first), and the whole SFT step of the benchmark model ~9% faster. The BLAS is the private copy of the
// `scipy-openblas64` wheel (not numpy's), loaded by Python, which hands its `cblas_sgemm` to
// `SftrlSetSgemm` below and sets its thread count to 1: the work is split here over the calling
// thread and XLA's intra-op pool (one single-threaded BLAS call per part, along the longer of M
// and N), so it shares XLA's threads instead of starting a second pool. The split is fixed by the
// shape and `threads`, so a given program computes the same bits every run.

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "blas.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using sftrl::kNoTrans;
using sftrl::kRowMajor;
using sftrl::kTrans;
using sftrl::SgemmFn;

namespace {

std::atomic<SgemmFn> g_sgemm{nullptr};

// Below this many multiply-adds per part a split costs more than it saves.
constexpr int64_t kMinWorkPerPart = int64_t{1} << 21;

ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, int64_t trans_a,
                int64_t trans_b, int64_t threads, ffi::ResultBuffer<ffi::F32> c) {
  SgemmFn sgemm = g_sgemm.load();
  if (sgemm == nullptr) return ffi::Error::Internal("gemm: no BLAS was set (SftrlSetSgemm was not called)");
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const size_t rank = ad.size();
  if (rank < 2 || bd.size() != rank || cd.size() != rank) {
    return ffi::Error::InvalidArgument("gemm: a, b and c must have the same rank, at least 2");
  }
  int64_t batch = 1;  // the leading axes: one product per index, the same in a, b and c
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (bd[i] != ad[i] || cd[i] != ad[i]) return ffi::Error::InvalidArgument("gemm: the batch axes differ");
    batch *= ad[i];
  }
  const int64_t a0 = ad[rank - 2], a1 = ad[rank - 1], b0 = bd[rank - 2], b1 = bd[rank - 1];
  const int64_t m = trans_a ? a1 : a0, k = trans_a ? a0 : a1;
  const int64_t kb = trans_b ? b1 : b0, n = trans_b ? b0 : b1;
  if (k != kb || cd[rank - 2] != m || cd[rank - 1] != n) {
    return ffi::Error::InvalidArgument("gemm: the shapes of a, b and c do not agree");
  }
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* cp = c->typed_data();
  const int64_t lda = a1, ldb = b1, ldc = n;
  const int64_t sa = a0 * a1, sb = b0 * b1, sc = m * n;  // strides of the batch index
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  if (k == 0) {
    std::fill(cp, cp + batch * sc, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t avail = std::max<int64_t>(1, std::min<int64_t>(threads, pool.num_threads()));
  const int64_t by_work = std::max<int64_t>(1, m * n * k / kMinWorkPerPart);
  const bool split_m = m >= n;
  const int64_t len = split_m ? m : n;
  // Each product is cut into parts only when there are fewer products than threads; parts are whole
  // 16-element panels, so each part's BLAS call keeps its full-width kernels.
  const int64_t parts = batch >= avail ? 1 : std::max<int64_t>(1, std::min({avail, by_work, (len + 15) / 16}));
  const int64_t step = ((len + parts - 1) / parts + 15) / 16 * 16;
  const int64_t blocks = batch * parts;
  const int64_t workers = std::min(avail, std::max<int64_t>(1, batch * m * n * k / kMinWorkPerPart));
  sftrl::parallel_for(pool, blocks, workers, [=](int64_t blk) {
    const int64_t i = blk / parts, p = blk % parts;
    const int64_t lo = p * step, hi = std::min(len, lo + step);
    if (lo >= hi) return;
    const float* ai = ap + i * sa;
    const float* bi = bp + i * sb;
    float* ci = cp + i * sc;
    if (split_m) {  // rows lo..hi of c: rows of op(a)
      const float* ap0 = trans_a ? ai + lo : ai + lo * lda;
      sgemm(kRowMajor, ta, tb, hi - lo, n, k, 1.0f, ap0, lda, bi, ldb, 0.0f, ci + lo * ldc, ldc);
    } else {  // columns lo..hi of c: columns of op(b)
      const float* bp0 = trans_b ? bi + lo * ldb : bi + lo;
      sgemm(kRowMajor, ta, tb, m, hi - lo, k, 1.0f, ai, lda, bp0, ldb, 0.0f, ci + lo, ldc);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void SftrlSetSgemm(void* fn) { g_sgemm.store(reinterpret_cast<SgemmFn>(fn)); }

sftrl::SgemmFn sftrl::CurrentSgemm() { return g_sgemm.load(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SftrlGemmF32, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());
