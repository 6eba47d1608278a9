// Native CPU kernels of the DToMe ops (README, Semantics: DToMe): bipartite similarity, edge
// selection, size-weighted scatter-merge, the fused merge step and batch threshold.
//
// Ops (schemas below, all named dymu::native_<op>) write into output tensors that the Python
// wrapper (dymu_kernels/dtome/native.py) allocates, so tests can poison them first.
//
// Semantics are those of dymu_kernels/dtome/reference.py:
//   - metric rows are normalised in fp32 as m / max(||m||, 1e-12), scores are fp32 dot
//     products; node_idx ties go to the smallest destination row (strict '>' scan in order);
//   - row_map / new_lengths replicate the reference formulas exactly (strict test, the cap
//     keeping the merged source with the smallest node_max, new order [unmerged ; dests]);
//   - merge: every output row sums its members in increasing old-row order in fp32, so the
//     fused op equals scatter_merge(select_edges(bipartite_similarity)) bit for bit.
//
// Structure: per image, (1) normalise the metric into packed fp32 scratch, (2) a register-
// tiled A.B^T scan keeping only the running best edge per source, (3) selection, (4) group
// the rows by their new row (CSR, O(N)) and (5) write every output row from its members,
// (6) compose pos_map. Threads: one image per task when B >= threads (one parallel region);
// a small batch of small images runs serially; a small batch of big images runs each phase
// in parallel over rows / source blocks. Every path gives the same bits.
//
// Limitations (honest notes):
//   - CPU tensors only; the Python binding makes inputs contiguous (a strided input costs a
//     copy). Metric dim C and feature dim D are unrestricted here (the API caps C at 128).
//   - Scores may differ from the reference's BLAS matmul in the last bits (another summation
//     order; FMA on CPUs with AVX2+FMA, chosen at load time, plain mul+add elsewhere): node_idx
//     and merge decisions agree with the reference away from near-ties only, and may differ
//     between CPUs with and without AVX2+FMA in the same way.
//   - A merged row's x is sum(s_i x_i) / sum(s_i) with fp32 accumulation over its members in
//     increasing old-row order; a row with a single member and positive size is copied
//     unchanged (exact), where the reference computes x * s / s (within one fp32 ulp of x).
//   - Bit-identical run to run, for any thread count and any batch composition (every output
//     element is produced by one thread in a fixed order; no atomics).
//   - Memory: O(N * C) fp32 scratch per image in flight (O(B * N * C) on the phased path)
//     plus O(N) ints per image; never an [N/2, N/2] score matrix (scores live in a register
//     tile of 4 x 16). Outputs are fresh tensors: for big batches the first-touch page faults
//     of x_out cost about as much as the merge itself.
//   - batch_threshold copies node_max (NaN -> -inf: no edge) and runs std::nth_element (linear time).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

namespace dymu_dtome_cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kSrcBlock = 16;  // sources per similarity task
constexpr int64_t kTileRows = 4;   // sources per register tile
constexpr int64_t kDstBlock = 16;  // destinations per register tile (packed, transposed)
constexpr int64_t kDstChunk = 128; // destinations per cache chunk (multiple of kDstBlock)

// ------------------------------------------------------------------ checks and dtypes

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
  if (dtype != at::ScalarType::Undefined) {
    TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  }
}

void check_float_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  check_cpu(t, name, at::ScalarType::Undefined, dim);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
}

inline int64_t clamp_length(int32_t t, int64_t n) { return std::min<int64_t>(std::max<int32_t>(t, 0), n); }

// Run per_image(b) for every image, choosing how to use the threads:
//   - at least one image per thread: one parallel region over images (one barrier per call,
//     which matters on a loaded machine where a descheduled thread stalls every barrier);
//   - fewer images but little work (about a millisecond single-threaded): serially;
//   - otherwise phased(), which parallelises each phase over rows / source blocks.
// The results are the same every way: every output element is computed by one thread in a
// fixed order. work: a rough count of inner-loop operations of the whole batch.
constexpr double kSerialWork = 8e6;

