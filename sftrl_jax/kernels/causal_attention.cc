// Causal self-attention of a training step (forward and backward) for XLA:CPU, as XLA FFI handlers
// (built with the other kernels of this folder by `sftrl_jax/kernels/__init__.py`).
//
// Layout: the model's own, q, out, dout [B, T, N, H], k, v [B, T, K, H] (N = K * G query heads, head
// k * G + g of kv head k); mask [B, T, T] bool (True = attend), known to be within the causal
// pattern (query t attends no key s > t); lse [B, K, T * G] the log-sum-exp of a row's scaled scores.
// A "unit" is one (batch row b, kv head k) pair; its G query heads are folded into the rows of its
// products, row (t - t0) * G + g of a block starting at position t0 (packed from q's G heads of
// each position, a copy of G * H floats per position); k and v rows are read in place (stride K * H).
//
// The queries of a unit run in blocks of `block` positions, each against the keys up to its last
// position only (the products above the diagonal are skipped), with the scores of a block in a
// scratch buffer: S = Q K^T, the row softmax, O = P V as single-threaded sgemm calls (the BLAS of
// blas_gemm.cc); the backward pass recomputes P from lse (no [T, T] probabilities are stored),
// then dP = dO V^T, dS = P (dP - rowsum(dO O)) scale, dQ = dS K, dK += dS^T Q, dV += P^T dO.
// Units are spread over the calling thread and XLA's intra-op pool; each unit is computed by one
// thread from start to end, so the result does not depend on the thread count.
//
// A row with no key to attend (a padding position) attends uniformly to all T keys (transformers'
// additive-mask convention, and `ops.attention`'s): its output is the mean of v, its lse +inf.
//
// Why: the blocked attention of XLA ops (`ops.attention`) runs these products as batched BLAS
// calls with the softmax, masking, slicing of the key prefixes and the summing of the gradients of
// those prefixes as separate passes over [B, heads, T, T] arrays; here a block's scores stay in
// cache between its products and softmax.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "blas.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using sftrl::kNoTrans;
using sftrl::kRowMajor;
using sftrl::kTrans;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (x = -inf gives 0), branch-free so that the loops calling it vectorise:
// x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial (truncation below 1e-8;
// the result within a few float ulps of std::exp), 2^n from the exponent bits.
inline float ExpNonPositive(float x) {
  x = x > -87.0f ? x : -87.0f;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const float r = std::fma(n, -0.693145751953125f, std::fma(n, -1.428606765330187e-06f, x));
  float p = 1.0f / 5040;
  p = std::fma(p, r, 1.0f / 720);
  p = std::fma(p, r, 1.0f / 120);
  p = std::fma(p, r, 1.0f / 24);
  p = std::fma(p, r, 1.0f / 6);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Sum of x[0..n) in kLanes interleaved partial sums (so the loop vectorises without -ffast-math).
constexpr int kLanes = 16;
inline float Sum(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l];
  float total = 0.0f;
  for (; j < n; ++j) total += x[j];
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// Largest of x[0..n) (-inf for n = 0), in kLanes interleaved maxima.
inline float Max(const float* x, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = kNegInf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] > x[j + l] ? acc[l] : x[j + l];
  float best = kNegInf;
  for (; j < n; ++j) best = best > x[j] ? best : x[j];
  for (int l = 0; l < kLanes; ++l) best = best > acc[l] ? best : acc[l];
  return best;
}

struct Dims {
  int64_t b, t, n, kv, h, g;
};

ffi::Error CheckDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                     ffi::Buffer<ffi::PRED>& mask, int64_t block, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3) {
    return ffi::Error::InvalidArgument("causal_attention: expected q [B,T,N,H], k/v [B,T,K,H], mask [B,T,T]");
  }
  *d = Dims{qd[0], qd[1], qd[2], kd[2], qd[3], 0};
  for (int i = 0; i < 4; ++i) {
    if (vd[i] != kd[i]) return ffi::Error::InvalidArgument("causal_attention: k and v differ in shape");
  }
  if (d->kv < 1 || d->n % d->kv != 0 || kd[0] != d->b || kd[1] != d->t || kd[3] != d->h || md[0] != d->b ||
      md[1] != d->t || md[2] != d->t || block < 1) {
    return ffi::Error::InvalidArgument("causal_attention: the shapes of q, k, v and mask do not agree");
  }
  d->g = d->n / d->kv;
  return ffi::Error::Success();
}

// What both passes read: the BLAS, the checked dims and the data of q, k, v and mask.
struct Inputs {
  sftrl::SgemmFn sgemm;
  Dims d;
  const float *q, *k, *v;
  const uint8_t* mask;
};

