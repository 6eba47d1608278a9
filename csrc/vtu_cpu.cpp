// VTU attention on CPU tensors: dymu::native_vtu_attention (README, Semantics: VTU).
//
// Semantics are those of dymu_kernels/vtu/reference.py: full position i < full_lengths[b]
// carries merged row u(i) = pos_map[b, i]; q_i = rope(Q[u(i)], i), k_j = rope(K[u(j)], j),
// v_j = V[u(j)]; o_i = softmax-attention over the visible keys (j <= i when causal, always
// j < full_lengths[b]); out[a] = mean of o_i over the valid i with u(i) = a, 0 where none.
//
// Algorithm (three passes, each parallel over independent work items, so results do not
// depend on the thread count or the schedule: bit-identical run to run):
//   1. gather + RoPE: rotated, pre-scaled Q rows [B, Hq, Nf, Dp], rotated K stored transposed
//      [B, Hkv, Dp, Nf] and gathered V [B, Hkv, Nf, Dp], all fp32, Dp = D rounded up to 16,
//      rows >= full_lengths zero. K/V are rotated once per kv head and shared by its query
//      heads (GQA), instead of once per query block.
//   2. blocked flash-attention forward (fp32, online softmax in base 2) per
//      (batch, query head, query block); causal skips the key blocks above the diagonal. Each
//      block writes its outputs o_i over its own Q rows (in place).
//   3. re-merge per (batch, query head): sum o_i into its merged row in position order, divide
//      by the group size, convert to the output dtype; rows nobody maps to are written as 0.
//
// Limitations (honest notes):
// - Scratch memory is the full-length rotated Q/K/V in fp32, (Hq + 2 Hkv) * Nf * D floats per
//   image; batches are processed in groups that fit 64 MiB (one image at a time if it needs
//   more). The point of the CPU kernel is fusing the passes and dropping the dense mask and the
//   expanded-tensor round trips, not O(Nu) memory (that is the GPU kernel's job).
// - Register tiles use GCC/clang generic vectors (8 floats), no intrinsics. On x86-64 the
//   attention kernels are compiled twice (baseline and AVX2+FMA, by including this file into
//   itself under a target pragma) and picked at run time (cpuid). No AVX-512 / AMX paths;
//   MSVC is not supported (generic vectors).
// - Map entries at valid positions are clamped into [0, Nu) (as the reference does); the
//   Python layer validates them for CPU tensors. full_lengths are clamped into [0, Nf].
// - Inference only (no autograd), CPU tensors only.
#ifndef DYMU_VTU_KERNEL_BODY  // first pass: everything except the ISA-specific kernels
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace dymu {
namespace {

constexpr int64_t kBlockQ = 64;  // query rows per attention work item
constexpr int64_t kBlockK = 64;  // keys per inner block
constexpr int kTileM = 4;        // query rows per register tile
constexpr int kTileN = 16;       // keys (QK^T) or head-dim columns (PV) per register tile
constexpr int64_t kPadD = 16;    // head dim is padded to a multiple of this
constexpr int64_t kScratchBudget = int64_t{64} << 20;  // bytes of fp32 scratch per batch group
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

static_assert(kBlockQ == kBlockK, "the causal diagonal logic assumes square blocks");
static_assert(kBlockQ % kTileM == 0 && kBlockK % kTileN == 0 && kPadD % kTileN == 0, "tile sizes");

#define DYMU_INLINE inline __attribute__((always_inline))

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Loading rows of any float dtype as fp32.

using RowLoader = void (*)(const char* base, int64_t stride, int64_t n, float* dst);

template <typename T>
void load_row(const char* base, int64_t stride, int64_t n, float* dst) {
  const T* p = reinterpret_cast<const T*>(base);
  if (stride == 1) {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(p[d]);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(p[d * stride]);
  }
}

RowLoader row_loader(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return load_row<float>;
    case at::kHalf: return load_row<c10::Half>;
    case at::kBFloat16: return load_row<c10::BFloat16>;
    default: TORCH_CHECK(false, "native_vtu_attention: unsupported dtype ", t);
  }
}

using RowStorer = void (*)(const float* src, int64_t n, char* base, int64_t stride);

template <typename T>
void store_row(const float* src, int64_t n, char* base, int64_t stride) {
  T* p = reinterpret_cast<T*>(base);
  for (int64_t d = 0; d < n; ++d) p[d * stride] = static_cast<T>(src[d]);
}

RowStorer row_storer(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return store_row<float>;
    case at::kHalf: return store_row<c10::Half>;
    case at::kBFloat16: return store_row<c10::BFloat16>;
    default: TORCH_CHECK(false, "native_vtu_attention: unsupported output dtype ", t);
  }
}

