// Decode attention over a merged KV cache on CPU tensors: dymu::native_vtu_decode_attention
// (issue 11; the spec is dymu_kernels/vtu_decode/reference.py).
//
// out[b, h, t] = sum_j softmax_j(rope(q[b,h,t], p_t) . rope(K[b,g,u(j)], j) * scale) V[b,g,u(j)]
// over the positions j < full_lengths[b], j <= p_t (u = pos_map[b], g = h / (Hq / Hkv)); a query
// that sees no key gets 0.
//
// Algorithm, one work item per (batch b, kv head g, block of up to kBlockQ queries of that kv
// head: its group query heads times Tq query positions), items run in parallel:
//   1. rotate the block's queries at their positions (fp32, scale folded in).
//   2. per merged row r, read K[r] once and form, for every query of the block, the coefficient
//      vectors of the RoPE dot product, so that the logit at any position j of that row is
//          q' . rope(k, j) = sum_w cos[j][w] * C[r][w] + sin[j][w] * S[r][w].
//      With HF tables (both halves of cos/sin equal, checked once per call) w runs over D/2:
//          C_i = q_i k_i + q_{i+h} k_{i+h},   S_i = q_{i+h} k_i - q_i k_{i+h};
//      otherwise over all D (C_d = q_d k_d, S = q . rotate_half(k) term by term).
//      The logit of a position costs D multiply-adds: the key is never rotated or rebuilt.
//      With >= 4 queries per kv head (GQA, or several query positions) the tables would be
//      rows x queries x D floats and outgrow the caches; there each position's key is rotated
//      once in a scratch row (from an fp32 copy of the K rows) and dotted with all its queries.
//      Small-query items pack several kv heads (up to 8 queries) so one read of a position's
//      cos/sin row serves them all.
//   3. logits of the visible positions, their max, then the softmax weights summed per row.
//   4. out = sum over the rows a visible position maps to of weight(r) * V[r] / sum: every V
//      row is read once per block, not once per position.
// Nothing full-length is materialised except one fp32 logit per (query, visible position).
//
// Masking: positions that are hidden from a query are never read for it (the loops stop at
// its limit; map entries beyond full_lengths are never dereferenced), and a row contributes V
// only when a visible position maps to it, so NaN/inf there cannot leak; NaN/inf at visible
// keys propagates as in the reference. Map entries at existing positions are clamped into
// [0, R) (the Python layer validates them). Deterministic: each item is a fixed sequential loop.
//
// Limitations: CPU only, inference only; scratch per item R * queries * D floats (coefficients)
// or R * D per kv head (GQA path), plus queries * P logits; no intrinsics (GCC target_clones
// gives the hot loops an AVX2/FMA version picked at load time on x86-64).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace dymu {
namespace {

constexpr int64_t kBlockQ = 16;      // queries of one kv head per work item (share every K/V row read)
constexpr int64_t kQueriesItem = 8;  // kv heads are packed into an item up to this many queries, so
                                     // one read of a position's cos/sin row serves them all
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct DecodeProblem {
  int64_t B, Hq, Hkv, Tq, R, P, D, group, W;  // W: coefficient width (D/2 with HF tables, else D)
  float scale;
  const float* cos;
  const float* sin;
  int64_t cs_b, cs_p, cs_d;  // strides of cos/sin (same layout, checked)
  const int32_t* map;        // [B, P] contiguous
  const int32_t* qpos;       // [B, Tq] contiguous
  const int32_t* lengths;    // [B] contiguous
};

template <typename T>
struct Strided4 {
  const T* data;
  int64_t s0, s1, s2, s3;
  const T* row(int64_t a, int64_t b, int64_t c) const { return data + a * s0 + b * s1 + c * s2; }
};

template <typename T>
Strided4<T> view4(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
inline void load_row(const T* src, int64_t stride, int64_t n, float* dst) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d * stride]);
}

