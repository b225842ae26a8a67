// AdaLoRA's allocator ops for the CPU, one call for every adapted layer, registered as torch ops:
//   torch.ops.adalora_fast.importance_update  (PEFT's update_ipt + the triplet-score reduction)
//   torch.ops.adalora_fast.orth_forward / orth_backward  (the orthogonal regulariser)
//
// Why: with ~10 flat torch ops plus two torch.stack per (kind, shape) group, the importance update
// of 224 layers is bound by op count and extra passes, not by bytes (a flat mul_ over the whole
// state takes ~0.1 ms). Here each element is read once (p, grad, m1, m2) and written once (m1,
// m2): 24 bytes and ~10 FLOPs per element, the [sum r] triplet means reduced in the same pass.
// The penalty: per matrix one r x r Gram matrix and its Frobenius norm forward, one r x r times
// r x k product backward; 4 r^2 k FLOPs per A (r^2 d per B), no stacking copies.
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

// params/grads: A_0, B_0, E_0, A_1, ... (A [r, k], B [d, r], E [r, 1]); meta [T, 2] int64 holds
// each tensor's first element in m1/m2 and its layer's first position in the [sum r] scores.
// parts (optional, [3, sum r] fp32, zeroed): row means of A, column means of B, E, of m1 * m2.
void importance_update(at::TensorList params, const c10::List<c10::optional<at::Tensor>>& grads_in, at::Tensor m1, at::Tensor m2,
                       const at::Tensor& meta, double beta1, double beta2, const c10::optional<at::Tensor>& parts) {
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads_in.size()) == T, "params and grads differ in length");
  // Missing gradients are reported by index (the caller turns that into a message with names);
  // a non-contiguous gradient is copied once here rather than checked in Python per tensor.
  std::vector<at::Tensor> grads(T);
  for (int64_t t = 0; t < T; ++t) {
    const c10::optional<at::Tensor> g = grads_in.get(t);
    TORCH_CHECK(g.has_value() && g->defined(), "missing gradient for adapter tensor ", t);
    grads[t] = g->contiguous();
  }
  TORCH_CHECK(T % 3 == 0, "expected A, B, E per layer");
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.is_contiguous() && meta.size(0) == T && meta.size(1) == 2,
              "meta must be a contiguous int64 [T, 2] tensor");
  check_f32(m1, "m1", 0);
  check_f32(m2, "m2", 0);
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
  const int64_t* mp = meta.data_ptr<int64_t>();
  float* s1 = m1.data_ptr<float>();
  float* s2 = m2.data_ptr<float>();
  float* sc = scores ? parts->data_ptr<float>() : nullptr;
  const float b1 = static_cast<float>(beta1), c1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), c2 = static_cast<float>(1.0 - beta2);
  const int64_t state_numel = m1.numel();

  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    std::vector<double> colsum;
    for (int64_t t = tb; t < te; ++t) {
      const at::Tensor& p = params[t];
      const int64_t n = p.numel();
      const int64_t off = mp[2 * t];
      TORCH_CHECK(off >= 0 && off + n <= state_numel, "state offset out of range for tensor ", t);
      const float* pp = p.data_ptr<float>();
      const float* gp = grads[t].data_ptr<float>();
      float* a1 = s1 + off;
      float* a2 = s2 + off;
      // p, grad, m1 and m2 never alias (distinct tensors / disjoint state ranges): vectorise.
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float ipt = std::fabs(pp[i] * gp[i]);
        const float e1 = b1 * a1[i] + c1 * ipt;
        a1[i] = e1;
        a2[i] = b2 * a2[i] + c2 * std::fabs(ipt - e1);
      }
      if (!scores || n == 0) continue;
      const int kind = static_cast<int>(t % 3);
      const int64_t to = mp[2 * t + 1];
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
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < r; ++j) colsum[j] += static_cast<double>(a1[i * r + j] * a2[i * r + j]);
        for (int64_t j = 0; j < r; ++j) sc[total_r + to + j] = static_cast<float>(colsum[j] / static_cast<double>(d));
      } else {  // E [r, 1]
        for (int64_t i = 0; i < n; ++i) sc[2 * total_r + to + i] = a1[i] * a2[i];
      }
    }
  });
}

// Both kinds are handled as "rows" R [r, L]: R = A for lora_A [r, k], R = B^T for lora_B [d, r]
// (copied transposed into a small buffer, so every inner loop runs over a contiguous row).
// Then D = R R^T - I, and d||D||_F / dR = 2 D R / ||D||_F.
const float* rows_of(const at::Tensor& m, bool is_A, std::vector<float>& buf) {
  if (is_A) return m.data_ptr<float>();
  const int64_t d = m.size(0), r = m.size(1);
  buf.resize(d * r);
  const float* src = m.data_ptr<float>();
  for (int64_t q = 0; q < d; ++q)
    for (int64_t j = 0; j < r; ++j) buf[j * d + q] = src[q * r + j];
  return buf.data();
}

// The penalty has no PEFT rounding to reproduce bit for bit: let the compiler fuse multiply-adds.
__attribute__((optimize("fp-contract=fast"))) void gram_minus_eye(const float* R, int64_t r, int64_t L, float* D) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = i; j < r; ++j) {
      float acc = 0.0f;
      const float* x = R + i * L;
      const float* y = R + j * L;
#pragma omp simd reduction(+ : acc)
      for (int64_t q = 0; q < L; ++q) acc += x[q] * y[q];
      D[i * r + j] = D[j * r + i] = acc;
    }
  for (int64_t i = 0; i < r; ++i) D[i * r + i] -= 1.0f;
}