template <typename PerImage, typename Phased>
void over_images(int64_t batch, double work, PerImage&& per_image, Phased&& phased) {
  const int64_t threads = at::get_num_threads();
  if (batch >= threads || at::in_parallel_region()) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) per_image(b);
    });
  } else if (work < kSerialWork) {
    for (int64_t b = 0; b < batch; ++b) per_image(b);
  } else {
    phased();
  }
}

// Work estimates for over_images: similarity (M * ND * C multiply-adds) and merge (N * D).
inline double similarity_work(int64_t batch, int64_t n, int64_t c) {
  return static_cast<double>(batch) * ((n + 1) / 2) * (n / 2) * c;
}
inline double merge_work(int64_t batch, int64_t n, int64_t d) { return static_cast<double>(batch) * n * d; }

// ------------------------------------------------------------------ similarity

// Normalised fp32 metric of one image, packed:
//   src [ceil(N/2), C]: row i = normalised metric row 2i;
//   dst [ceil(ND/kDstBlock), C, kDstBlock]: destination j = metric row 2j+1, transposed per
//       block of kDstBlock destinations, so a tile of scores is a sum of rank-1 updates over C
//       that stays in registers.
// Only valid rows are written; the rest stays zero and no result reads it.
struct MetricScratch {
  int64_t c = 0, m_src = 0, dst_blocks = 0;
  std::vector<float> src, dst;

  MetricScratch() = default;
  MetricScratch(int64_t n, int64_t c_)
      : c(c_), m_src((n + 1) / 2), dst_blocks((n / 2 + kDstBlock - 1) / kDstBlock) {
    src.assign(static_cast<size_t>(m_src * c), 0.0f);
    dst.assign(static_cast<size_t>(dst_blocks * c * kDstBlock), 0.0f);
  }
  float* src_row(int64_t i) { return src.data() + i * c; }
  float* dst_block(int64_t blk) { return dst.data() + blk * c * kDstBlock; }
};

// m / max(||m||, 1e-12) in fp32, written to out[k * stride].
template <typename T>
inline void normalize_row(const T* row, int64_t c, float* out, int64_t stride) {
  float sum_sq = 0.0f;
  for (int64_t k = 0; k < c; ++k) {
    const float v = static_cast<float>(row[k]);
    sum_sq += v * v;
  }
  const float denom = std::max(std::sqrt(sum_sq), 1e-12f);
  for (int64_t k = 0; k < c; ++k) out[k * stride] = static_cast<float>(row[k]) / denom;
}

// Normalise metric row i of one image (metric_img: [N, C] of dtype st) into the scratch.
void normalize_metric_row(at::ScalarType st, const void* metric_img, int64_t i, MetricScratch& s) {
  const int64_t c = s.c;
  float* out = i % 2 == 0 ? s.src_row(i / 2) : s.dst_block((i / 2) / kDstBlock) + (i / 2) % kDstBlock;
  const int64_t stride = i % 2 == 0 ? 1 : kDstBlock;
  switch (st) {
    case at::kFloat:
      normalize_row(static_cast<const float*>(metric_img) + i * c, c, out, stride);
      break;
    case at::kHalf:
      normalize_row(static_cast<const c10::Half*>(metric_img) + i * c, c, out, stride);
      break;
    default:
      normalize_row(static_cast<const c10::BFloat16*>(metric_img) + i * c, c, out, stride);
      break;
  }
}

// Update the best destination (best / arg, running over calls) of `rows` (<= kTileRows)
// consecutive sources src (row stride c) with destinations [j0, j1) of the packed dst
// blocks (j0 a multiple of kDstBlock). One register tile of kTileRows x kDstBlock scores at a
// time (8 accumulators of 8 floats); every score sums over k = 0..c-1 in order, so the
// result is deterministic, and destinations are scanned in increasing order. Inlined into an AVX2+FMA and a
// baseline (x86-64 or generic) entry point; the CPU picks one once at load time.
typedef float Vec8 __attribute__((vector_size(32)));
static_assert(kDstBlock == 16, "the register tile holds two Vec8 per source row");

