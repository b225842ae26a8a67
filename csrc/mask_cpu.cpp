// Masking to the budget for the CPU, one call each for every adapted layer, registered as
//   torch.ops.adalora_fast_cpu.keep_mask_to_budget  (exact-k selection, O(n))
//   torch.ops.adalora_fast_cpu.apply_mask           (zero the pruned lora_E entries)
// and called by adalora_fast/ops/mask.py.

#include <torch/library.h>
#include <ATen/ATen.h>

#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

void check_f32(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what, "[", i,
              "] must be a contiguous float32 CPU tensor");
}

// reference.keep_mask_to_budget without the sort: exactly n_prune triplets pruned, the lowest
// scores, ties (and NaNs, which sort last as in torch.sort) broken by position. The comparator is
// a strict total order, so nth_element's first n_prune entries are the stable sort's first
// n_prune: O(n) instead of a stable sort's O(n log n).
at::Tensor keep_mask_to_budget(const at::Tensor& scores, int64_t n_prune) {
  check_f32(scores, "scores", 0);
  TORCH_CHECK(scores.dim() == 1, "scores must be 1-D");
  const int64_t n = scores.numel();
  TORCH_CHECK_VALUE(n_prune >= 0 && n_prune <= n, "n_prune=", n_prune, " must lie in [0, ", n, "]");
  at::Tensor keep = at::ones({n}, scores.options().dtype(at::kBool));
  if (n_prune == 0) return keep;
  const float* s = scores.data_ptr<float>();
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), int64_t{0});
  std::nth_element(idx.begin(), idx.begin() + (n_prune - 1), idx.end(), [s](int64_t a, int64_t b) {
    const float x = s[a], y = s[b];
    const bool nx = std::isnan(x), ny = std::isnan(y);
    if (nx != ny) return ny;
    if (!nx && x != y) return x < y;
    return a < b;
  });
  bool* k = keep.data_ptr<bool>();
  for (int64_t i = 0; i < n_prune; ++i) k[idx[i]] = false;
  return keep;
}

// Zero the pruned entries of every lora_E (E_t [r_t, 1], the triplets in keep's layer order), as
// PEFT's masked_fill_: one call instead of a split, a list of .data views and a foreach multiply
// over every layer. Writes through raw pointers, so it bumps each E's version counter itself, as
// an in-place torch op would.
void apply_mask(at::TensorList E, const at::Tensor& keep) {
  TORCH_CHECK(keep.device().is_cpu() && keep.scalar_type() == at::kBool && keep.is_contiguous() && keep.dim() == 1,
              "keep must be a contiguous 1-D bool CPU tensor");
  const bool* k = keep.data_ptr<bool>();
  const int64_t n = keep.numel();
  int64_t total = 0;
  for (size_t t = 0; t < E.size(); ++t) {  // every check before any write
    check_f32(E[t], "E", static_cast<int64_t>(t));
    total += E[t].numel();
  }
  TORCH_CHECK(total == n, "keep has ", n, " entries, the E tensors' ranks add up to ", total);
  int64_t off = 0;
  for (size_t t = 0; t < E.size(); ++t) {
    const int64_t r = E[t].numel();
    float* e = E[t].data_ptr<float>();
    for (int64_t i = 0; i < r; ++i) {
      if (!k[off + i]) e[i] = 0.0f;
    }
    torch::autograd::impl::bump_version(E[t]);
    off += r;
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adalora_fast_cpu, m) {
  m.def("keep_mask_to_budget(Tensor scores, int n_prune) -> Tensor");
  m.def("apply_mask(Tensor(a!)[] E, Tensor keep) -> ()");
}

TORCH_LIBRARY_IMPL(adalora_fast_cpu, CPU, m) {
  m.impl("keep_mask_to_budget", &keep_mask_to_budget);
  m.impl("apply_mask", &apply_mask);
}