// A strided 4-d (or 3-d) float tensor as raw bytes + element strides.
struct View {
  const char* data;
  int64_t elem;  // bytes per element
  int64_t s0, s1, s2, s3;
  RowLoader load;
};

View view_of(const at::Tensor& t) {
  View v;
  v.data = static_cast<const char*>(t.const_data_ptr());
  v.elem = static_cast<int64_t>(t.element_size());
  v.s0 = t.stride(0);
  v.s1 = t.stride(1);
  v.s2 = t.stride(2);
  v.s3 = t.dim() > 3 ? t.stride(3) : 0;
  v.load = row_loader(t.scalar_type());
  return v;
}

// ---------------------------------------------------------------------------------------------
// Pass 1: gather + RoPE into fp32 scratch.

struct Problem {
  int64_t B, Hq, Hkv, Nu, Nf, D, Dp, Nfp, group;
  bool causal;
  float qscale;  // softmax scale * log2(e): scores come out in base 2
};

// rope(x, i) = x * cos[i] + rotate_half(x) * sin[i], rotate_half(x) = [-x[D/2:] ; x[:D/2]]
DYMU_INLINE void rope_row(const float* x, const float* c, const float* s, int64_t D, float mul, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = (x[d] * c[d] - x[d + half] * s[d]) * mul;
  for (int64_t d = half; d < D; ++d) out[d] = (x[d] * c[d] + x[d - half] * s[d]) * mul;
}

// Batches [b0, b1) into scratch rows indexed by b - b0.
void gather_rotate(const Problem& p, int64_t b0, int64_t b1, const View& q, const View& k, const View& v, const View& cs,
                   const View& sn, const int32_t* map, int64_t map_s0, int64_t map_s1,
                   const int32_t* lengths, int64_t len_s0, float* qo, float* kt, float* vv) {
  const int64_t D = p.D, Dp = p.Dp, Nfp = p.Nfp;
  at::parallel_for(0, (b1 - b0) * p.Nfp, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * D);
    float* c = buf.data();
    float* s = c + D;
    float* x = s + D;
    float* r = x + D;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t sb = item / Nfp, b = b0 + sb, i = item % Nfp;
      const int64_t len = std::min<int64_t>(std::max<int64_t>(lengths[b * len_s0], 0), p.Nf);
      float* qrow0 = qo + (sb * p.Hq * Nfp + i) * Dp;
      float* vrow0 = vv + (sb * p.Hkv * Nfp + i) * Dp;
      float* kcol0 = kt + sb * p.Hkv * Dp * Nfp + i;
      if (i >= len) {  // padding position: zero rows, never read through the map
        for (int64_t h = 0; h < p.Hq; ++h) std::fill(qrow0 + h * Nfp * Dp, qrow0 + h * Nfp * Dp + Dp, 0.f);
        for (int64_t h = 0; h < p.Hkv; ++h) {
          std::fill(vrow0 + h * Nfp * Dp, vrow0 + h * Nfp * Dp + Dp, 0.f);
          for (int64_t d = 0; d < Dp; ++d) kcol0[h * Dp * Nfp + d * Nfp] = 0.f;
        }
        continue;
      }
      int64_t u = map[b * map_s0 + i * map_s1];
      u = std::min<int64_t>(std::max<int64_t>(u, 0), p.Nu - 1);
      cs.load(cs.data + (b * cs.s0 + i * cs.s1) * cs.elem, cs.s2, D, c);
      sn.load(sn.data + (b * sn.s0 + i * sn.s1) * sn.elem, sn.s2, D, s);
      for (int64_t h = 0; h < p.Hq; ++h) {
        q.load(q.data + (b * q.s0 + h * q.s1 + u * q.s2) * q.elem, q.s3, D, x);
        float* row = qrow0 + h * Nfp * Dp;
        rope_row(x, c, s, D, p.qscale, row);
        std::fill(row + D, row + Dp, 0.f);
      }
      for (int64_t h = 0; h < p.Hkv; ++h) {
        k.load(k.data + (b * k.s0 + h * k.s1 + u * k.s2) * k.elem, k.s3, D, x);
        rope_row(x, c, s, D, 1.f, r);
        float* col = kcol0 + h * Dp * Nfp;
        for (int64_t d = 0; d < D; ++d) col[d * Nfp] = r[d];
        for (int64_t d = D; d < Dp; ++d) col[d * Nfp] = 0.f;
        float* vrow = vrow0 + h * Nfp * Dp;
        v.load(v.data + (b * v.s0 + h * v.s1 + u * v.s2) * v.elem, v.s3, D, vrow);
        std::fill(vrow + D, vrow + Dp, 0.f);
      }
    }
  });
}