void check_mats(at::TensorList mats, int64_t n_A) {
  TORCH_CHECK(n_A >= 0 && n_A <= static_cast<int64_t>(mats.size()), "n_A out of range");
  for (size_t i = 0; i < mats.size(); ++i) {
    check_f32(mats[i], "mats", static_cast<int64_t>(i));
    TORCH_CHECK(mats[i].dim() == 2, "mats[", i, "] must be 2-D");
  }
}

// Where each matrix's r x r D_i starts in the packed D (r = rows of an A, columns of a B).
std::vector<int64_t> gram_offsets(at::TensorList mats, int64_t n_A) {
  const int64_t M = static_cast<int64_t>(mats.size());
  std::vector<int64_t> doff(M + 1, 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t r = i < n_A ? mats[i].size(0) : mats[i].size(1);
    doff[i + 1] = doff[i] + r * r;
  }
  return doff;
}

// mats: every lora_A then every lora_B. Returns (norms [M], D packed [sum r_i^2]) where
// norms[i] = ||D_i||_F and D_i the Gram matrix minus identity (kept for backward).
std::tuple<at::Tensor, at::Tensor> orth_forward(at::TensorList mats, int64_t n_A) {
  check_mats(mats, n_A);
  const int64_t M = static_cast<int64_t>(mats.size());
  const std::vector<int64_t> doff = gram_offsets(mats, n_A);
  at::Tensor norms = at::empty({M}, at::kFloat);
  at::Tensor D = at::empty({doff[M]}, at::kFloat);
  float* np = norms.data_ptr<float>();
  float* dp = D.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t b, int64_t e) {
    std::vector<float> buf;
    for (int64_t i = b; i < e; ++i) {
      const bool is_A = i < n_A;
      float* Di = dp + doff[i];
      const int64_t r = is_A ? mats[i].size(0) : mats[i].size(1);
      const int64_t L = is_A ? mats[i].size(1) : mats[i].size(0);
      gram_minus_eye(rows_of(mats[i], is_A, buf), r, L, Di);
      double acc = 0.0;
      for (int64_t q = doff[i]; q < doff[i + 1]; ++q) acc += static_cast<double>(dp[q]) * dp[q];
      np[i] = static_cast<float>(std::sqrt(acc));
    }
  });
  return {norms, D};
}

// d(sum_i coef * ||D_i||_F) / d mats: A -> 2 coef/||D|| * D A, B -> 2 coef/||D|| * B D (0 where ||D|| = 0).
__attribute__((optimize("fp-contract=fast"))) std::vector<at::Tensor> orth_backward(
    at::TensorList mats, int64_t n_A, const at::Tensor& norms, const at::Tensor& D, double coef) {
  check_mats(mats, n_A);
  const int64_t M = static_cast<int64_t>(mats.size());
  const std::vector<int64_t> doff = gram_offsets(mats, n_A);
  TORCH_CHECK(norms.numel() == M && D.numel() == doff[M], "norms/D do not match mats");
  // One uninitialised tensor per matrix (every element is written below). Small allocations come
  // from the heap; a single multi-MB buffer would be fresh mmap'd pages, page-faulted every call.
  std::vector<at::Tensor> out(M);
  for (int64_t i = 0; i < M; ++i) out[i] = at::empty_like(mats[i]);
  const float* np = norms.data_ptr<float>();
  const float* dp = D.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t b, int64_t e) {
    std::vector<float> buf, gbuf;
    for (int64_t i = b; i < e; ++i) {
      if (np[i] == 0.0f) {  // torch.norm's gradient at 0 is 0
        out[i].zero_();
        continue;
      }
      const bool is_A = i < n_A;
      const float c = static_cast<float>(2.0 * coef / np[i]);
      const int64_t r = is_A ? mats[i].size(0) : mats[i].size(1);
      const int64_t L = is_A ? mats[i].size(1) : mats[i].size(0);
      const float* R = rows_of(mats[i], is_A, buf);
      const float* Di = dp + doff[i];
      float* g = out[i].data_ptr<float>();
      float* gR = g;
      if (!is_A) {
        gbuf.resize(r * L);
        gR = gbuf.data();
      }
      for (int64_t a = 0; a < r; ++a) {  // gR_a = c * sum_j D_aj R_j (r >= 1 here: ||D|| > 0)
        float* dst = gR + a * L;
        const float w0 = c * Di[a * r];
#pragma omp simd
        for (int64_t q = 0; q < L; ++q) dst[q] = w0 * R[q];
        for (int64_t j = 1; j < r; ++j) {
          const float w = c * Di[a * r + j];
          const float* src = R + j * L;
#pragma omp simd
          for (int64_t q = 0; q < L; ++q) dst[q] += w * src[q];
        }
      }
      if (!is_A)
        for (int64_t q = 0; q < L; ++q)
          for (int64_t j = 0; j < r; ++j) g[q * r + j] = gR[j * L + q];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adalora_fast, m) {
  m.def("importance_update(Tensor[] params, Tensor?[] grads, Tensor(a!) m1, Tensor(b!) m2, Tensor meta, "
        "float beta1, float beta2, Tensor(c!)? parts) -> ()");
  m.def("orth_forward(Tensor[] mats, int n_A) -> (Tensor, Tensor)");
  m.def("orth_backward(Tensor[] mats, int n_A, Tensor norms, Tensor D, float coef) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(adalora_fast, CPU, m) {
  m.impl("importance_update", &importance_update);
  m.impl("orth_forward", &orth_forward);
  m.impl("orth_backward", &orth_backward);
}
