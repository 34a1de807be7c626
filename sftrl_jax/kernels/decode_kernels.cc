// Decode-step kernels for XLA:CPU, as XLA FFI handlers (built by `sftrl_jax/kernels/__init__.py`).
//
// 1. SftrlDecodeAttentionF32: one query token per row against a KV cache. Inputs (row-major,
//    fp32): q [B, N, H], k and v [B, K, S, H] (kv heads before slots), mask [B, S] (bool: the
//    slot holds a key this row may attend to), n [] int32 (only slots < n are read; every slot at
//    or after n must be masked out). Output [B, N, H]. Attributes: scale, threads.
//    The arithmetic is `sftrl_jax.sampling.decode._attend`'s: scores q.k * scale, masked slots at
//    float's lowest value, softmax with the maximum subtracted, the value sum normalised after the
//    product. A row with no key at all averages every slot < n uniformly, as the masked softmax
//    does. What the kernel adds over XLA's ops: slots past `n` are never read (XLA's static
//    shapes read the whole cache every step), one pass per (row, kv head) with the G query heads
//    of the group sharing each key and value load, and no per-op dispatch.
//
// 2. SftrlSkinnyMatmulF32: y [O, B] = w [O, I] . x^T for a handful of rows B (the decode step's
//    projections: every weight is read once per step, for all B rows at once). x is [B, I]
//    (attribute x_transposed = 0) or [I, B] (= 1). x is packed as [I, B8] (B rounded up to 8),
//    and a register-blocked micro-kernel keeps a 6-row x 16-column tile of y in 12 vector
//    registers, broadcasting one weight at a time against 16 packed x values (one fused
//    multiply-add per weight and row). Sums run over i in order, one per output.
//
// Work is split in blocks over the calling thread and XLA's intra-op pool (parallel_for.h).

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // partial sums of a dot product, kept apart so the compiler vectorises
typedef float v8 __attribute__((vector_size(32), aligned(4)));  // 8 floats, unaligned access

inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline float hsum(v8 a) {
  float s = 0.0f;
  for (int l = 0; l < 8; ++l) s += a[l];
  return s;
}

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const bool* mask;
  float* out;
  int64_t b, n_heads, kv_heads, slots, head_dim, n;
  float scale;
};