static_assert(kTileN == 16, "tiles are two 8-float vectors wide");

}  // namespace
}  // namespace dymu

// The ISA-specific kernels (the #else branch at the end of this file), compiled twice: for the
// baseline target and, on x86-64, under target("avx2,fma"). Generic vectors and the inlined
// helpers must be compiled inside the target region for the AVX2 build to use ymm broadcasts
// and FMAs; hence a self-include rather than a target attribute on one function.
#define DYMU_VTU_KERNEL_BODY 1
namespace dymu {
namespace {
namespace baseline_isa {
#include "vtu_cpu.cpp"  // NOLINT(build/include): this file, its #else branch
}  // namespace baseline_isa
}  // namespace
}  // namespace dymu
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DYMU_VTU_HAVE_AVX2 1
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#define DYMU_VTU_HAVE_AVX2 1
#endif
#ifdef DYMU_VTU_HAVE_AVX2
namespace dymu {
namespace {
namespace avx2_isa {
#include "vtu_cpu.cpp"  // NOLINT(build/include): this file, its #else branch
}  // namespace avx2_isa
}  // namespace
}  // namespace dymu
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute pop
#endif
#undef DYMU_VTU_KERNEL_BODY

namespace dymu {
namespace {

// ---------------------------------------------------------------------------------------------
// Pass 2 driver.

// The kernels at the end of this file, compiled for the baseline ISA and (x86-64) for AVX2+FMA,
// picked once at run time.
using AttendFn = void (*)(const Problem&, int64_t, float*, const float*, const float*, int64_t, float*);

AttendFn pick_attend_block() {
#ifdef DYMU_VTU_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2_isa::attend_block;
#endif
  return baseline_isa::attend_block;
}

void attention_pass(const Problem& p, int64_t b0, int64_t b1, const std::vector<int64_t>& len, float* qo, const float* kt, const float* vv) {
  // Work items (b, h, query block), most expensive first (causal: later blocks see more keys),
  // handed out dynamically. Each item writes only its own rows, so the schedule cannot change
  // the result.
  struct Item {
    int64_t b, h, blk, cost;
  };
  std::vector<Item> items;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t nblk = (len[b] + kBlockQ - 1) / kBlockQ;
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t blk = 0; blk < nblk; ++blk) items.push_back({b, h, blk, p.causal ? blk + 1 : nblk});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  const int64_t n_items = static_cast<int64_t>(items.size());
  if (n_items == 0) return;
  static const AttendFn attend_block = pick_attend_block();
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_items);
  const int64_t work_floats = kBlockQ * kBlockK + kBlockQ * p.Dp + 3 * kBlockQ;
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work(static_cast<size_t>(work_floats));
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1); t < n_items; t = next.fetch_add(1)) {
        const Item& it = items[t];
        const int64_t kvh = it.h / p.group;
        float* qblk = qo + (((it.b - b0) * p.Hq + it.h) * p.Nfp + it.blk * kBlockQ) * p.Dp;
        const float* ktb = kt + ((it.b - b0) * p.Hkv + kvh) * p.Dp * p.Nfp;
        const float* vb = vv + ((it.b - b0) * p.Hkv + kvh) * p.Nfp * p.Dp;
        attend_block(p, len[it.b], qblk, ktb, vb, it.blk * kBlockQ, work.data());
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Pass 3: re-merge o_i into merged rows, in position order.

void remerge(const Problem& p, int64_t b0, int64_t b1, const std::vector<int64_t>& len, const int32_t* map, int64_t map_s0,
             int64_t map_s1, const float* qo, const at::Tensor& out) {
  const RowStorer store = row_storer(out.scalar_type());
  char* out_data = static_cast<char*>(out.data_ptr());
  const int64_t elem = static_cast<int64_t>(out.element_size());
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2), os3 = out.stride(3);
  const int64_t D = p.D, Dp = p.Dp;
  at::parallel_for(0, (b1 - b0) * p.Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(static_cast<size_t>(p.Nu * Dp));
    std::vector<float> counts(static_cast<size_t>(p.Nu));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t sb = item / p.Hq, b = b0 + sb, h = item % p.Hq;
      std::fill(sums.begin(), sums.end(), 0.f);
      std::fill(counts.begin(), counts.end(), 0.f);
      const float* ob = qo + (sb * p.Hq + h) * p.Nfp * Dp;
      for (int64_t i = 0; i < len[b]; ++i) {
        int64_t u = map[b * map_s0 + i * map_s1];
        u = std::min<int64_t>(std::max<int64_t>(u, 0), p.Nu - 1);
        counts[u] += 1.f;
        float* acc = sums.data() + u * Dp;
        const float* oi = ob + i * Dp;
        for (int64_t c = 0; c < Dp; ++c) acc[c] += oi[c];
      }
      for (int64_t a = 0; a < p.Nu; ++a) {
        float* acc = sums.data() + a * Dp;
        const float inv = counts[a] > 0.f ? 1.f / counts[a] : 0.f;  // unmapped rows: 0 * 0
        for (int64_t c = 0; c < D; ++c) acc[c] *= inv;
        store(acc, D, out_data + (b * os0 + h * os1 + a * os2) * elem, os3);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------

void native_vtu_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                          const at::Tensor& sin, const at::Tensor& pos_map, const at::Tensor& full_lengths,
                          bool causal, double scale, const at::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu(), "native_vtu_attention (CPU kernel) got a ", q.device(), " tensor");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, Nu, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(cos.dim() == 3 && sin.dim() == 3 && cos.sizes() == sin.sizes(), "cos/sin must be [B, Nf', D]");
  TORCH_CHECK(pos_map.dim() == 2 && pos_map.scalar_type() == at::kInt, "pos_map must be int32 [B, Nf]");
  TORCH_CHECK(full_lengths.dim() == 1 && full_lengths.scalar_type() == at::kInt, "full_lengths must be int32 [B]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "out must be like q");
  Problem p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Nu = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Nf = pos_map.size(1);
  TORCH_CHECK(k.size(0) == p.B && k.size(2) == p.Nu && k.size(3) == p.D, "k/v must be [B, Hkv, Nu, D] like q");
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, "Hq must be a multiple of Hkv");
  TORCH_CHECK(p.D % 2 == 0 && p.D > 0, "head dim must be even");
  TORCH_CHECK(pos_map.size(0) == p.B && full_lengths.size(0) == p.B, "pos_map/full_lengths batch mismatch");
  TORCH_CHECK(cos.size(0) == p.B && cos.size(1) >= p.Nf && cos.size(2) == p.D, "cos/sin must be [B, >= Nf, D]");
  p.group = p.Hq / p.Hkv;
  p.causal = causal;
  p.qscale = static_cast<float>(scale) * kLog2e;
  p.Dp = round_up(p.D, kPadD);
  p.Nfp = round_up(p.Nf, kBlockQ);
  if (p.B == 0 || p.Hq == 0 || p.Nu == 0) return;

  const int32_t* map = pos_map.const_data_ptr<int32_t>();
  const int32_t* lengths = full_lengths.const_data_ptr<int32_t>();
  std::vector<int64_t> len(static_cast<size_t>(p.B));
  for (int64_t b = 0; b < p.B; ++b)
    len[b] = std::min<int64_t>(std::max<int64_t>(lengths[b * full_lengths.stride(0)], 0), p.Nf);

  // Scratch for a group of batches at a time: at most kScratchBudget bytes unless one image
  // alone needs more (the work inside a group is parallel; groups run one after another).
  const int64_t per_batch = std::max<int64_t>(1, (p.Hq + 2 * p.Hkv) * p.Nfp * p.Dp * static_cast<int64_t>(sizeof(float)));
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(p.B, kScratchBudget / per_batch));
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor qo = at::empty({group * p.Hq * p.Nfp * p.Dp}, opts);
  at::Tensor kt = at::empty({group * p.Hkv * p.Dp * p.Nfp}, opts);
  at::Tensor vv = at::empty({group * p.Hkv * p.Nfp * p.Dp}, opts);
  const View qv = view_of(q), kv = view_of(k), vvw = view_of(v), cv = view_of(cos), sv = view_of(sin);
  for (int64_t b0 = 0; b0 < p.B; b0 += group) {
    const int64_t b1 = std::min(p.B, b0 + group);
    gather_rotate(p, b0, b1, qv, kv, vvw, cv, sv, map, pos_map.stride(0), pos_map.stride(1), lengths,
                  full_lengths.stride(0), qo.data_ptr<float>(), kt.data_ptr<float>(), vv.data_ptr<float>());
    attention_pass(p, b0, b1, len, qo.data_ptr<float>(), kt.const_data_ptr<float>(), vv.const_data_ptr<float>());
    remerge(p, b0, b1, len, map, pos_map.stride(0), pos_map.stride(1), qo.const_data_ptr<float>(), out);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dymu, m) {
  m.def(
      "native_vtu_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor pos_map, "
      "Tensor full_lengths, bool causal, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(dymu, CPU, m) { m.impl("native_vtu_attention", &native_vtu_attention); }

}  // namespace dymu

#else  // DYMU_VTU_KERNEL_BODY: the ISA-specific kernels, included twice from above

// ---------------------------------------------------------------------------------------------
// Pass 2 kernels: this branch is compiled once per instruction set (see the self-include above).

// 8 floats as a GCC/clang vector: one ymm register in the AVX2 build, two xmm registers in the
// baseline build.
typedef float Vec8 __attribute__((vector_size(32)));

DYMU_INLINE Vec8 load8(const float* p) {
  Vec8 x;
  std::memcpy(&x, p, sizeof(Vec8));
  return x;
}
DYMU_INLINE void store8(float* p, Vec8 x) { std::memcpy(p, &x, sizeof(Vec8)); }
DYMU_INLINE Vec8 splat8(float a) { return Vec8{} + a; }  // scalar operand: one broadcast

// s[r][j] = sum_d q[r][d] * kt[d][j] for a kTileM x 16 tile.
DYMU_INLINE void qk_tile(const float* __restrict q, int64_t ldq, const float* __restrict kt, int64_t ldk,
                         int64_t depth, float* __restrict s, int64_t lds) {
  Vec8 acc[kTileM][2];
  for (int r = 0; r < kTileM; ++r) acc[r][0] = acc[r][1] = splat8(0.f);
  for (int64_t d = 0; d < depth; ++d) {
    const Vec8 k0 = load8(kt + d * ldk), k1 = load8(kt + d * ldk + 8);
    for (int r = 0; r < kTileM; ++r) {
      const Vec8 a = splat8(q[r * ldq + d]);
      acc[r][0] += a * k0;
      acc[r][1] += a * k1;
    }
  }
  for (int r = 0; r < kTileM; ++r) {
    store8(s + r * lds, acc[r][0]);
    store8(s + r * lds + 8, acc[r][1]);
  }
}

// o[r][c] += sum_j p[r][j] * v[j][c] for a kTileM x 16 tile (c = head-dim columns).
DYMU_INLINE void pv_tile(const float* __restrict pm, int64_t ldp, const float* __restrict v, int64_t ldv,
                         int64_t nkeys, float* __restrict o, int64_t ldo) {
  Vec8 acc[kTileM][2];
  for (int r = 0; r < kTileM; ++r) {
    acc[r][0] = load8(o + r * ldo);
    acc[r][1] = load8(o + r * ldo + 8);
  }
  for (int64_t j = 0; j < nkeys; ++j) {
    const Vec8 v0 = load8(v + j * ldv), v1 = load8(v + j * ldv + 8);
    for (int r = 0; r < kTileM; ++r) {
      const Vec8 a = splat8(pm[r * ldp + j]);
      acc[r][0] += a * v0;
      acc[r][1] += a * v1;
    }
  }
  for (int r = 0; r < kTileM; ++r) {
    store8(o + r * ldo, acc[r][0]);
    store8(o + r * ldo + 8, acc[r][1]);
  }
}

// 2^x for x <= 0 (and -inf -> 0), branch-free so loops over it vectorise. Taylor series of
// 2^f on |f| <= 1/2 to degree 7 (relative error < 1e-8, below fp32 rounding).
DYMU_INLINE float exp2_nonpos(float x) {
  const float xc = std::min(std::max(x, -126.f), 0.f);
  const float n = std::nearbyint(xc);
  const float f = (xc - n) * 0.6931471805599453f;  // f * ln 2
  float poly = 1.f / 5040.f;
  poly = poly * f + 1.f / 720.f;
  poly = poly * f + 1.f / 120.f;
  poly = poly * f + 1.f / 24.f;
  poly = poly * f + 1.f / 6.f;
  poly = poly * f + 0.5f;
  poly = poly * f + 1.f;
  poly = poly * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return x < -126.f ? 0.f : poly * scale;
}

// One work item: query rows [i0, i0 + kBlockQ) of head (b, h). Reads the rotated Q rows of the
// block from qo and overwrites them with the normalised outputs o_i (valid rows only).
void attend_block(const Problem& p, int64_t len, float* __restrict qblk, const float* __restrict ktb,
                  const float* __restrict vb, int64_t i0, float* __restrict work) {
  const int64_t Dp = p.Dp, Nfp = p.Nfp;
  float* s = work;                    // [kBlockQ][kBlockK] scores, then probabilities
  float* o = s + kBlockQ * kBlockK;   // [kBlockQ][Dp] unnormalised outputs
  float* m = o + kBlockQ * Dp;        // [kBlockQ] running max (base 2)
  float* l = m + kBlockQ;             // [kBlockQ] running sum
  float* alpha = l + kBlockQ;         // [kBlockQ] rescale factors of this key block
  const int64_t rows = std::min(kBlockQ, len - i0);
  const int64_t mrows = round_up(rows, kTileM);  // padded Q rows are zero and exist (Nfp)
  const int64_t kend_all = p.causal ? std::min(i0 + rows, len) : len;
  for (int64_t r = 0; r < mrows; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
  }
  std::fill(o, o + mrows * Dp, 0.f);
  for (int64_t j0 = 0; j0 < kend_all; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, kend_all - j0);
    const int64_t nkr = round_up(nk, kTileN);  // padded keys exist (Nfp) and get masked
    for (int64_t r = 0; r < mrows; r += kTileM)
      for (int64_t j = 0; j < nkr; j += kTileN) qk_tile(qblk + r * Dp, Dp, ktb + j0 + j, Nfp, Dp, s + r * kBlockK + j, kBlockK);
    for (int64_t r = 0; r < mrows; ++r) {
      float* srow = s + r * kBlockK;
      const int64_t kend = p.causal ? std::min(i0 + r + 1, len) : len;  // keys [0, kend) visible
      const int64_t lim = std::max<int64_t>(kend - j0, 0);
      for (int64_t j = lim; j < nkr; ++j) srow[j] = kNegInf;
      float bmax = kNegInf;
      for (int64_t j = 0; j < nkr; ++j) bmax = std::max(bmax, srow[j]);
      const float mnew = std::max(m[r], bmax);
      if (mnew == kNegInf) {  // nothing visible yet in this row (only padded rows): keep zeros
        for (int64_t j = 0; j < nkr; ++j) srow[j] = 0.f;
        alpha[r] = 1.f;
        continue;
      }
      float sum = 0.f;
      for (int64_t j = 0; j < nkr; ++j) {
        const float e = exp2_nonpos(srow[j] - mnew);
        srow[j] = e;
        sum += e;
      }
      const float a = exp2_nonpos(m[r] - mnew);  // m[r] = -inf -> 0
      alpha[r] = a;
      l[r] = l[r] * a + sum;
      m[r] = mnew;
    }
    for (int64_t r = 0; r < mrows; ++r) {
      const float a = alpha[r];
      if (a != 1.f) {
        float* orow = o + r * Dp;
        for (int64_t c = 0; c < Dp; ++c) orow[c] *= a;
      }
    }
    const float* vblk = vb + j0 * Dp;
    for (int64_t r = 0; r < mrows; r += kTileM)
      for (int64_t c = 0; c < Dp; c += kTileN) pv_tile(s + r * kBlockK, kBlockK, vblk + c, Dp, nkr, o + r * Dp + c, Dp);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / l[r];  // l >= 1 for a valid row: key 0 is always visible
    const float* orow = o + r * Dp;
    float* dst = qblk + r * Dp;
    for (int64_t c = 0; c < Dp; ++c) dst[c] = orow[c] * inv;
  }
}

#endif  // DYMU_VTU_KERNEL_BODY