__attribute__((always_inline)) inline void best_edges_tile_body(const float* src, int64_t rows, const float* dst,
                                                                int64_t j0, int64_t j1, int64_t c, float* best,
                                                                int32_t* arg) {
  const float* rp[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) rp[r] = src + std::min(r, rows - 1) * c;  // pad by repeating
  const int64_t blocks = (j1 + kDstBlock - 1) / kDstBlock;
  for (int64_t blk = j0 / kDstBlock; blk < blocks; ++blk) {
    const float* d = dst + blk * c * kDstBlock;
    Vec8 acc[kTileRows][2];
    for (int64_t r = 0; r < kTileRows; ++r) acc[r][0] = acc[r][1] = Vec8{};
    for (int64_t k = 0; k < c; ++k) {
      Vec8 d0, d1;
      std::memcpy(&d0, d + k * kDstBlock, sizeof(Vec8));
      std::memcpy(&d1, d + k * kDstBlock + 8, sizeof(Vec8));
      for (int64_t r = 0; r < kTileRows; ++r) {
        const Vec8 a = Vec8{} + rp[r][k];
        acc[r][0] += a * d0;
        acc[r][1] += a * d1;
      }
    }
    float scores[kTileRows][kDstBlock];
    std::memcpy(scores, acc, sizeof(scores));
    const int64_t width = std::min(kDstBlock, j1 - blk * kDstBlock);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < width; ++j) {
        if (scores[r][j] > best[r]) {  // strict: ties keep the smallest destination
          best[r] = scores[r][j];
          arg[r] = static_cast<int32_t>(2 * (blk * kDstBlock + j) + 1);
        }
      }
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int32_t*);

void best_edges_tile_generic(const float* src, int64_t rows, const float* dst, int64_t j0, int64_t j1, int64_t c,
                             float* best, int32_t* arg) {
  best_edges_tile_body(src, rows, dst, j0, j1, c, best, arg);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void best_edges_tile_avx2(const float* src, int64_t rows, const float* dst,
                                                               int64_t j0, int64_t j1, int64_t c, float* best,
                                                               int32_t* arg) {
  best_edges_tile_body(src, rows, dst, j0, j1, c, best, arg);
}
#endif

TileFn pick_best_edges_tile() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return best_edges_tile_avx2;
#endif
  return best_edges_tile_generic;
}

const TileFn best_edges_tile = pick_best_edges_tile();

// node_max / node_idx of sources [i0, i1) of one image with t valid rows (scratch filled).
void similarity_sources(MetricScratch& s, int64_t t, bool protect_first, int64_t i0, int64_t i1, float* node_max,
                        int32_t* node_idx) {
  const int64_t first = protect_first ? 1 : 0, src_valid = (t + 1) / 2, dst_valid = t / 2;
  for (int64_t i = i0; i < i1; ++i) {  // padding, protected, or no destination
    node_max[i] = -kInf;
    node_idx[i] = -1;
  }
  const int64_t lo = std::max(i0, first), hi = std::min(i1, src_valid);
  if (lo >= hi || dst_valid == 0) return;
  // Destinations in chunks that stay in L1/L2 while every tile of these sources reads them.
  for (int64_t j0 = 0; j0 < dst_valid; j0 += kDstChunk) {
    const int64_t j1 = std::min(j0 + kDstChunk, dst_valid);
    for (int64_t r0 = lo; r0 < hi; r0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, hi - r0);
      best_edges_tile(s.src_row(r0), rows, s.dst_block(0), j0, j1, s.c, node_max + r0, node_idx + r0);
    }
  }
  for (int64_t i = lo; i < hi; ++i)
    if (!(node_max[i] > -kInf)) node_idx[i] = -1;
}

// Whole image: normalise, then every source (node_max / node_idx: [ceil(N/2)]).
void similarity_image(at::ScalarType st, const void* metric_img, int64_t n, int64_t t, bool protect_first,
                      MetricScratch& s, float* node_max, int32_t* node_idx) {
  for (int64_t i = 0; i < t; ++i) normalize_metric_row(st, metric_img, i, s);
  similarity_sources(s, t, protect_first, 0, (n + 1) / 2, node_max, node_idx);
}