inline float dot(const float* a, const float* b, int64_t h) {
  float acc[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= h; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (; i < h; ++i) acc[i % kLanes] += a[i] * b[i];
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// Scores of one query against slots [0, n) (masked slots at `lowest`; all of them when no slot
// may be attended to: equal scores, a uniform average, as the masked softmax gives).
template <int HD>
inline void scores_fixed(const float* q, const float* kb, const bool* mask, bool any, int64_t n, float scale,
                         float* out) {
  v8 qv[HD / 8];
  for (int j = 0; j < HD / 8; ++j) qv[j] = load8(q + 8 * j);
  for (int64_t s = 0; s < n; ++s) {
    if (!(any && mask[s])) {
      out[s] = -FLT_MAX;
      continue;
    }
    const float* ks = kb + s * HD;
    v8 a0 = v8{}, a1 = v8{};
    for (int j = 0; j < HD / 8; j += 2) {
      a0 += qv[j] * load8(ks + 8 * j);
      if (j + 1 < HD / 8) a1 += qv[j + 1] * load8(ks + 8 * j + 8);
    }
    out[s] = hsum(a0 + a1) * scale;
  }
}

// out[:HD] = sum_s e[s] * v[s, :HD] / sum_s e[s].
template <int HD>
inline void values_fixed(const float* e, const float* vb, int64_t n, float* out) {
  v8 acc[HD / 8];
  for (int j = 0; j < HD / 8; ++j) acc[j] = v8{};
  float total = 0.0f;
  for (int64_t s = 0; s < n; ++s) {
    const float es = e[s];
    total += es;
    if (es == 0.0f) continue;
    const float* vs = vb + s * HD;
    for (int j = 0; j < HD / 8; ++j) acc[j] += es * load8(vs + 8 * j);
  }
  for (int j = 0; j < HD / 8; ++j) {
    v8 r = acc[j] / total;
    *reinterpret_cast<v8*>(out + 8 * j) = r;
  }
}

// Any head size.
inline void scores_any(const float* q, const float* kb, const bool* mask, bool any, int64_t n, int64_t h,
                       float scale, float* out) {
  for (int64_t s = 0; s < n; ++s) out[s] = (any && mask[s]) ? dot(q, kb + s * h, h) * scale : -FLT_MAX;
}

inline void values_any(const float* e, const float* vb, int64_t n, int64_t h, float* out) {
  std::fill(out, out + h, 0.0f);
  float total = 0.0f;
  for (int64_t s = 0; s < n; ++s) {
    const float es = e[s];
    total += es;
    if (es == 0.0f) continue;
    const float* vs = vb + s * h;
    for (int64_t i = 0; i < h; ++i) out[i] += es * vs[i];
  }
  for (int64_t i = 0; i < h; ++i) out[i] /= total;
}

// One (row, kv head) block: the G = n_heads / kv_heads query heads of the group, one at a time
// (the group's keys and values stay in cache between them).
void block(const Problem& p, int64_t blk, std::vector<float>& scores) {
  const int64_t row = blk / p.kv_heads, kv = blk % p.kv_heads;
  const int64_t g_count = p.n_heads / p.kv_heads, h = p.head_dim, n = p.n;
  const float* kb = p.k + (row * p.kv_heads + kv) * p.slots * h;
  const float* vb = p.v + (row * p.kv_heads + kv) * p.slots * h;
  const bool* mask = p.mask + row * p.slots;
  scores.resize(n);
  float* sc = scores.data();
  bool any = false;
  for (int64_t s = 0; s < n; ++s) any |= mask[s];
  for (int64_t g = 0; g < g_count; ++g) {
    const int64_t head = row * p.n_heads + kv * g_count + g;
    const float* qg = p.q + head * h;
    float* og = p.out + head * h;
    if (h == 64) {
      scores_fixed<64>(qg, kb, mask, any, n, p.scale, sc);
    } else if (h == 128) {
      scores_fixed<128>(qg, kb, mask, any, n, p.scale, sc);
    } else {
      scores_any(qg, kb, mask, any, n, h, p.scale, sc);
    }
    float m = -FLT_MAX;
    for (int64_t s = 0; s < n; ++s) m = std::max(m, sc[s]);
    for (int64_t s = 0; s < n; ++s) sc[s] = std::exp(sc[s] - m);
    if (h == 64) {
      values_fixed<64>(sc, vb, n, og);
    } else if (h == 128) {
      values_fixed<128>(sc, vb, n, og);
    } else {
      values_any(sc, vb, n, h, og);
    }
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                           ffi::BufferR0<ffi::S32> n, float scale, int64_t threads,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions();
  auto vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || mask.dimensions().size() != 2 ||
      !std::equal(kd.begin(), kd.end(), vd.begin())) {
    return ffi::Error::InvalidArgument("decode_attention: expected q [B,N,H], k/v [B,K,S,H], mask [B,S]");
  }
  Problem p;
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.mask = mask.typed_data();
  p.out = out->typed_data();
  p.b = qd[0];
  p.n_heads = qd[1];
  p.head_dim = qd[2];
  p.kv_heads = kd[1];
  p.slots = kd[2];
  p.scale = scale;
  p.n = std::clamp<int64_t>(*n.typed_data(), 1, p.slots);
  if (kd[0] != p.b || kd[3] != p.head_dim || p.n_heads % p.kv_heads != 0 ||
      mask.dimensions()[0] != p.b || mask.dimensions()[1] != p.slots) {
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, k, v and mask do not agree");
  }
  sftrl::parallel_for(pool, p.b * p.kv_heads, threads, [p](int64_t blk) {
    thread_local std::vector<float> scores;
    block(p, blk, scores);
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- skinny matmul

constexpr int kRows = 6;   // rows of w per micro-tile
constexpr int kVecs = 2;   // 8-float vectors of packed x per micro-tile (16 columns)
constexpr int64_t kRowsPerBlock = 16 * kRows;  // rows of w per parallel block

// y[o, c0 : c0 + 8 * NV] for o in [o0, o0 + R), from packed x [I, bp] (columns c0 ...).
template <int R, int NV>
inline void tile(const float* w, int64_t in, const float* xp, int64_t bp, int64_t c0, int64_t o0,
                 float* y, int64_t b) {
  v8 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = v8{};
  const float* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (o0 + r) * in;
  const float* xc = xp + c0;
  for (int64_t i = 0; i < in; ++i) {
    v8 xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = *reinterpret_cast<const v8*>(xc + i * bp + 8 * j);
    for (int r = 0; r < R; ++r) {
      const float wi = wr[r][i];
      for (int j = 0; j < NV; ++j) acc[r][j] += wi * xv[j];
    }
  }
  const int64_t cols = std::min<int64_t>(8 * NV, b - c0);
  for (int r = 0; r < R; ++r) {
    float* yr = y + (o0 + r) * b + c0;
    if (cols == 8 * NV) {
      for (int j = 0; j < NV; ++j) *reinterpret_cast<v8*>(yr + 8 * j) = acc[r][j];
    } else {
      float tmp[8 * NV];
      for (int j = 0; j < NV; ++j) *reinterpret_cast<v8*>(tmp + 8 * j) = acc[r][j];
      std::copy(tmp, tmp + cols, yr);
    }
  }
}

template <int R>
inline void row_tile(const float* w, int64_t in, const float* xp, int64_t bp, int64_t o0, float* y, int64_t b) {
  int64_t c0 = 0;
  for (; c0 + 8 * kVecs <= bp; c0 += 8 * kVecs) tile<R, kVecs>(w, in, xp, bp, c0, o0, y, b);
  if (c0 < bp) tile<R, 1>(w, in, xp, bp, c0, o0, y, b);  // bp is a multiple of 8
}

void rows(const float* w, int64_t in, const float* xp, int64_t bp, int64_t o0, int64_t o1, float* y, int64_t b) {
  int64_t o = o0;
  for (; o + kRows <= o1; o += kRows) row_tile<kRows>(w, in, xp, bp, o, y, b);
  switch (o1 - o) {
    case 5: row_tile<5>(w, in, xp, bp, o, y, b); break;
    case 4: row_tile<4>(w, in, xp, bp, o, y, b); break;
    case 3: row_tile<3>(w, in, xp, bp, o, y, b); break;
    case 2: row_tile<2>(w, in, xp, bp, o, y, b); break;
    case 1: row_tile<1>(w, in, xp, bp, o, y, b); break;
    default: break;
  }
}

ffi::Error SkinnyMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> x,
                        int64_t x_transposed, int64_t threads, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions(), xd = x.dimensions();
  if (wd.size() != 2 || xd.size() != 2) {
    return ffi::Error::InvalidArgument("skinny_matmul: expected w [O, I] and x [B, I] or [I, B]");
  }
  const int64_t out = wd[0], in = wd[1];
  const int64_t b = x_transposed ? xd[1] : xd[0];
  if ((x_transposed ? xd[0] : xd[1]) != in || y->dimensions()[0] != out || y->dimensions()[1] != b) {
    return ffi::Error::InvalidArgument("skinny_matmul: shapes of w, x and y do not agree");
  }
  const int64_t bp = (b + 7) / 8 * 8;
  thread_local std::vector<float> packed;
  packed.assign(in * bp, 0.0f);
  const float* xs = x.typed_data();
  for (int64_t i = 0; i < in; ++i) {
    float* row = packed.data() + i * bp;
    if (x_transposed) {
      std::copy(xs + i * b, xs + (i + 1) * b, row);
    } else {
      for (int64_t c = 0; c < b; ++c) row[c] = xs[c * in + i];
    }
  }
  const float* wp = w.typed_data();
  const float* xp = packed.data();
  float* yp = y->typed_data();
  const int64_t blocks = (out + kRowsPerBlock - 1) / kRowsPerBlock;
  sftrl::parallel_for(pool, blocks, threads, [=](int64_t blk) {
    const int64_t o0 = blk * kRowsPerBlock;
    rows(wp, in, xp, bp, o0, std::min(out, o0 + kRowsPerBlock), yp, b);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SftrlDecodeAttentionF32, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SftrlSkinnyMatmulF32, SkinnyMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("x_transposed")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());