// The logit of one position for `nq` queries: coefficient blocks coef[q] = [C (W) ; S (W)].
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
void position_logits(const float* __restrict c, const float* __restrict s, const float* __restrict coef,
                     int64_t nq, int64_t W, float* __restrict out) {
  for (int64_t q = 0; q < nq; ++q) {
    const float* C = coef + q * 2 * W;
    const float* S = C + W;
    float acc = 0.f;
    for (int64_t w = 0; w < W; ++w) acc += c[w] * C[w] + s[w] * S[w];
    out[q] = acc;
  }
}

// Logits of positions [0, n) (unit-stride cos/sin rows): logit[q][j] for the nq queries.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
void all_logits(const int32_t* __restrict map, int64_t n, int64_t R, const float* __restrict cbase,
                const float* __restrict sbase, int64_t cs_p, const float* __restrict coef, int64_t nq, int64_t W,
                float* __restrict logit, int64_t ld) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t r = std::min<int64_t>(std::max<int64_t>(map[j], 0), R - 1);
    const float* c = cbase + j * cs_p;
    const float* s = sbase + j * cs_p;
    const float* cf = coef + r * nq * 2 * W;
    for (int64_t q = 0; q < nq; ++q) {
      const float* C = cf + q * 2 * W;
      const float* S = C + W;
      float acc = 0.f;
      for (int64_t w = 0; w < W; ++w) acc += c[w] * C[w] + s[w] * S[w];
      logit[q * ld + j] = acc;
    }
  }
}