// Every image, parallel over rows then over source blocks (for small batches).
void similarity_phased(const at::Tensor& metric, const int32_t* lengths, bool protect_first, float* node_max,
                       int32_t* node_idx) {
  const int64_t batch = metric.size(0), n = metric.size(1), c = metric.size(2), m = (n + 1) / 2;
  const int64_t row_bytes = c * static_cast<int64_t>(metric.element_size());
  const char* base = static_cast<const char*>(metric.data_ptr());
  std::vector<MetricScratch> scratch;
  for (int64_t b = 0; b < batch; ++b) scratch.emplace_back(n, c);
  at::parallel_for(0, batch * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / n, i = idx % n;
      if (i < clamp_length(lengths[b], n))
        normalize_metric_row(metric.scalar_type(), base + b * n * row_bytes, i, scratch[b]);
    }
  });
  const int64_t tasks = (m + kSrcBlock - 1) / kSrcBlock;
  at::parallel_for(0, batch * tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks, i0 = (task % tasks) * kSrcBlock;
      similarity_sources(scratch[b], clamp_length(lengths[b], n), protect_first, i0, std::min(i0 + kSrcBlock, m),
                         node_max + b * m, node_idx + b * m);
    }
  });
}

// ------------------------------------------------------------------ selection

// row_map [N] and the new length of one image (rules 4 and 6), replicating the reference's
// formulas exactly. merged: scratch of ceil(N/2) bytes.
void select_image(const float* node_max, const int32_t* node_idx, int64_t n, int32_t length, float tau,
                  bool protect_first, int32_t* row_map, int32_t* new_length, uint8_t* merged) {
  const int64_t m = (n + 1) / 2, n_dst = n / 2;
  const int64_t t = length;
  int64_t count = 0;
  for (int64_t i = 0; i < m; ++i) {
    merged[i] = node_max[i] > tau;
    count += merged[i];
  }
  const int64_t cap = std::max<int64_t>((t - (protect_first ? 1 : 0)) / 2, 0);
  if (count > cap) {
    // Drop the merged source with the smallest node_max (first index on ties).
    int64_t drop = 0;
    float lowest = merged[0] ? node_max[0] : kInf;
    for (int64_t i = 1; i < m; ++i) {
      const float key = merged[i] ? node_max[i] : kInf;
      if (key < lowest) {
        lowest = key;
        drop = i;
      }
    }
    count -= merged[drop];
    merged[drop] = 0;
  }
  int64_t num_unmerged = 0;
  for (int64_t i = 0; i < m; ++i) num_unmerged += (2 * i < t) && !merged[i];
  auto dst_new = [&](int64_t j) -> int32_t { return 2 * j + 1 < t ? static_cast<int32_t>(num_unmerged + j) : -1; };
  int64_t unmerged_seen = 0;
  for (int64_t i = 0; i < m; ++i) {
    int32_t row = -1;
    if (merged[i]) {
      if (n_dst > 0) {
        const int64_t col = (std::max<int32_t>(node_idx[i], 1) - 1) / 2;
        row = dst_new(std::min(col, n_dst - 1));
      }
    } else if (2 * i < t) {
      row = static_cast<int32_t>(unmerged_seen++);
    }
    row_map[2 * i] = row;
  }
  for (int64_t j = 0; j < n_dst; ++j) row_map[2 * j + 1] = dst_new(j);
  *new_length = static_cast<int32_t>(t - count);
}

// ------------------------------------------------------------------ merge

