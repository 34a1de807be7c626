// The BLAS sgemm shared by blas_gemm.cc and causal_attention.cc (set once from Python through
// `SftrlSetSgemm`, see blas_gemm.cc).

#ifndef SFTRL_KERNELS_BLAS_H_
#define SFTRL_KERNELS_BLAS_H_

#include <cstdint>

namespace sftrl {

// cblas_sgemm with 64-bit integers (the ILP64 `scipy_cblas_sgemm64_`).
using SgemmFn = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                         int64_t ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// The sgemm set by SftrlSetSgemm, or nullptr.
SgemmFn CurrentSgemm();

}  // namespace sftrl

#endif  // SFTRL_KERNELS_BLAS_H_