// GQA path: per position, rotate its key row (fp32 rows kf [ng][R][D]) at the position once and
// dot it with the nqh queries of that kv head.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
void rotated_logits(const int32_t* __restrict map, int64_t n, int64_t R, const float* __restrict cbase,
                    const float* __restrict sbase, int64_t cs_p, const float* __restrict kf, int64_t ng, int64_t nqh,
                    int64_t D, const float* __restrict qr, float* __restrict kr, float* __restrict logit, int64_t ld) {
  const int64_t h = D / 2;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t r = std::min<int64_t>(std::max<int64_t>(map[j], 0), R - 1);
    const float* c = cbase + j * cs_p;
    const float* s = sbase + j * cs_p;
    for (int64_t gi = 0; gi < ng; ++gi) {
      const float* krow = kf + (gi * R + r) * D;
      for (int64_t d = 0; d < h; ++d) {
        kr[d] = krow[d] * c[d] - krow[d + h] * s[d];
        kr[d + h] = krow[d + h] * c[d + h] + krow[d] * s[d + h];
      }
      for (int64_t i = gi * nqh; i < (gi + 1) * nqh; ++i) {
        const float* a = qr + i * D;
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += a[d] * kr[d];
        logit[i * ld + j] = acc;
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
void axpy(float a, const float* __restrict x, int64_t n, float* __restrict y) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

template <typename T>
void decode_item(const DecodeProblem& p, const Strided4<T>& q, const Strided4<T>& k, const Strided4<T>& v,
                 T* out, int64_t b, int64_t g0, int64_t ng, int64_t q0, int64_t nqh, std::vector<float>& scratch) {
  // queries i in [0, ng * nqh): kv head g0 + i / nqh, flat query q0 + i % nqh of that head
  const int64_t D = p.D, W = p.W, h = D / 2, R = p.R, nq = ng * nqh;
  const int64_t len = std::min<int64_t>(std::max<int64_t>(p.lengths[b], 0), p.P);
  // queries of the item: flat index f in [q0, q0 + nq) over (head in group, t)
  std::vector<int64_t> lim(nq);  // visible positions [0, lim)
  int64_t maxlim = 0;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t t = (q0 + i % nqh) % p.Tq;
    const int64_t pt = p.qpos[b * p.Tq + t];
    lim[i] = std::max<int64_t>(0, std::min<int64_t>(len, pt + 1));
    maxlim = std::max(maxlim, lim[i]);
  }
  // GQA (many queries per kv head): rotate each position's key once and dot it with the head's
  // queries, from an fp32 copy of the rows; otherwise per-row RoPE coefficients (see the top).
  const bool rotate_keys = nqh >= 4 && p.cs_d == 1;
  const int64_t coef_size = rotate_keys ? ng * R * D : R * nq * 2 * W;
  scratch.resize(static_cast<size_t>(nq * D + D + coef_size + nq * std::max<int64_t>(maxlim, 1) + 2 * nq * R + nq * D + 3 * nq));
  float* qr = scratch.data();           // [nq][D] rotated, scaled queries
  float* kb = qr + nq * D;              // [D] one K/V row in fp32
  float* coef = kb + D;                 // [R][nq][2W]
  float* logit = coef + coef_size;      // [nq][maxlim]
  float* wsum = logit + nq * std::max<int64_t>(maxlim, 1);  // [nq][R] softmax weight per row
  float* touched = wsum + nq * R;       // [nq][R] 1 where a visible position maps to the row
  float* acc = touched + nq * R;        // [nq][D]
  float* mx = acc + nq * D;             // [nq]
  float* den = mx + nq;                 // [nq]
  const float* cbase = p.cos + b * p.cs_b;
  const float* sbase = p.sin + b * p.cs_b;
  const int32_t* map = p.map + b * p.P;

  // 1. rotated queries
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t f = q0 + i % nqh, hh = (g0 + i / nqh) * p.group + f / p.Tq, t = f % p.Tq;
    const int64_t pt = p.qpos[b * p.Tq + t];
    float* dst = qr + i * D;
    load_row(q.row(b, hh, t), q.s3, D, kb);
    const float* c = cbase + pt * p.cs_p;
    const float* s = sbase + pt * p.cs_p;
    for (int64_t d = 0; d < D; ++d) {
      const float rot = d < h ? -kb[d + h] : kb[d - h];
      dst[d] = (kb[d] * c[d * p.cs_d] + rot * s[d * p.cs_d]) * p.scale;
    }
  }
  if (maxlim == 0) {
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t f = q0 + i % nqh, hh = (g0 + i / nqh) * p.group + f / p.Tq, t = f % p.Tq;
      T* o = out + ((b * p.Hq + hh) * p.Tq + t) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(0.f);
    }
    return;
  }
  std::vector<float> lrow(nq);
  for (int64_t i = 0; i < nq; ++i) mx[i] = kNegInf;
  if (rotate_keys) {
    for (int64_t gi = 0; gi < ng; ++gi)
      for (int64_t r = 0; r < R; ++r) load_row(k.row(b, g0 + gi, r), k.s3, D, coef + (gi * R + r) * D);
    rotated_logits(map, maxlim, R, cbase, sbase, p.cs_p, coef, ng, nqh, D, qr, kb, logit, maxlim);
  }
  // 2. coefficients of every row (rows are read once per item)
  for (int64_t r = 0; r < R && !rotate_keys; ++r)
   for (int64_t gi = 0; gi < ng; ++gi) {
    load_row(k.row(b, g0 + gi, r), k.s3, D, kb);
    for (int64_t i = gi * nqh; i < (gi + 1) * nqh; ++i) {
      const float* a = qr + i * D;
      float* C = coef + (r * nq + i) * 2 * W;
      float* S = C + W;
      if (W == h) {
        for (int64_t j = 0; j < h; ++j) {
          C[j] = a[j] * kb[j] + a[j + h] * kb[j + h];
          S[j] = a[j + h] * kb[j] - a[j] * kb[j + h];
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          C[d] = a[d] * kb[d];
          S[d] = d < h ? -a[d] * kb[d + h] : a[d] * kb[d - h];
        }
      }
    }
  }
  // 3. logits, max, weights per row
  std::vector<float> cs_row(2 * W);
  const bool unit = p.cs_d == 1;
  if (unit && !rotate_keys) all_logits(map, maxlim, R, cbase, sbase, p.cs_p, coef, nq, W, logit, maxlim);
  for (int64_t j = 0; j < maxlim && !unit; ++j) {
    const int64_t r = std::min<int64_t>(std::max<int64_t>(map[j], 0), R - 1);
    const float* c = cbase + j * p.cs_p;
    const float* s = sbase + j * p.cs_p;
    if (!unit) {
      for (int64_t w = 0; w < W; ++w) {
        cs_row[w] = c[w * p.cs_d];
        cs_row[W + w] = s[w * p.cs_d];
      }
      c = cs_row.data();
      s = cs_row.data() + W;
    }
    position_logits(c, s, coef + r * nq * 2 * W, nq, W, lrow.data());
    for (int64_t i = 0; i < nq; ++i) logit[i * maxlim + j] = lrow[i];
  }
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < lim[i]; ++j) mx[i] = std::max(mx[i], logit[i * maxlim + j]);
  std::fill(wsum, wsum + 2 * nq * R, 0.f);
  for (int64_t i = 0; i < nq; ++i) {
    float sum = 0.f;
    const float m = mx[i];
    for (int64_t j = 0; j < lim[i]; ++j) {
      const int64_t r = std::min<int64_t>(std::max<int64_t>(map[j], 0), R - 1);
      const float e = std::exp(logit[i * maxlim + j] - m);
      wsum[i * R + r] += e;
      touched[i * R + r] = 1.f;
      sum += e;
    }
    // A NaN logit is never the max (std::max drops it) but its exp is NaN: it propagates.
    den[i] = sum;
  }
  // 4. V rows once per item
  std::fill(acc, acc + nq * D, 0.f);
  for (int64_t r = 0; r < R; ++r) {
    bool any = false;
    for (int64_t i = 0; i < nq; ++i) any |= touched[i * R + r] != 0.f;
    if (!any) continue;
    for (int64_t gi = 0; gi < ng; ++gi) {
      load_row(v.row(b, g0 + gi, r), v.s3, D, kb);
      for (int64_t i = gi * nqh; i < (gi + 1) * nqh; ++i)
        if (touched[i * R + r] != 0.f) axpy(wsum[i * R + r], kb, D, acc + i * D);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t f = q0 + i % nqh, hh = (g0 + i / nqh) * p.group + f / p.Tq, t = f % p.Tq;
    T* o = out + ((b * p.Hq + hh) * p.Tq + t) * D;
    const float inv = lim[i] > 0 ? 1.f / den[i] : 0.f;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(lim[i] > 0 ? acc[i * D + d] * inv : 0.f);
  }
}