// Members of every output row of one image, grouped by row_map (CSR, members in increasing
// old-row order). offsets [N+1], members [N]; entries outside [0, N) are ignored.
void group_rows(const int32_t* map, int64_t n, int32_t* off, int32_t* mem) {
  std::fill(off, off + n + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    if (map[i] >= 0 && map[i] < n) ++off[map[i] + 1];
  for (int64_t r = 0; r < n; ++r) off[r + 1] += off[r];
  for (int64_t i = 0; i < n; ++i)  // afterwards off[r] holds the old off[r + 1]
    if (map[i] >= 0 && map[i] < n) mem[off[map[i]]++] = static_cast<int32_t>(i);
  for (int64_t r = n; r > 0; --r) off[r] = off[r - 1];
  off[0] = 0;
}

// One output row: size-weighted mean of its members (fp32 accumulation), zero when the
// total size is not positive; a single member with positive size is copied exactly.
// acc: scratch of D floats.
template <typename T>
inline void merge_row(const T* x, const float* size, const int32_t* mem, int64_t count, int64_t d, T* out,
                      float* size_out, float* acc) {
  float total = 0.0f;
  for (int64_t k = 0; k < count; ++k) total += size[mem[k]];
  *size_out = total;
  if (!(total > 0.0f)) {
    std::memset(static_cast<void*>(out), 0, sizeof(T) * d);
    return;
  }
  if (count == 1) {
    std::memcpy(static_cast<void*>(out), x + mem[0] * d, sizeof(T) * d);
    return;
  }
  {
    const T* row = x + mem[0] * d;
    const float s = size[mem[0]];
    for (int64_t e = 0; e < d; ++e) acc[e] = s * static_cast<float>(row[e]);
  }
  for (int64_t k = 1; k < count; ++k) {
    const T* row = x + mem[k] * d;
    const float s = size[mem[k]];
    for (int64_t e = 0; e < d; ++e) acc[e] += s * static_cast<float>(row[e]);
  }
  const float denom = std::max(total, 1e-30f);
  for (int64_t e = 0; e < d; ++e) out[e] = static_cast<T>(acc[e] / denom);
}

// Output rows [r0, r1) of one image. x_img / out_img: [N, D] of dtype st.
void merge_rows(at::ScalarType st, const void* x_img, const float* size_img, const int32_t* off, const int32_t* mem,
                int64_t d, int64_t r0, int64_t r1, void* out_img, float* size_out_img, float* acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t* members = mem + off[r];
    const int64_t count = off[r + 1] - off[r];
    switch (st) {
      case at::kFloat:
        merge_row(static_cast<const float*>(x_img), size_img, members, count, d,
                  static_cast<float*>(out_img) + r * d, size_out_img + r, acc);
        break;
      case at::kHalf:
        merge_row(static_cast<const c10::Half*>(x_img), size_img, members, count, d,
                  static_cast<c10::Half*>(out_img) + r * d, size_out_img + r, acc);
        break;
      default:
        merge_row(static_cast<const c10::BFloat16*>(x_img), size_img, members, count, d,
                  static_cast<c10::BFloat16*>(out_img) + r * d, size_out_img + r, acc);
        break;
    }
  }
}

// The merge inputs/outputs of a batch, with per-image addressing.
struct MergeIo {
  at::ScalarType st;
  int64_t n, d, row_bytes;
  const char* x;
  const float* size;
  char* x_out;
  float* size_out;

  MergeIo(const at::Tensor& x_, const float* size_, const at::Tensor& x_out_, float* size_out_)
      : st(x_.scalar_type()), n(x_.size(1)), d(x_.size(2)), row_bytes(x_.size(2) * x_.element_size()),
        x(static_cast<const char*>(x_.data_ptr())), size(size_), x_out(static_cast<char*>(x_out_.data_ptr())),
        size_out(size_out_) {}

  void rows(int64_t b, const int32_t* off, const int32_t* mem, int64_t r0, int64_t r1, float* acc) const {
    merge_rows(st, x + b * n * row_bytes, size + b * n, off, mem, d, r0, r1, x_out + b * n * row_bytes,
               size_out + b * n, acc);
  }
};

// Merge every image of the batch by row_map [B, N], parallel over images or over rows.
void merge_all(const MergeIo& io, int64_t batch, const int32_t* row_map) {
  const int64_t n = io.n, d = io.d;
  over_images(
      batch, merge_work(batch, n, d),
      [&](int64_t b) {
        std::vector<int32_t> off(static_cast<size_t>(n + 1)), mem(static_cast<size_t>(n));
        std::vector<float> acc(static_cast<size_t>(d));
        group_rows(row_map + b * n, n, off.data(), mem.data());
        io.rows(b, off.data(), mem.data(), 0, n, acc.data());
      },
      [&]() {
        std::vector<int32_t> off(static_cast<size_t>(batch * (n + 1))), mem(static_cast<size_t>(batch * n));
        for (int64_t b = 0; b < batch; ++b) group_rows(row_map + b * n, n, off.data() + b * (n + 1), mem.data() + b * n);
        const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
        at::parallel_for(0, batch * n, grain, [&](int64_t begin, int64_t end) {
          std::vector<float> acc(static_cast<size_t>(d));
          while (begin < end) {  // split the range at image boundaries
            const int64_t b = begin / n, r0 = begin % n, r1 = std::min(n, r0 + (end - begin));
            io.rows(b, off.data() + b * (n + 1), mem.data() + b * n, r0, r1, acc.data());
            begin += r1 - r0;
          }
        });
      });
}

