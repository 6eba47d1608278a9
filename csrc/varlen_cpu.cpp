// Native CPU kernels of the packed variable-length DToMe ops (issue 12): the merge step and the
// proportional attention on the packed layout, image b owning rows cu_seqlens[b] ..
// cu_seqlens[b+1] of [T, ...] tensors (rows past cu_seqlens[B] are capacity).
//
// Ops (schemas at the bottom, dymu::native_<op>) write into outputs the Python wrapper
// (dymu_kernels/varlen/native.py) allocates, so tests can poison them first. Semantics are those
// of dymu_kernels/varlen/reference.py.
//
// Structure:
//   - merge: every image is a contiguous [1, n, D] view of the packed rows, so each one runs
//     the padded native kernel (dymu::native_dtome_merge, csrc/dtome_cpu.cpp, through the
//     dispatcher) straight into its own rows of the outputs; a prefix sum over the new lengths
//     gives the new cu_seqlens, then the kept rows are moved down to their packed place (in
//     image order, so no row is overwritten before it moves), row_map is offset and pos_map
//     composed; no per-image scratch. The decisions and merged values are therefore bit-identical to
//     dk.dtome_merge(backend="native") on the padded batch.
//   - attention: per image, ATen's CPU flash-attention kernel (at::scaled_dot_product_attention:
//     blocked GEMMs, fp32 online softmax) on the image's [1, H, n, D] views in fp32, with the
//     [n] log-size row as the additive mask (broadcast, never an [n, n] bias), written into the
//     image's rows in q's dtype. Work per image follows its own length: n^2 instead of N_max^2.
//     (A hand-blocked GEMM + softmax version measured 1.3x slower than masked SDPA on the padded
//     batch on the 2-core CPU; the flash kernel's blocking wins.)
// Threads: merge: one image per task when B >= threads, else images in turn; attention: images
// in turn, the flash kernel parallel inside. Bit-identical run to run.
//
// Limitations (honest notes):
//   - CPU tensors only; inputs must be contiguous (the Python wrapper makes them so).
//   - The attention makes fp32 copies of an image's q/k/v rows (a copy even for fp32, since the
//     [n, H, D] rows are read as [H, n, D]); one ATen call sequence per image.
//   - An image whose keys all have size 0 gets zero output rows (softmax of all -inf).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/log.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace dymu_varlen_cpu {
namespace {

void check_cpu(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
}

// Offsets read from a CPU int32 [B + 1] tensor, clamped into [0, T] and made non-decreasing so
// that nothing is read or written out of bounds even with validation off.
std::vector<int64_t> offsets(const at::Tensor& cu_seqlens, int64_t num_rows) {
  check_cpu(cu_seqlens, "cu_seqlens", 1);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32");
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  std::vector<int64_t> out(static_cast<size_t>(cu_seqlens.size(0)));
  int64_t prev = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    prev = std::min<int64_t>(std::max<int64_t>(cu[i], prev), num_rows);
    out[i] = i == 0 ? 0 : prev;
  }
  return out;
}

template <typename Fn>
void over_images(int64_t batch, Fn&& fn) {
  if (batch >= at::get_num_threads() && !at::in_parallel_region()) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) fn(b);
    });
  } else {
    for (int64_t b = 0; b < batch; ++b) fn(b);
  }
}

using MergeFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const std::optional<at::Tensor>&, bool, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const std::optional<at::Tensor>&);