template <typename T>
void run_decode(const DecodeProblem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out) {
  const auto qv = view4<T>(q), kv = view4<T>(k), vv = view4<T>(v);
  T* o = out.data_ptr<T>();
  const int64_t per_head = p.group * p.Tq;
  const int64_t blocks = (per_head + kBlockQ - 1) / kBlockQ;
  // kv heads per item: several when each has few queries (MHA decode), one otherwise
  const int64_t heads = blocks == 1 ? std::max<int64_t>(1, std::min<int64_t>(p.Hkv, kQueriesItem / per_head)) : 1;
  const int64_t head_blocks = (p.Hkv + heads - 1) / heads;
  const int64_t items = p.B * head_blocks * blocks;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;  // reused across calls (no page faults per step)
    for (int64_t it = begin; it < end; ++it) {
      const int64_t blk = it % blocks, hb = (it / blocks) % head_blocks, b = it / (blocks * head_blocks);
      const int64_t q0 = blk * kBlockQ, g0 = hb * heads;
      decode_item<T>(p, qv, kv, vv, o, b, g0, std::min(heads, p.Hkv - g0), q0, std::min(kBlockQ, per_head - q0), scratch);
    }
  });
}

// Whether cos/sin have both halves equal over the rows [0, rows) of every batch (HF layout).
bool halves_equal(const float* t, int64_t B, int64_t rows, int64_t D, int64_t sb, int64_t sp, int64_t sd) {
  const int64_t h = D / 2;
  const int64_t nb = sb == 0 ? 1 : B;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < rows; ++j) {
      const float* row = t + b * sb + j * sp;
      for (int64_t d = 0; d < h; ++d) {
        const float x = row[d * sd], y = row[(d + h) * sd];
        if (!(x == y) && !(std::isnan(x) && std::isnan(y))) return false;
      }
    }
  return true;
}