void update_pos_map_image(const int32_t* pos_map, const int32_t* row_map, int64_t n0, int64_t n, int32_t* out) {
  for (int64_t p = 0; p < n0; ++p) {
    const int32_t q = pos_map[p];
    out[p] = (q >= 0 && q < n) ? row_map[q] : -1;
  }
}

// ------------------------------------------------------------------ ops

void native_bipartite_similarity(const at::Tensor& metric, const at::Tensor& lengths, bool protect_first,
                                 const at::Tensor& node_max, const at::Tensor& node_idx) {
  check_float_cpu(metric, "metric", 3);
  const int64_t batch = metric.size(0), n = metric.size(1), c = metric.size(2), m = (n + 1) / 2;
  check_cpu(lengths, "lengths", at::kInt, 1);
  check_cpu(node_max, "node_max", at::kFloat, 2);
  check_cpu(node_idx, "node_idx", at::kInt, 2);
  TORCH_CHECK(lengths.size(0) == batch && node_max.size(0) == batch && node_max.size(1) == m &&
                  node_idx.sizes() == node_max.sizes(),
              "native_bipartite_similarity: shape mismatch");
  const int32_t* len = lengths.data_ptr<int32_t>();
  float* nm = node_max.data_ptr<float>();
  int32_t* ni = node_idx.data_ptr<int32_t>();
  const char* base = static_cast<const char*>(metric.data_ptr());
  const int64_t image_bytes = n * c * static_cast<int64_t>(metric.element_size());
  over_images(
      batch, similarity_work(batch, n, c),
      [&](int64_t b) {
        MetricScratch s(n, c);
        similarity_image(metric.scalar_type(), base + b * image_bytes, n, clamp_length(len[b], n), protect_first, s,
                         nm + b * m, ni + b * m);
      },
      [&]() { similarity_phased(metric, len, protect_first, nm, ni); });
}

void native_select_edges(const at::Tensor& node_max, const at::Tensor& node_idx, const at::Tensor& lengths,
                         const at::Tensor& threshold, int64_t num_rows, bool protect_first,
                         const at::Tensor& row_map, const at::Tensor& new_lengths) {
  check_cpu(node_max, "node_max", at::kFloat, 2);
  check_cpu(node_idx, "node_idx", at::kInt, 2);
  check_cpu(lengths, "lengths", at::kInt, 1);
  check_cpu(threshold, "threshold", at::kFloat, 1);
  check_cpu(row_map, "row_map", at::kInt, 2);
  check_cpu(new_lengths, "new_lengths", at::kInt, 1);
  const int64_t batch = node_max.size(0), n = num_rows, m = (num_rows + 1) / 2;
  TORCH_CHECK(num_rows >= 1 && node_max.size(1) == m && node_idx.sizes() == node_max.sizes() &&
                  lengths.size(0) == batch && threshold.size(0) == batch && row_map.size(0) == batch &&
                  row_map.size(1) == num_rows && new_lengths.size(0) == batch,
              "native_select_edges: shape mismatch");
  const float* nm = node_max.data_ptr<float>();
  const int32_t* ni = node_idx.data_ptr<int32_t>();
  const int32_t* len = lengths.data_ptr<int32_t>();
  const float* tau = threshold.data_ptr<float>();
  int32_t* rm = row_map.data_ptr<int32_t>();
  int32_t* nl = new_lengths.data_ptr<int32_t>();
  at::parallel_for(0, batch, 8, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> merged(static_cast<size_t>(m));
    for (int64_t b = begin; b < end; ++b)
      select_image(nm + b * m, ni + b * m, n, len[b], tau[b], protect_first, rm + b * n, nl + b, merged.data());
  });
}

