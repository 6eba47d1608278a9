// VTU attention on CPU tensors: dymu::native_vtu_attention (README, Semantics: VTU).
//
// Semantics are those of dymu_kernels/vtu/reference.py: full position i < full_lengths[b]
// carries merged row u(i) = pos_map[b, i]; q_i = rope(Q[u(i)], i), k_j = rope(K[u(j)], j),
// v_j = V[u(j)]; o_i = softmax-attention over the visible keys (j <= i when causal, always
// j < full_lengths[b]); out[a] = mean of o_i over the valid i with u(i) = a, 0 where none.
//
// Algorithm (FlashAttention-2 style, nothing of size Nf * D is ever materialised):
//   1. group the valid positions of each image by merged row (stable counting sort: order[b] lists
//      the positions of row 0 ascending, then row 1, ...; row_start[b] indexes it);
//   2. cut each image's rows into work units of whole rows holding at most kBlockQ positions (a
//      row with more positions is a unit alone, processed in kBlockQ-position chunks one after
//      another); a unit is (image, kv head): it serves the whole GQA group of query heads;
//   3. per chunk: sort its positions, gather + rotate their Q rows (all query heads of the group),
//      then walk the key tiles [j0, j0 + kBlockK) up to the chunk's last visible key: each tile
//      is gathered and rotated once (K transposed, V) and used by every query head of the group;
//      online softmax in base 2 per query row; causal skipping per 4-row register tile (a tile
//      whose queries all precede the key tile is skipped, keys after its last query untouched);
//   4. the unit's epilogue sums the o_i of each merged row in ascending position order (across
//      chunks for a long row), divides by the count, and writes the row; rows nobody maps to are
//      written as 0.
// Each unit writes only its own output rows and sums in a fixed order, so results do not depend
// on the thread count or the schedule: bit-identical run to run.
//
// Masking: a key hidden from a query (j > i when causal, or j >= full_lengths) is never read for
// that query: its score is not used and its V row is not multiplied (a NaN or inf there cannot
// leak through 0 * NaN). Non-finite values at visible keys propagate, as in the reference.
//
// Memory: beyond the inputs and the output, order [B, Nf] and row_start [B, Nu + 1] int32 and a
// per-thread workspace of O(group * kBlockQ * D) floats (all allocated through the c10 CPU
// allocator, so torch.profiler sees them). No full-length Q/K/V or per-position output.
//
// Limitations (honest notes):
// - A merged row with many positions (a flat image region) is one unit: its chunks run in one
//   thread, one after another (parallelism is over images, kv heads and units).
// - Register tiles use GCC/clang generic vectors (8 floats), no intrinsics. On x86-64 the
//   kernels are compiled twice (baseline and AVX2+FMA, by including this file into itself under
//   a target pragma) and picked at run time (cpuid). No AVX-512 / AMX paths; MSVC is not
//   supported (generic vectors).
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

constexpr int64_t kBlockQ = 64;  // query positions per chunk
constexpr int64_t kBlockK = 64;  // keys per key tile
constexpr int kTileM = 4;        // query rows per register tile
constexpr int kTileN = 16;       // keys (QK^T) or head-dim columns (PV) per register tile
constexpr int64_t kPadD = 16;    // head dim is padded to a multiple of this
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

static_assert(kBlockQ % kTileM == 0 && kBlockK % kTileN == 0 && kPadD % kTileN == 0, "tile sizes");

#define DYMU_INLINE inline __attribute__((always_inline))

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Loading rows of any float dtype as fp32, storing fp32 rows in the output dtype.

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

// A strided 4-d (or 3-d) tensor as raw bytes + element strides.
struct View {
  const char* data;
  int64_t elem;  // bytes per element
  int64_t s0, s1, s2, s3;
  RowLoader load;

  // Row (i0, i1, i2, :) of a 4-d view as n fp32 values.
  void row(int64_t i0, int64_t i1, int64_t i2, int64_t n, float* dst) const {
    load(data + (i0 * s0 + i1 * s1 + i2 * s2) * elem, s3, n, dst);
  }
  // Row (i0, i1, :) of a 3-d view as n fp32 values.
  void row3(int64_t i0, int64_t i1, int64_t n, float* dst) const { load(data + (i0 * s0 + i1 * s1) * elem, s2, n, dst); }
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

struct Problem {
  int64_t B, Hq, Hkv, Nu, Nf, D, Dp, group;
  bool causal;
  float qscale;  // softmax scale * log2(e): scores come out in base 2
};

// Everything a work unit reads or writes.
struct Inputs {
  View q, k, v, cos, sin;  // cos/sin: 3-d, row3(b, i) is position i
  const int32_t* map;
  int64_t map_s0, map_s1;
  const int32_t* order;      // [B, Nf] positions grouped by merged row (contiguous)
  const int64_t* len;        // [B] clamped full lengths
  char* out;                 // [B, Hq, Nu, D] output in out_store's dtype
  int64_t out_elem, os0, os1, os2, os3;
  RowStorer out_store;