void native_vtu_decode_attention(const at::Tensor& q, const at::Tensor& k_rows, const at::Tensor& v_rows,
                                 const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos_map,
                                 const at::Tensor& q_positions, const at::Tensor& full_lengths, double scale,
                                 const at::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu(), "native_vtu_decode_attention (CPU kernel) got a ", q.device(), " tensor");
  TORCH_CHECK(q.dim() == 4 && k_rows.dim() == 4 && k_rows.sizes() == v_rows.sizes(), "q [B,Hq,Tq,D], k/v rows [B,Hkv,R,D]");
  TORCH_CHECK(q.scalar_type() == k_rows.scalar_type() && q.scalar_type() == v_rows.scalar_type(), "q, k_rows, v_rows dtypes differ");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 3 && cos.sizes() == sin.sizes() &&
                  cos.strides() == sin.strides(),
              "cos/sin must be float32 [B, P', D] with one layout");
  TORCH_CHECK(pos_map.scalar_type() == at::kInt && pos_map.dim() == 2 && pos_map.is_contiguous(), "pos_map must be contiguous int32 [B, P]");
  TORCH_CHECK(q_positions.scalar_type() == at::kInt && q_positions.is_contiguous(), "q_positions must be contiguous int32 [B, Tq]");
  TORCH_CHECK(full_lengths.scalar_type() == at::kInt && full_lengths.is_contiguous(), "full_lengths must be contiguous int32 [B]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous(), "out must be contiguous like q");
  DecodeProblem p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Tq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k_rows.size(1);
  p.R = k_rows.size(2);
  p.P = pos_map.size(1);
  TORCH_CHECK(k_rows.size(0) == p.B && k_rows.size(3) == p.D && p.Hkv > 0 && p.Hq % p.Hkv == 0 && p.D % 2 == 0, "shape mismatch");
  TORCH_CHECK(pos_map.size(0) == p.B && q_positions.size(0) == p.B && q_positions.size(1) == p.Tq && full_lengths.size(0) == p.B,
              "batch/Tq mismatch");
  TORCH_CHECK(cos.size(0) == p.B && cos.size(2) == p.D && cos.size(1) >= p.P, "cos/sin must be [B, >= P, D]");
  if (p.B == 0 || p.Hq == 0 || p.Tq == 0) return;
  TORCH_CHECK(p.R > 0, "k_rows must hold at least one row");
  p.group = p.Hq / p.Hkv;
  p.scale = static_cast<float>(scale);
  p.cos = cos.const_data_ptr<float>();
  p.sin = sin.const_data_ptr<float>();
  p.cs_b = cos.stride(0);
  p.cs_p = cos.stride(1);
  p.cs_d = cos.stride(2);
  p.map = pos_map.const_data_ptr<int32_t>();
  p.qpos = q_positions.const_data_ptr<int32_t>();
  p.lengths = full_lengths.const_data_ptr<int32_t>();
  const int32_t* qp = p.qpos;
  for (int64_t i = 0; i < p.B * p.Tq; ++i)
    TORCH_CHECK(qp[i] >= 0 && qp[i] < cos.size(1), "q_positions must lie in [0, P') (P' = cos rows)");
  const int64_t rows = cos.size(1);
  const bool hf = halves_equal(p.cos, p.B, rows, p.D, p.cs_b, p.cs_p, p.cs_d) &&
                  halves_equal(p.sin, p.B, rows, p.D, p.cs_b, p.cs_p, p.cs_d);
  p.W = hf ? p.D / 2 : p.D;
  switch (q.scalar_type()) {
    case at::kFloat: run_decode<float>(p, q, k_rows, v_rows, out); break;
    case at::kHalf: run_decode<c10::Half>(p, q, k_rows, v_rows, out); break;
    case at::kBFloat16: run_decode<c10::BFloat16>(p, q, k_rows, v_rows, out); break;
    default: TORCH_CHECK(false, "native_vtu_decode_attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dymu, m) {
  m.def(
      "native_vtu_decode_attention(Tensor q, Tensor k_rows, Tensor v_rows, Tensor cos, Tensor sin, Tensor pos_map, "
      "Tensor q_positions, Tensor full_lengths, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(dymu, CPU, m) { m.impl("native_vtu_decode_attention", &native_vtu_decode_attention); }

}  // namespace dymu