void native_scatter_merge(const at::Tensor& x, const at::Tensor& size, const at::Tensor& row_map,
                          const at::Tensor& new_lengths, const at::Tensor& x_out, const at::Tensor& size_out) {
  check_float_cpu(x, "x", 3);
  check_cpu(size, "size", at::kFloat, 2);
  check_cpu(row_map, "row_map", at::kInt, 2);
  check_cpu(new_lengths, "new_lengths", at::kInt, 1);
  check_cpu(x_out, "x_out", x.scalar_type(), 3);
  check_cpu(size_out, "size_out", at::kFloat, 2);
  const int64_t batch = x.size(0), n = x.size(1);
  TORCH_CHECK(size.size(0) == batch && size.size(1) == n && row_map.sizes() == size.sizes() &&
                  x_out.sizes() == x.sizes() && size_out.sizes() == size.sizes() && new_lengths.size(0) == batch,
              "native_scatter_merge: shape mismatch");
  // new_lengths is implied by row_map (the API checks row_map < new_lengths): rows that no
  // valid row maps to come out zero, like the reference.
  merge_all(MergeIo(x, size.data_ptr<float>(), x_out, size_out.data_ptr<float>()), batch,
            row_map.data_ptr<int32_t>());
}

void native_dtome_merge(const at::Tensor& x, const at::Tensor& metric, const at::Tensor& size,
                        const at::Tensor& lengths, const at::Tensor& threshold,
                        const std::optional<at::Tensor>& pos_map, bool protect_first, const at::Tensor& x_out,
                        const at::Tensor& size_out, const at::Tensor& lengths_out, const at::Tensor& row_map_out,
                        const std::optional<at::Tensor>& pos_map_out) {
  check_float_cpu(x, "x", 3);
  check_float_cpu(metric, "metric", 3);
  check_cpu(size, "size", at::kFloat, 2);
  check_cpu(lengths, "lengths", at::kInt, 1);
  check_cpu(threshold, "threshold", at::kFloat, 1);
  check_cpu(x_out, "x_out", x.scalar_type(), 3);
  check_cpu(size_out, "size_out", at::kFloat, 2);
  check_cpu(lengths_out, "lengths_out", at::kInt, 1);
  check_cpu(row_map_out, "row_map_out", at::kInt, 2);
  const int64_t batch = x.size(0), n = x.size(1), c = metric.size(2), m = (n + 1) / 2;
  TORCH_CHECK(metric.size(0) == batch && metric.size(1) == n && size.size(0) == batch && size.size(1) == n &&
                  lengths.size(0) == batch && threshold.size(0) == batch && x_out.sizes() == x.sizes() &&
                  size_out.sizes() == size.sizes() && lengths_out.size(0) == batch &&
                  row_map_out.sizes() == size.sizes(),
              "native_dtome_merge: shape mismatch");
  TORCH_CHECK(pos_map.has_value() == pos_map_out.has_value(), "pos_map and pos_map_out go together");
  int64_t n0 = 0;
  const int32_t* pm = nullptr;
  int32_t* pm_out = nullptr;
  if (pos_map.has_value()) {
    check_cpu(*pos_map, "pos_map", at::kInt, 2);
    check_cpu(*pos_map_out, "pos_map_out", at::kInt, 2);
    TORCH_CHECK(pos_map->size(0) == batch && pos_map_out->sizes() == pos_map->sizes(),
                "native_dtome_merge: pos_map shape mismatch");
    n0 = pos_map->size(1);
    pm = pos_map->data_ptr<int32_t>();
    pm_out = pos_map_out->data_ptr<int32_t>();
  }
  const int32_t* len = lengths.data_ptr<int32_t>();
  const float* tau = threshold.data_ptr<float>();
  int32_t* row_map = row_map_out.data_ptr<int32_t>();
  int32_t* new_len = lengths_out.data_ptr<int32_t>();
  const MergeIo io(x, size.data_ptr<float>(), x_out, size_out.data_ptr<float>());
  const char* metric_base = static_cast<const char*>(metric.data_ptr());
  const int64_t metric_bytes = n * c * static_cast<int64_t>(metric.element_size());
  over_images(
      batch, similarity_work(batch, n, c) + merge_work(batch, n, io.d),
      [&](int64_t b) {  // the whole step for one image, in one thread
        MetricScratch s(n, c);
        std::vector<float> nm(static_cast<size_t>(m)), acc(static_cast<size_t>(io.d));
        std::vector<int32_t> ni(static_cast<size_t>(m)), off(static_cast<size_t>(n + 1)), mem(static_cast<size_t>(n));
        std::vector<uint8_t> merged(static_cast<size_t>(m));
        similarity_image(metric.scalar_type(), metric_base + b * metric_bytes, n, clamp_length(len[b], n),
                         protect_first, s, nm.data(), ni.data());
        select_image(nm.data(), ni.data(), n, len[b], tau[b], protect_first, row_map + b * n, new_len + b,
                     merged.data());
        group_rows(row_map + b * n, n, off.data(), mem.data());
        io.rows(b, off.data(), mem.data(), 0, n, acc.data());
        if (pm != nullptr) update_pos_map_image(pm + b * n0, row_map + b * n, n0, n, pm_out + b * n0);
      },
      [&]() {  // few images: each phase parallel over rows / source blocks
        std::vector<float> nm(static_cast<size_t>(batch * m));
        std::vector<int32_t> ni(static_cast<size_t>(batch * m));
        similarity_phased(metric, len, protect_first, nm.data(), ni.data());
        std::vector<uint8_t> merged(static_cast<size_t>(m));
        for (int64_t b = 0; b < batch; ++b)
          select_image(nm.data() + b * m, ni.data() + b * m, n, len[b], tau[b], protect_first, row_map + b * n,
                       new_len + b, merged.data());
        merge_all(io, batch, row_map);
        if (pm != nullptr) {
          for (int64_t b = 0; b < batch; ++b) update_pos_map_image(pm + b * n0, row_map + b * n, n0, n, pm_out + b * n0);
        }
      });
}