  int64_t merged_row(int64_t b, int64_t i, int64_t Nu) const {  // clamped, as the reference
    const int64_t u = map[b * map_s0 + i * map_s1];
    return std::min<int64_t>(std::max<int64_t>(u, 0), Nu - 1);
  }
};

// A work unit: the whole merged rows [row_begin, row_end) of image b, whose positions are
// order[b, ord_begin:ord_end), for the query heads of kv head kvh.
struct Unit {
  int64_t b, kvh, row_begin, row_end, ord_begin, ord_end, cost;
};

// Floats of one thread's workspace (see run_unit for the layout).
int64_t workspace_floats(const Problem& p) {
  return 2 * p.group * kBlockQ * p.Dp + 2 * kBlockK * p.Dp + kTileM * kBlockK + 2 * p.group * kBlockQ +
         p.group * p.Dp + 4 * p.Dp;
}

// rope(x, i) = x * cos[i] + rotate_half(x) * sin[i], rotate_half(x) = [-x[D/2:] ; x[:D/2]]
DYMU_INLINE void rope_row(const float* x, const float* c, const float* s, int64_t D, float mul, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = (x[d] * c[d] - x[d + half] * s[d]) * mul;
  for (int64_t d = half; d < D; ++d) out[d] = (x[d] * c[d] + x[d - half] * s[d]) * mul;
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
// Driver.

using UnitFn = void (*)(const Problem&, const Inputs&, const Unit&, float*);

// The kernel at the end of this file, compiled for the baseline ISA and (x86-64) for AVX2+FMA,
// picked once at run time.
UnitFn pick_run_unit() {
#ifdef DYMU_VTU_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2_isa::run_unit;
#endif
  return baseline_isa::run_unit;
}

// Stable counting sort of the valid positions of every image by merged row: row_start [B, Nu + 1]
// (exclusive prefix counts) and order [B, Nf] (entries >= len[b] unused).
void group_by_row(const Problem& p, const Inputs& in, int32_t* row_start, int32_t* order) {
  at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int32_t* start = row_start + b * (p.Nu + 1);
      int32_t* ord = order + b * p.Nf;
      std::fill(start, start + p.Nu + 1, 0);
      for (int64_t i = 0; i < in.len[b]; ++i) ++start[in.merged_row(b, i, p.Nu) + 1];
      for (int64_t a = 0; a < p.Nu; ++a) start[a + 1] += start[a];
      // fill: next free slot per row, kept in start[a] while filling, restored afterwards
      for (int64_t i = 0; i < in.len[b]; ++i) ord[start[in.merged_row(b, i, p.Nu)]++] = static_cast<int32_t>(i);
      for (int64_t a = p.Nu; a > 0; --a) start[a] = start[a - 1];
      start[0] = 0;
    }
  });
}

