// AdaLoRA's importance update for the CPU, one call for every adapted layer, registered as
//   torch.ops.adalora_fast_cpu.importance_update    (PEFT's update_ipt + the triplet-score reduction)
// and called by adalora_fast/ops/importance.py. The masking kernels are in mask_cpu.cpp.
//
// Why: with ~10 flat torch ops plus two torch.stack per (kind, shape) group, the importance update
// of hundreds of layers is bound by op count and extra passes over the state, not by bytes. Here
// each element is read once (p, grad, m1, m2) and written once (m1, m2): 24 bytes and ~10 FLOPs
// per element, the [sum r] triplet means reduced in the same pass.
//
// Arithmetic follows PEFT's op order exactly (the file is built with -ffp-contract=off, so no
// multiply-add is fused): m1 = b1*m1 + (1-b1)*ipt; m2 = b2*m2 + (1-b2)*|ipt - m1|, with b1 and
// (1-b1) rounded to fp32 as torch rounds a Python scalar for an fp32 tensor.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

void check_f32(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what, "[", i,
              "] must be a contiguous float32 CPU tensor");
}

// params/grads: A_0, B_0, E_0, A_1, ... (A [r, k], B [d, r], E [r, 1]); an empty grads list means
// each parameter's own .grad (read here: no Python list of T gradients to build and convert).
// tensor_table [T, 3] int64 holds each tensor's first element in m1/m2, its layer's first position in
// the [sum r] scores and its kind (0 = A, 1 = B, 2 = E: the caller's layout says which is which).
// parts (optional, [3, sum r] fp32, zeroed): row means of A, column means of B, E, of m1 * m2.
// skipped ([T] int64): an element whose |p * grad| is not finite keeps its m1 and m2 (a NaN or inf
// would otherwise stay in the averages until the final phase and keep its triplet from ever being
// pruned); skipped[t] counts them, for the caller's warning.
void importance_update(at::TensorList params, const c10::List<c10::optional<at::Tensor>>& grads_in, at::Tensor m1, at::Tensor m2,
                       at::Tensor skipped, const at::Tensor& tensor_table, double beta1, double beta2,
                       const c10::optional<at::Tensor>& parts) {
  const int64_t T = static_cast<int64_t>(params.size());
  const bool own_grads = grads_in.size() == 0;
  TORCH_CHECK(own_grads || static_cast<int64_t>(grads_in.size()) == T, "params and grads differ in length");
  // Missing gradients are reported by index (the caller turns that into a message with names);
  // a non-contiguous gradient is copied once here rather than checked in Python per tensor.
  std::vector<at::Tensor> grads(T);
  for (int64_t t = 0; t < T; ++t) {
    const c10::optional<at::Tensor> g = own_grads ? c10::optional<at::Tensor>(params[t].grad()) : grads_in.get(t);
    TORCH_CHECK(g.has_value() && g->defined(), "missing gradient for adapter tensor ", t);
    grads[t] = g->contiguous();
  }
  TORCH_CHECK(tensor_table.scalar_type() == at::kLong && tensor_table.is_contiguous() && tensor_table.size(0) == T &&
                  tensor_table.size(1) == 3,
              "tensor_table must be a contiguous int64 [T, 3] tensor");
  check_f32(m1, "m1", 0);
  check_f32(m2, "m2", 0);
  TORCH_CHECK(skipped.device().is_cpu() && skipped.scalar_type() == at::kLong && skipped.is_contiguous() &&
                  skipped.numel() == T,
              "skipped must be a contiguous int64 [T] CPU tensor");
  for (int64_t t = 0; t < T; ++t) {
    check_f32(params[t], "params", t);
    check_f32(grads[t], "grads", t);
    TORCH_CHECK(grads[t].numel() == params[t].numel(), "grads[", t, "] does not match params[", t, "]");
  }
  const bool scores = parts.has_value() && parts->defined();
  int64_t total_r = 0;
  if (scores) {
    check_f32(*parts, "parts", 0);
    TORCH_CHECK(parts->dim() == 2 && parts->size(0) == 3, "parts must be [3, sum r]");
    total_r = parts->size(1);
  }
  const int64_t* mp = tensor_table.data_ptr<int64_t>();
  float* s1 = m1.data_ptr<float>();
  float* s2 = m2.data_ptr<float>();
  float* sc = scores ? parts->data_ptr<float>() : nullptr;
  int64_t* nskip = skipped.data_ptr<int64_t>();
  const float b1 = static_cast<float>(beta1), c1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), c2 = static_cast<float>(1.0 - beta2);
  const int64_t state_numel = m1.numel();

  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    std::vector<double> colsum;
    for (int64_t t = tb; t < te; ++t) {
      const at::Tensor& p = params[t];
      const int64_t n = p.numel();
      const int64_t off = mp[3 * t];
      TORCH_CHECK(off >= 0 && off + n <= state_numel, "state offset out of range for tensor ", t);
      const float* pp = p.data_ptr<float>();
      const float* gp = grads[t].data_ptr<float>();
      float* a1 = s1 + off;
      float* a2 = s2 + off;
      // A first pass only looks for a non-finite |p * grad| (x * 0 is NaN exactly for NaN and inf,
      // a float sum that vectorises; p and grad are then read from cache). Selecting and counting
      // in the update loop itself would stop that loop from vectorising.
      float chk = 0.0f;
#pragma omp simd reduction(+ : chk)
      for (int64_t i = 0; i < n; ++i) chk += std::fabs(pp[i] * gp[i]) * 0.0f;
      if (chk == 0.0f) {
        // p, grad, m1 and m2 never alias (distinct tensors / disjoint state ranges): vectorise.
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const float ipt = std::fabs(pp[i] * gp[i]);
          const float e1 = b1 * a1[i] + c1 * ipt;
          a1[i] = e1;
          a2[i] = b2 * a2[i] + c2 * std::fabs(ipt - e1);
        }
      } else {  // rare: the non-finite elements keep their state and are counted
        int64_t bad = 0;
        for (int64_t i = 0; i < n; ++i) {
          const float ipt = std::fabs(pp[i] * gp[i]);
          if (!std::isfinite(ipt)) {
            ++bad;
            continue;
          }
          const float e1 = b1 * a1[i] + c1 * ipt;
          a1[i] = e1;
          a2[i] = b2 * a2[i] + c2 * std::fabs(ipt - e1);
        }
        nskip[t] += bad;
      }
      if (!scores || n == 0) continue;
      const int64_t to = mp[3 * t + 1];
      const int64_t kind = mp[3 * t + 2];
      if (kind == 0) {  // A [r, k]: mean over each row
        const int64_t r = p.size(0), k = p.size(1);
        for (int64_t i = 0; i < r; ++i) {
          double acc = 0.0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < k; ++j) acc += static_cast<double>(a1[i * k + j] * a2[i * k + j]);
          sc[to + i] = static_cast<float>(acc / static_cast<double>(k));
        }
      } else if (kind == 1) {  // B [d, r]: mean over each column
        const int64_t d = p.size(0), r = p.size(1);
        colsum.assign(r, 0.0);
        double* cs = colsum.data();
        for (int64_t i = 0; i < d; ++i) {
          const float* x1 = a1 + i * r;
          const float* x2 = a2 + i * r;
#pragma omp simd
          for (int64_t j = 0; j < r; ++j) cs[j] += static_cast<double>(x1[j] * x2[j]);
        }
        for (int64_t j = 0; j < r; ++j) sc[total_r + to + j] = static_cast<float>(cs[j] / static_cast<double>(d));
      } else {  // E [r, 1]
        for (int64_t i = 0; i < n; ++i) sc[2 * total_r + to + i] = a1[i] * a2[i];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adalora_fast_cpu, m) {
  m.def("importance_update(Tensor[] params, Tensor?[] grads, Tensor(a!) m1, Tensor(b!) m2, Tensor(c!) skipped, "
        "Tensor tensor_table, float beta1, float beta2, Tensor(d!)? parts) -> ()");
}

TORCH_LIBRARY_IMPL(adalora_fast_cpu, CPU, m) {
  m.impl("importance_update", &importance_update);
}