void native_batch_threshold(const at::Tensor& node_max, int64_t r, const at::Tensor& out) {
  check_cpu(node_max, "node_max", at::kFloat, 2);
  check_cpu(out, "out", at::kFloat, 0);
  TORCH_CHECK(r >= 0, "r must be >= 0");
  const int64_t numel = node_max.numel();
  const int64_t k = node_max.size(0) * r + 1;
  float* result = out.data_ptr<float>();
  if (k > numel) {
    *result = 0.0f;
    return;
  }
  const float* data = node_max.data_ptr<float>();
  // NaN rule: a NaN score is no edge, i.e. counts as -inf.
  std::vector<float> values(numel);
  for (int64_t i = 0; i < numel; ++i) values[i] = std::isnan(data[i]) ? -kInf : data[i];
  std::nth_element(values.begin(), values.begin() + (k - 1), values.end(), std::greater<float>());
  *result = std::max(values[k - 1], 0.0f);
}

}  // namespace
}  // namespace dymu_dtome_cpu

TORCH_LIBRARY_FRAGMENT(dymu, m) {
  m.set_python_module("dymu_kernels.dtome.native");
  m.def("native_bipartite_similarity(Tensor metric, Tensor lengths, bool protect_first, Tensor(a!) node_max, "
        "Tensor(b!) node_idx) -> ()");
  m.def("native_select_edges(Tensor node_max, Tensor node_idx, Tensor lengths, Tensor threshold, int num_rows, "
        "bool protect_first, Tensor(a!) row_map, Tensor(b!) new_lengths) -> ()");
  m.def("native_scatter_merge(Tensor x, Tensor size, Tensor row_map, Tensor new_lengths, Tensor(a!) x_out, "
        "Tensor(b!) size_out) -> ()");
  m.def("native_dtome_merge(Tensor x, Tensor metric, Tensor size, Tensor lengths, Tensor threshold, "
        "Tensor? pos_map, bool protect_first, Tensor(a!) x_out, Tensor(b!) size_out, Tensor(c!) lengths_out, "
        "Tensor(d!) row_map_out, Tensor(e!)? pos_map_out) -> ()");
  m.def("native_batch_threshold(Tensor node_max, int r, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(dymu, CPU, m) {
  m.impl("native_bipartite_similarity", &dymu_dtome_cpu::native_bipartite_similarity);
  m.impl("native_select_edges", &dymu_dtome_cpu::native_select_edges);
  m.impl("native_scatter_merge", &dymu_dtome_cpu::native_scatter_merge);
  m.impl("native_dtome_merge", &dymu_dtome_cpu::native_dtome_merge);
  m.impl("native_batch_threshold", &dymu_dtome_cpu::native_batch_threshold);
}