void native_dtome_merge_varlen(const at::Tensor& x, const at::Tensor& metric, const at::Tensor& size,
                               const at::Tensor& cu_seqlens, const at::Tensor& threshold,
                               const std::optional<at::Tensor>& pos_map, bool protect_first, const at::Tensor& x_out,
                               const at::Tensor& size_out, const at::Tensor& cu_out, const at::Tensor& row_map_out,
                               const std::optional<at::Tensor>& pos_map_out) {
  check_cpu(x, "x", 2);
  check_cpu(metric, "metric", 2);
  check_cpu(size, "size", 1);
  check_cpu(threshold, "threshold", 1);
  check_cpu(x_out, "x_out", 2);
  TORCH_CHECK(size.scalar_type() == at::kFloat && size_out.scalar_type() == at::kFloat, "sizes must be float32");
  TORCH_CHECK(row_map_out.scalar_type() == at::kInt && cu_out.scalar_type() == at::kInt, "maps must be int32");
  const int64_t num_rows = x.size(0), dim = x.size(1);
  const auto cu = offsets(cu_seqlens, num_rows);
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  TORCH_CHECK(threshold.size(0) == batch, "threshold must be [B]");
  static auto merge = c10::Dispatcher::singleton().findSchemaOrThrow("dymu::native_dtome_merge", "").typed<MergeFn>();

  // Each image merges straight into its own rows of the outputs (its n input rows hold its
  // k <= n merged rows); the kept rows are then moved down to the new offsets in image order,
  // which never overwrites rows not yet moved (new offset <= old offset).
  const size_t elem = x.element_size();
  std::vector<int32_t> kept(batch, 0);
  over_images(batch, [&](int64_t b) {
    const int64_t start = cu[b], n = cu[b + 1] - cu[b];
    if (n == 0) return;
    auto lengths = at::empty({1}, at::TensorOptions().dtype(at::kInt));
    lengths.data_ptr<int32_t>()[0] = static_cast<int32_t>(n);
    auto lo = at::empty({1}, lengths.options());
    merge.call(x.narrow(0, start, n).unsqueeze(0), metric.narrow(0, start, n).unsqueeze(0),
               size.narrow(0, start, n).unsqueeze(0), lengths, threshold.narrow(0, b, 1), std::nullopt,
               protect_first, x_out.narrow(0, start, n).unsqueeze(0), size_out.narrow(0, start, n).unsqueeze(0), lo,
               row_map_out.narrow(0, start, n).unsqueeze(0), std::nullopt);
    kept[b] = lo.data_ptr<int32_t>()[0];
  });
  int32_t* new_cu = cu_out.data_ptr<int32_t>();
  new_cu[0] = 0;
  for (int64_t b = 0; b < batch; ++b) new_cu[b + 1] = new_cu[b] + kept[b];
  char* xo_base = static_cast<char*>(x_out.data_ptr());
  float* so_base = size_out.data_ptr<float>();
  int32_t* rm = row_map_out.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = cu[b], k = kept[b], dest = new_cu[b];
    if (k == 0 || dest == start) continue;
    std::memmove(xo_base + dest * dim * elem, xo_base + start * dim * elem, static_cast<size_t>(k * dim) * elem);
    std::memmove(so_base + dest, so_base + start, static_cast<size_t>(k) * sizeof(float));
  }
  over_images(batch, [&](int64_t b) {
    const int64_t start = cu[b], n = cu[b + 1] - cu[b], dest = new_cu[b];
    for (int64_t i = start; i < start + n; ++i) rm[i] = rm[i] < 0 ? -1 : static_cast<int32_t>(rm[i] + dest);
  });
  const int64_t total = new_cu[batch];
  std::memset(xo_base + total * dim * elem, 0, static_cast<size_t>((num_rows - total) * dim) * elem);
  std::fill(so_base + total, so_base + num_rows, 0.0f);
  std::fill(rm + cu[batch], rm + num_rows, -1);
  if (pos_map.has_value() && pos_map_out.has_value()) {
    check_cpu(*pos_map, "pos_map", pos_map->dim());
    const int32_t* pm = pos_map->const_data_ptr<int32_t>();
    int32_t* po = pos_map_out->data_ptr<int32_t>();
    const int64_t count = pos_map->numel();
    at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int32_t r = pm[p];
        po[p] = (r < 0 || r >= num_rows) ? -1 : rm[r];
      }
    });
  }
}

void native_proportional_attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& size, const at::Tensor& cu_seqlens, double scale,
                                          const at::Tensor& out) {
  check_cpu(q, "q", 3);
  check_cpu(k, "k", 3);
  check_cpu(v, "v", 3);
  check_cpu(size, "size", 1);
  check_cpu(out, "out", 3);
  TORCH_CHECK(size.scalar_type() == at::kFloat, "size must be float32");
  const int64_t num_rows = q.size(0);
  const auto cu = offsets(cu_seqlens, num_rows);
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  const float* sz = size.const_data_ptr<float>();
  // Images one after another; inside, ATen's CPU flash-attention kernel (blocked, fp32 online
  // softmax, parallel over heads and query blocks) on the image's [1, H, n, D] views, in fp32
  // (fp16/bf16 are upcast so the log-size bias and the softmax stay fp32), with the [n] log-size
  // row broadcast as the additive mask.
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = cu[b], n = cu[b + 1] - cu[b];
    if (n == 0) continue;
    auto dst = out.narrow(0, start, n);
    bool any_key = false;
    for (int64_t j = 0; j < n; ++j) any_key = any_key || sz[start + j] > 0.0f;
    if (!any_key) {  // softmax over all -inf: defined as zero rows
      dst.zero_();
      continue;
    }
    auto view = [&](const at::Tensor& t) { return t.narrow(0, start, n).transpose(0, 1).unsqueeze(0).to(at::kFloat); };
    auto bias = at::log(size.narrow(0, start, n)).view({1, 1, 1, n});
    auto o = at::scaled_dot_product_attention(view(q), view(k), view(v), bias, 0.0, false, scale);
    dst.copy_(o.squeeze(0).transpose(0, 1));
  }
  const int64_t total = cu[batch];
  if (total < num_rows) out.narrow(0, total, num_rows - total).zero_();
}

}  // namespace
}  // namespace dymu_varlen_cpu

TORCH_LIBRARY_FRAGMENT(dymu, m) {
  m.set_python_module("dymu_kernels.varlen.native");
  m.def("native_dtome_merge_varlen(Tensor x, Tensor metric, Tensor size, Tensor cu_seqlens, Tensor threshold, "
        "Tensor? pos_map, bool protect_first, Tensor(a!) x_out, Tensor(b!) size_out, Tensor(c!) cu_seqlens_out, "
        "Tensor(d!) row_map_out, Tensor(e!)? pos_map_out) -> ()");
  m.def("native_proportional_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor size, Tensor cu_seqlens, "
        "float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(dymu, CPU, m) {
  m.impl("native_dtome_merge_varlen", &dymu_varlen_cpu::native_dtome_merge_varlen);
  m.impl("native_proportional_attention_varlen", &dymu_varlen_cpu::native_proportional_attention_varlen);
}