ffi::Error ReadInputs(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                      ffi::Buffer<ffi::PRED>& mask, int64_t block, Inputs* in) {
  in->sgemm = sftrl::CurrentSgemm();
  if (in->sgemm == nullptr) return ffi::Error::Internal("causal_attention: no BLAS was set");
  if (auto err = CheckDims(q, k, v, mask, block, &in->d); err.failure()) return err;
  in->q = q.typed_data();
  in->k = k.typed_data();
  in->v = v.typed_data();
  in->mask = reinterpret_cast<const uint8_t*>(mask.typed_data());
  return ffi::Error::Success();
}

// One unit's view of the [B, T, heads, H] arrays: its k and v rows (stride K * H) and mask [T, T].
struct Unit {
  Unit(const Inputs& in, int64_t u)
      : d(in.d), b(u / d.kv), k(u % d.kv), keys(in.k + KRow(0)), values(in.v + KRow(0)),
        mask(in.mask + b * d.t * d.t) {}
  // Offset of q's (or out's) row (t, g) of this unit, and of k's (v's) row s.
  int64_t QRow(int64_t t) const { return ((b * d.t + t) * d.n + k * d.g) * d.h; }
  int64_t KRow(int64_t s) const { return ((b * d.t + s) * d.kv + k) * d.h; }
  // Rows of positions [t0, t1) of the unit's G heads from x [B, T, N, H] into dst [(t1-t0)*G, H] and back.
  void Pack(const float* x, int64_t t0, int64_t t1, float* dst) const {
    const int64_t span = d.g * d.h;
    for (int64_t t = t0; t < t1; ++t) std::copy(x + QRow(t), x + QRow(t) + span, dst + (t - t0) * span);
  }
  void Unpack(const float* src, int64_t t0, int64_t t1, float* x) const {
    const int64_t span = d.g * d.h;
    for (int64_t t = t0; t < t1; ++t) std::copy(src + (t - t0) * span, src + (t - t0 + 1) * span, x + QRow(t));
  }
  const Dims& d;
  const int64_t b, k;
  const float* const keys;
  const float* const values;
  const uint8_t* const mask;
};