// Units of whole rows of at most kBlockQ positions (a longer row alone), for every kv head; the
// most expensive first (causal: a query at position i sees i + 1 keys).
std::vector<Unit> make_units(const Problem& p, const Inputs& in, const int32_t* row_start) {
  std::vector<Unit> units;
  for (int64_t b = 0; b < p.B; ++b) {
    const int32_t* start = row_start + b * (p.Nu + 1);
    const int32_t* ord = in.order + b * p.Nf;
    for (int64_t r = 0; r < p.Nu;) {
      const int64_t row_begin = r, ord_begin = start[r];
      if (start[r + 1] - ord_begin > kBlockQ) {
        ++r;
      } else {
        while (r < p.Nu && start[r + 1] - ord_begin <= kBlockQ) ++r;
      }
      const int64_t ord_end = start[r];
      int64_t cost = 1;
      for (int64_t t = ord_begin; t < ord_end; ++t) cost += p.causal ? ord[t] + 1 : in.len[b];
      for (int64_t h = 0; h < p.Hkv; ++h) units.push_back({b, h, row_begin, r, ord_begin, ord_end, cost});
    }
  }
  std::stable_sort(units.begin(), units.end(), [](const Unit& x, const Unit& y) { return x.cost > y.cost; });
  return units;
}

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
  if (p.B == 0 || p.Hq == 0 || p.Nu == 0) return;

  const int32_t* lengths = full_lengths.const_data_ptr<int32_t>();
  std::vector<int64_t> len(static_cast<size_t>(p.B));
  for (int64_t b = 0; b < p.B; ++b)
    len[b] = std::min<int64_t>(std::max<int64_t>(lengths[b * full_lengths.stride(0)], 0), p.Nf);

  const auto int_opts = at::TensorOptions().dtype(at::kInt);
  at::Tensor row_start = at::empty({p.B, p.Nu + 1}, int_opts);
  at::Tensor order = at::empty({p.B, p.Nf}, int_opts);
  Inputs in;
  in.q = view_of(q);
  in.k = view_of(k);
  in.v = view_of(v);
  in.cos = view_of(cos);
  in.sin = view_of(sin);
  in.map = pos_map.const_data_ptr<int32_t>();
  in.map_s0 = pos_map.stride(0);
  in.map_s1 = pos_map.stride(1);
  in.order = order.const_data_ptr<int32_t>();
  in.len = len.data();
  in.out = static_cast<char*>(out.data_ptr());
  in.out_elem = static_cast<int64_t>(out.element_size());
  in.os0 = out.stride(0);
  in.os1 = out.stride(1);
  in.os2 = out.stride(2);
  in.os3 = out.stride(3);
  in.out_store = row_storer(out.scalar_type());

  group_by_row(p, in, row_start.data_ptr<int32_t>(), order.data_ptr<int32_t>());
  const std::vector<Unit> units = make_units(p, in, row_start.const_data_ptr<int32_t>());

  // Units handed out dynamically; each writes only its own output rows, so the schedule cannot
  // change the result.
  static const UnitFn run_unit = pick_run_unit();
  const int64_t n_units = static_cast<int64_t>(units.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_units);
  const int64_t ws_floats = workspace_floats(p);
  // One workspace per worker, allocated here (in the calling thread, through the c10 allocator).
  at::Tensor work = at::empty({std::max<int64_t>(workers, 1), ws_floats}, at::TensorOptions().dtype(at::kFloat));
  float* work_data = work.data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w)
      for (int64_t t = next.fetch_add(1); t < n_units; t = next.fetch_add(1))
        run_unit(p, in, units[t], work_data + w * ws_floats);
  });
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
// The kernels: this branch is compiled once per instruction set (see the self-include above).

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

