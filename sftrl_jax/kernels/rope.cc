// RoPE rotation of a training step's q or k for XLA:CPU, an XLA FFI handler (built with the other
// kernels of this folder by `sftrl_jax/kernels/__init__.py`).
//
// x, y [B, T, N, H]; cos, sin [B, T, H/2] (`ops.rope_cos_sin`). Per (b, t, n), with halves
// x1 = x[..., :H/2], x2 = x[..., H/2:]: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin, the arithmetic of
// `ops.xla.rope`. `inverse` rotates by the opposite angle (sin -> -sin), the transpose of the
// rotation: the backward pass.
//
// Why: XLA:CPU fuses the trigonometry of the angles into the rotation's loop over [B, T, N, H] and
// evaluates it for every head and half (4.4 ms for one q at 8 x 256 x 8 x 64); with the tables
// computed once and read here, the rotation is one pass over x.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One (b, t) position: its N heads with the position's cos and sin rows. The rounding is that of
// XLA:CPU's loops for `ops.xla.rope` and its transpose (measured bit for bit): the forward with one
// fused multiply-add per output (fma(x1, c, -(x2 s)), fma(x2, c, x1 s)), the inverse with none.
__attribute__((optimize("fp-contract=off"))) void RotateRow(const float* x, const float* c, const float* s,
                                                               bool inverse, int64_t n, int64_t half, float* y) {
  for (int64_t head = 0; head < n; ++head) {
    const float* x1 = x + head * 2 * half;
    const float* x2 = x1 + half;
    float* y1 = y + head * 2 * half;
    float* y2 = y1 + half;
    if (inverse) {
      for (int64_t i = 0; i < half; ++i) {
        y1[i] = x1[i] * c[i] + x2[i] * s[i];
        y2[i] = x2[i] * c[i] - x1[i] * s[i];
      }
    } else {
      for (int64_t i = 0; i < half; ++i) {
        y1[i] = std::fma(x1[i], c[i], -(x2[i] * s[i]));
        y2[i] = std::fma(x2[i], c[i], x1[i] * s[i]);
      }
    }
  }
}

ffi::Error Rope(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                int64_t inverse, int64_t threads, ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = x.dimensions();
  if (dims.size() != 4 || dims[3] % 2) return ffi::Error::InvalidArgument("rope: x must be [B, T, N, H] with H even");
  const int64_t rows = dims[0] * dims[1], n = dims[2], half = dims[3] / 2;
  if (cos.element_count() != rows * half || sin.element_count() != rows * half)
    return ffi::Error::InvalidArgument("rope: cos and sin must be [B, T, H/2]");
  const float* xp = x.typed_data();
  const float* cp = cos.typed_data();
  const float* sp = sin.typed_data();
  float* yp = y->typed_data();
  // Blocks of whole positions, ~64 K floats each (one position's result never depends on the split).
  const int64_t per_block = std::max<int64_t>(1, (int64_t{1} << 16) / (n * 2 * half));
  const int64_t blocks = (rows + per_block - 1) / per_block;
  sftrl::parallel_for(pool, blocks, threads, [=](int64_t blk) {
    const int64_t end = std::min(rows, (blk + 1) * per_block);
    for (int64_t r = blk * per_block; r < end; ++r)
      RotateRow(xp + r * n * 2 * half, cp + r * half, sp + r * half, inverse != 0, n, half, yp + r * n * 2 * half);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SftrlRopeF32, Rope,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("inverse")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());