// Masked, scaled scores of block rows (positions t0.., G per position) against keys [0, end) (in `s`,
// leading dim `end`) -> their softmax probabilities in place; lse per row (+inf: no key, row of zeros).
void SoftmaxRows(float* s, int64_t nr, int64_t end, int64_t t0, int64_t g, const uint8_t* mask_b, int64_t t,
                 float scale, float* lse) {
  for (int64_t i = 0; i < nr; ++i) {
    float* row = s + i * end;
    const uint8_t* m = mask_b + (t0 + i / g) * t;
    for (int64_t j = 0; j < end; ++j) {
      const float x = row[j] * scale;
      row[j] = m[j] ? x : kNegInf;
    }
    const float mx = Max(row, end);
    if (mx == kNegInf) {
      std::fill(row, row + end, 0.0f);
      lse[i] = std::numeric_limits<float>::infinity();
      continue;
    }
    for (int64_t j = 0; j < end; ++j) {
      const float e = ExpNonPositive(row[j] - mx);
      row[j] = row[j] > kNegInf ? e : 0.0f;
    }
    const float sum = Sum(row, end);
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < end; ++j) row[j] *= inv;
    lse[i] = mx + std::log(sum);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, float scale, int64_t block, int64_t threads,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Inputs in;
  if (auto err = ReadInputs(q, k, v, mask, block, &in); err.failure()) return err;
  const sftrl::SgemmFn sgemm = in.sgemm;
  const Dims& d = in.d;
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  const int64_t t = d.t, h = d.h, g = d.g, ldk = d.kv * d.h, rows = t * g;
  sftrl::parallel_for(pool, d.b * d.kv, threads, [=](int64_t u) {
    const Unit unit(in, u);
    float* lu = lp + u * rows;
    const int64_t most = std::min(block, t) * g;
    std::vector<float> s(static_cast<size_t>(most * t)), qb(most * h), ob(most * h);
    std::vector<float> mean;  // of v over all keys, for rows with no key
    for (int64_t t0 = 0; t0 < t; t0 += block) {
      const int64_t end = std::min(t, t0 + block), nr = (end - t0) * g, r0 = t0 * g;
      unit.Pack(in.q, t0, end, qb.data());
      sgemm(kRowMajor, kNoTrans, kTrans, nr, end, h, 1.0f, qb.data(), h, unit.keys, ldk, 0.0f, s.data(), end);
      SoftmaxRows(s.data(), nr, end, t0, g, unit.mask, t, scale, lu + r0);
      sgemm(kRowMajor, kNoTrans, kNoTrans, nr, h, end, 1.0f, s.data(), end, unit.values, ldk, 0.0f, ob.data(), h);
      for (int64_t i = 0; i < nr; ++i) {
        if (!std::isinf(lu[r0 + i])) continue;
        if (mean.empty()) {
          mean.assign(h, 0.0f);
          for (int64_t j = 0; j < t; ++j)
            for (int64_t c = 0; c < h; ++c) mean[c] += unit.values[j * ldk + c];
          for (auto& x : mean) x /= static_cast<float>(t);
        }
        std::copy(mean.begin(), mean.end(), ob.data() + i * h);
      }
      unit.Unpack(ob.data(), t0, end, op);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, float scale, int64_t block, int64_t threads,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Inputs in;
  if (auto err = ReadInputs(q, k, v, mask, block, &in); err.failure()) return err;
  const sftrl::SgemmFn sgemm = in.sgemm;
  const Dims& d = in.d;
  if (out.element_count() != q.element_count() || dout.element_count() != q.element_count() ||
      lse.element_count() != d.b * d.n * d.t) {
    return ffi::Error::InvalidArgument("causal_attention: out, dout or lse do not fit q");
  }
  const float* op = out.typed_data();
  const float* lp = lse.typed_data();
  const float* gp = dout.typed_data();
  float* dqp = dq->typed_data();
  float* dkp = dk->typed_data();
  float* dvp = dv->typed_data();
  const int64_t t = d.t, h = d.h, g = d.g, ldk = d.kv * d.h, rows = t * g;
  sftrl::parallel_for(pool, d.b * d.kv, threads, [=](int64_t u) {
    const Unit unit(in, u);
    float* dku = dkp + unit.KRow(0);
    float* dvu = dvp + unit.KRow(0);
    const float* lu = lp + u * rows;
    for (int64_t j = 0; j < t; ++j) {
      std::fill(dku + j * ldk, dku + j * ldk + h, 0.0f);
      std::fill(dvu + j * ldk, dvu + j * ldk + h, 0.0f);
    }
    const int64_t most = std::min(block, t) * g;
    std::vector<float> p(static_cast<size_t>(most * t)), dp(p.size()), qb(most * h), gb(most * h), ob(most * h);
    std::vector<float> uniform;  // sum of dO over rows with no key, / T: their share of every dV row
    for (int64_t t0 = 0; t0 < t; t0 += block) {
      const int64_t end = std::min(t, t0 + block), nr = (end - t0) * g, r0 = t0 * g;
      unit.Pack(in.q, t0, end, qb.data());
      unit.Pack(gp, t0, end, gb.data());
      unit.Pack(op, t0, end, ob.data());
      sgemm(kRowMajor, kNoTrans, kTrans, nr, end, h, 1.0f, qb.data(), h, unit.keys, ldk, 0.0f, p.data(), end);
      sgemm(kRowMajor, kNoTrans, kTrans, nr, end, h, 1.0f, gb.data(), h, unit.values, ldk, 0.0f, dp.data(), end);
      for (int64_t i = 0; i < nr; ++i) {
        float* pr = p.data() + i * end;
        float* dr = dp.data() + i * end;
        const float* gi = gb.data() + i * h;
        const uint8_t* m = unit.mask + (t0 + i / g) * t;
        const float l = lu[r0 + i];
        if (std::isinf(l)) {
          std::fill(pr, pr + end, 0.0f);
          std::fill(dr, dr + end, 0.0f);
          if (uniform.empty()) uniform.assign(h, 0.0f);
          for (int64_t c = 0; c < h; ++c) uniform[c] += gi[c];
          continue;
        }
        float dl = 0.0f;  // rowsum(dO * O)
        for (int64_t c = 0; c < h; ++c) dl += gi[c] * ob[i * h + c];
        for (int64_t j = 0; j < end; ++j) {
          const float e = ExpNonPositive(std::min(pr[j] * scale - l, 0.0f));
          const float x = m[j] ? e : 0.0f;
          pr[j] = x;
          dr[j] = x * (dr[j] - dl) * scale;
        }
      }
      sgemm(kRowMajor, kNoTrans, kNoTrans, nr, h, end, 1.0f, dp.data(), end, unit.keys, ldk, 0.0f, ob.data(), h);
      unit.Unpack(ob.data(), t0, end, dqp);
      sgemm(kRowMajor, kTrans, kNoTrans, end, h, nr, 1.0f, dp.data(), end, qb.data(), h, 1.0f, dku, ldk);
      sgemm(kRowMajor, kTrans, kNoTrans, end, h, nr, 1.0f, p.data(), end, gb.data(), h, 1.0f, dvu, ldk);
    }
    if (!uniform.empty()) {
      for (auto& x : uniform) x /= static_cast<float>(t);
      for (int64_t j = 0; j < t; ++j)
        for (int64_t c = 0; c < h; ++c) dvu[j * ldk + c] += uniform[c];
    }
  });
  return ffi::Error::Success();
}

// The arguments both passes start with: XLA's intra-op pool, q, k, v and mask.
auto BindQkvMask() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SftrlCausalAttentionFwdF32, Forward,
                              BindQkvMask()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(SftrlCausalAttentionBwdF32, Backward,
                              BindQkvMask()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