// o[r][c] += sum_j p[r][j] * v[j][c] for a kTileM x 16 tile (c = head-dim columns), over keys
// j < lo for every row, then keys lo <= j < hi only for the rows with j < vis[r]: a hidden key's
// V row is skipped (selected out), never multiplied by a zero probability.
DYMU_INLINE void pv_tile(const float* __restrict pm, int64_t ldp, const float* __restrict v, int64_t ldv,
                         int64_t lo, int64_t hi, const int64_t* __restrict vis, float* __restrict o, int64_t ldo) {
  Vec8 acc[kTileM][2];
  for (int r = 0; r < kTileM; ++r) {
    acc[r][0] = load8(o + r * ldo);
    acc[r][1] = load8(o + r * ldo + 8);
  }
  for (int64_t j = 0; j < lo; ++j) {
    const Vec8 v0 = load8(v + j * ldv), v1 = load8(v + j * ldv + 8);
    for (int r = 0; r < kTileM; ++r) {
      const Vec8 a = splat8(pm[r * ldp + j]);
      acc[r][0] += a * v0;
      acc[r][1] += a * v1;
    }
  }
  for (int64_t j = lo; j < hi; ++j) {
    const Vec8 v0 = load8(v + j * ldv), v1 = load8(v + j * ldv + 8);
    for (int r = 0; r < kTileM; ++r) {
      if (j >= vis[r]) continue;
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

// One work unit (see the file comment): the merged rows [u.row_begin, u.row_end) of image u.b for
// the query heads of kv head u.kvh, written to the output.
void run_unit(const Problem& p, const Inputs& in, const Unit& u, float* __restrict work) {
  const int64_t D = p.D, Dp = p.Dp, G = p.group, b = u.b, len = in.len[b];
  float* qr = work;                    // [G][kBlockQ][Dp] rotated, pre-scaled queries
  float* o = qr + G * kBlockQ * Dp;    // [G][kBlockQ][Dp] unnormalised outputs
  float* kt = o + G * kBlockQ * Dp;    // [Dp][kBlockK] rotated key tile, transposed
  float* vt = kt + Dp * kBlockK;       // [kBlockK][Dp] value tile
  float* s = vt + kBlockK * Dp;        // [kTileM][kBlockK] scores, then probabilities
  float* m = s + kTileM * kBlockK;     // [G][kBlockQ] running max (base 2)
  float* l = m + G * kBlockQ;          // [G][kBlockQ] running sum
  float* sums = l + G * kBlockQ;       // [G][Dp] sum of o_i over the current merged row
  float* cs = sums + G * Dp;           // [Dp] cos row
  float* sn = cs + Dp;                 // [Dp] sin row
  float* x = sn + Dp;                  // [Dp] a loaded row
  float* rot = x + Dp;                 // [Dp] a rotated row
  int64_t pos[kBlockQ];                // positions of the chunk, ascending
  int64_t vis[kBlockQ];                // keys [0, vis[r]) are visible to query r
  int64_t sorted_of[kBlockQ];          // chunk entry t -> its row in the sorted chunk
  std::pair<int32_t, int32_t> entries[kBlockQ];

  auto out_row = [&](int64_t g, int64_t a) {
    return in.out + (b * in.os0 + (u.kvh * G + g) * in.os1 + a * in.os2) * in.out_elem;
  };
  auto write_zero_rows = [&](int64_t a0, int64_t a1) {  // rows nobody maps to
    std::fill(rot, rot + Dp, 0.f);
    for (int64_t a = a0; a < a1; ++a)
      for (int64_t g = 0; g < G; ++g) in.out_store(rot, D, out_row(g, a), in.os3);
  };
  int64_t cur = u.row_begin - 1, count = 0;  // the merged row being summed, and its positions so far
  auto finish_row = [&]() {
    if (cur < u.row_begin) return;
    const float inv = 1.f / static_cast<float>(count);
    for (int64_t g = 0; g < G; ++g) {
      float* acc = sums + g * Dp;
      for (int64_t c = 0; c < D; ++c) acc[c] *= inv;
      in.out_store(acc, D, out_row(g, cur), in.os3);
    }
  };

  for (int64_t c0 = u.ord_begin; c0 < u.ord_end; c0 += kBlockQ) {
    const int64_t n = std::min(kBlockQ, u.ord_end - c0);
    const int32_t* ord = in.order + b * p.Nf + c0;
    for (int64_t t = 0; t < n; ++t) entries[t] = {ord[t], static_cast<int32_t>(t)};
    std::sort(entries, entries + n);  // positions are distinct: no ties
    for (int64_t r = 0; r < n; ++r) {
      pos[r] = entries[r].first;
      sorted_of[entries[r].second] = r;
    }
    const int64_t mrows = round_up(n, kTileM);
    for (int64_t r = n; r < mrows; ++r) pos[r] = pos[n - 1];  // padding rows repeat the last query
    for (int64_t r = 0; r < mrows; ++r) vis[r] = p.causal ? pos[r] + 1 : len;
    const int64_t kend = vis[mrows - 1];  // the largest

    // Rotated queries of every head of the group; padding rows are zero.
    for (int64_t r = 0; r < n; ++r) {
      in.cos.row3(b, pos[r], D, cs);
      in.sin.row3(b, pos[r], D, sn);
      const int64_t a = in.merged_row(b, pos[r], p.Nu);
      for (int64_t g = 0; g < G; ++g) {
        float* row = qr + (g * kBlockQ + r) * Dp;
        in.q.row(b, u.kvh * G + g, a, D, x);
        rope_row(x, cs, sn, D, p.qscale, row);
        std::fill(row + D, row + Dp, 0.f);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      std::fill(qr + (g * kBlockQ + n) * Dp, qr + (g * kBlockQ + mrows) * Dp, 0.f);
      std::fill(o + g * kBlockQ * Dp, o + (g * kBlockQ + mrows) * Dp, 0.f);
      std::fill(m + g * kBlockQ, m + g * kBlockQ + mrows, kNegInf);
      std::fill(l + g * kBlockQ, l + g * kBlockQ + mrows, 0.f);
    }

    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0);
      const int64_t nkr = round_up(nk, kTileN);
      // Gather + rotate the key tile once for the whole group (padding keys: zero K columns).
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t i = j0 + j, a = in.merged_row(b, i, p.Nu);
        in.cos.row3(b, i, D, cs);
        in.sin.row3(b, i, D, sn);
        in.k.row(b, u.kvh, a, D, x);
        rope_row(x, cs, sn, D, 1.f, rot);
        for (int64_t d = 0; d < D; ++d) kt[d * kBlockK + j] = rot[d];
        for (int64_t d = D; d < Dp; ++d) kt[d * kBlockK + j] = 0.f;
        float* vrow = vt + j * Dp;
        in.v.row(b, u.kvh, a, D, vrow);
        std::fill(vrow + D, vrow + Dp, 0.f);
      }
      for (int64_t j = nk; j < nkr; ++j)
        for (int64_t d = 0; d < Dp; ++d) kt[d * kBlockK + j] = 0.f;
      // Register tiles whose queries all precede this key tile see nothing in it: skipped.
      int64_t r_first = 0;
      while (r_first < mrows && vis[r_first + kTileM - 1] <= j0) r_first += kTileM;

      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qr + g * kBlockQ * Dp;
        float* og = o + g * kBlockQ * Dp;
        float* mg = m + g * kBlockQ;
        float* lg = l + g * kBlockQ;
        for (int64_t r0 = r_first; r0 < mrows; r0 += kTileM) {
          int64_t vr[kTileM];  // visible keys of each row within this tile: [0, vr)
          for (int rr = 0; rr < kTileM; ++rr) vr[rr] = std::min(std::max<int64_t>(vis[r0 + rr] - j0, 0), nk);
          const int64_t lo = vr[0], hi = vr[kTileM - 1];  // rows ascending: the fewest, the most
          for (int64_t jj = 0; jj < round_up(hi, kTileN); jj += kTileN)
            qk_tile(qg + r0 * Dp, Dp, kt + jj, kBlockK, Dp, s + jj, kBlockK);
          for (int rr = 0; rr < kTileM; ++rr) {
            const int64_t r = r0 + rr, nv = vr[rr];
            if (nv == 0) continue;  // nothing visible to this row here: state unchanged
            float* srow = s + rr * kBlockK;
            float bmax = kNegInf;
            for (int64_t j = 0; j < nv; ++j) bmax = std::max(bmax, srow[j]);
            const float mnew = std::max(mg[r], bmax);
            if (mnew == kNegInf) {  // every visible score so far is -inf: no weight yet
              for (int64_t j = 0; j < nv; ++j) srow[j] = 0.f;
              continue;
            }
            float sum = 0.f;
            for (int64_t j = 0; j < nv; ++j) {
              const float e = exp2_nonpos(srow[j] - mnew);
              srow[j] = e;
              sum += e;
            }
            const float alpha = exp2_nonpos(mg[r] - mnew);  // m = -inf -> 0
            lg[r] = lg[r] * alpha + sum;
            mg[r] = mnew;
            if (alpha != 1.f) {
              float* orow = og + r * Dp;
              for (int64_t c = 0; c < Dp; ++c) orow[c] *= alpha;
            }
          }
          for (int64_t c = 0; c < Dp; c += kTileN) pv_tile(s, kBlockK, vt + c, Dp, lo, hi, vr, og + r0 * Dp + c, Dp);
        }
      }
    }

    // Epilogue: o_i / l_i summed into merged rows, entries in chunk order (ascending positions
    // within each row); a row may continue into the next chunk of this unit.
    for (int64_t t = 0; t < n; ++t) {
      const int64_t r = sorted_of[t], a = in.merged_row(b, ord[t], p.Nu);
      if (a != cur) {
        finish_row();
        write_zero_rows(std::max(cur + 1, u.row_begin), a);
        cur = a;
        count = 0;
        std::fill(sums, sums + G * Dp, 0.f);
      }
      ++count;
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / l[g * kBlockQ + r];
        const float* orow = o + (g * kBlockQ + r) * Dp;
        float* acc = sums + g * Dp;
        for (int64_t c = 0; c < Dp; ++c) acc[c] += orow[c] * inv;
      }
    }
  }
  finish_row();
  write_zero_rows(std::max(cur + 1, u.row_begin), u.row_end);
}

#endif  // DYMU_VTU_KERNEL_BODY
