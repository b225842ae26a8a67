// Fused dropout + adapter shrink for the CPU, forward and backward, registered as torch ops
// (torch.ops.adalora_fast_cpu.dropout_shrink / dropout_shrink_backward).
//
// Why: on the CPU, torch's bernoulli_ costs ~6-7 ns per element (as much as the base layer's
// matmul per element at hidden sizes of a few hundred), and regenerating the mask in backward
// (so that the dropped copy of x is never saved) would pay it twice. Here the keep mask is a
// counter-based hash of (seed, row, col): ~1 ns per element, regenerated for free in backward,
// never written to memory, and x is read once per pass.
//
// Shapes (fp32, contiguous): x [N, k], A [r, k], ge [N, r] (= (g @ B) * e), dx [N, k].
// forward : t[n, :] = A @ (x[n, :] * keep[n, :] / (1 - p))                  reads x once
// backward: dA = sum_n ge[n, :]^T (x[n, :] * keep / (1 - p))                  reads x once
//           dx[n, :] += keep[n, :] / (1 - p) * (ge[n, :] @ A)                 read+write dx once
// FLOPs: 2 N k r per pass (forward), 4 N k r (backward, both terms).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

// 32-bit integer hash (Wellons' "lowbias32"): cheap, vectorises (two 32-bit multiplies).
inline uint32_t hash32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7feb352dU;
  v ^= v >> 15;
  v *= 0x846ca68bU;
  v ^= v >> 16;
  return v;
}

inline uint32_t row_key(uint64_t seed, int64_t row) {
  // Mix the 64-bit seed and the row index so that rows (and seeds) get unrelated streams.
  uint32_t s = hash32(static_cast<uint32_t>(seed) ^ hash32(static_cast<uint32_t>(seed >> 32) + 0x9e3779b9U));
  return hash32(s ^ hash32(static_cast<uint32_t>(row) * 0x85ebca6bU + static_cast<uint32_t>(row >> 32)));
}

// The hash of one cell: the column is spread by a multiply and xor-ed in, so two rows' streams
// coincide in isolated cells at most, never as shifted copies of each other.
inline uint32_t cell(uint32_t key, int64_t j) { return hash32(key ^ (static_cast<uint32_t>(j) * 0x9e3779b1U)); }

inline uint32_t keep_threshold(double p) {
  // keep iff hash < threshold, P(keep) = threshold / 2^32 = 1 - p (to 2^-32).
  double t = (1.0 - p) * 4294967296.0;
  return t >= 4294967295.0 ? 0xffffffffU : static_cast<uint32_t>(t);
}

// Writes x[n, :] * keep / (1 - p) into buf (k floats).
inline void dropped_row(const float* xr, float* buf, int64_t k, uint32_t key, uint32_t thr, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) {
    uint32_t h = cell(key, j);
    buf[j] = h < thr ? xr[j] * scale : 0.0f;
  }
}

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

at::Tensor dropout_shrink(const at::Tensor& x, const at::Tensor& A, int64_t seed, double p) {
  check(x, "x", 2);
  check(A, "A", 2);
  TORCH_CHECK(x.size(1) == A.size(1), "x is [N, ", x.size(1), "] but A is [", A.size(0), ", ", A.size(1), "]");
  TORCH_CHECK(p > 0.0 && p < 1.0, "p must lie in (0, 1), got ", p);
  const int64_t N = x.size(0), k = x.size(1), r = A.size(0);
  at::Tensor t = at::empty({N, r}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* ap = A.data_ptr<float>();
  float* tp = t.data_ptr<float>();
  const uint32_t thr = keep_threshold(p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    std::vector<float> buf(k);
    for (int64_t n = b; n < e; ++n) {
      dropped_row(xp + n * k, buf.data(), k, row_key(seed, n), thr, scale);
      for (int64_t q = 0; q < r; ++q) {
        const float* arow = ap + q * k;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < k; ++j) acc += buf[j] * arow[j];
        tp[n * r + q] = acc;
      }
    }
  });
  return t;
}

// Returns dA [r, k] (or an empty tensor if !need_dA); adds the adapter term into dx in place if defined.
at::Tensor dropout_shrink_backward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& ge,
                                   const c10::optional<at::Tensor>& dx_opt, int64_t seed, double p, bool need_dA) {
  check(x, "x", 2);
  check(A, "A", 2);
  check(ge, "ge", 2);
  const int64_t N = x.size(0), k = x.size(1), r = A.size(0);
  TORCH_CHECK(ge.size(0) == N && ge.size(1) == r, "ge must be [", N, ", ", r, "]");
  const bool has_dx = dx_opt.has_value() && dx_opt->defined();
  if (has_dx) {
    check(*dx_opt, "dx", 2);
    TORCH_CHECK(dx_opt->size(0) == N && dx_opt->size(1) == k, "dx must be [", N, ", ", k, "]");
  }
  const float* xp = x.data_ptr<float>();
  const float* ap = A.data_ptr<float>();
  const float* gp = ge.data_ptr<float>();
  float* dxp = has_dx ? dx_opt->data_ptr<float>() : nullptr;
  const uint32_t thr = keep_threshold(p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  // One partial dA per chunk; chunks are few (one per thread and grain), summed at the end.
  const int64_t grain = 32;
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, (N + grain - 1) / grain));
  const int64_t rows_per_chunk = (N + n_chunks - 1) / n_chunks;
  at::Tensor partial = need_dA ? at::zeros({n_chunks, r, k}, x.options()) : at::Tensor();
  float* pp = need_dA ? partial.data_ptr<float>() : nullptr;
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> buf(k), tmp(k);
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t n0 = c * rows_per_chunk, n1 = std::min(N, n0 + rows_per_chunk);
      float* acc = need_dA ? pp + c * r * k : nullptr;
      for (int64_t n = n0; n < n1; ++n) {
        const uint32_t key = row_key(seed, n);
        const float* g = gp + n * r;
        if (need_dA) {
          dropped_row(xp + n * k, buf.data(), k, key, thr, scale);
          for (int64_t q = 0; q < r; ++q) {
            const float gq = g[q];
            float* arow = acc + q * k;
#pragma omp simd
            for (int64_t j = 0; j < k; ++j) arow[j] += gq * buf[j];
          }
        }
        if (has_dx) {
          std::fill(tmp.begin(), tmp.end(), 0.0f);
          for (int64_t q = 0; q < r; ++q) {
            const float gq = g[q];
            const float* arow = ap + q * k;
#pragma omp simd
            for (int64_t j = 0; j < k; ++j) tmp[j] += gq * arow[j];
          }
          float* dxr = dxp + n * k;
#pragma omp simd
          for (int64_t j = 0; j < k; ++j) {
            uint32_t h = cell(key, j);
            dxr[j] += h < thr ? tmp[j] * scale : 0.0f;
          }
        }
      }
    }
  });
  return need_dA ? partial.sum(0) : at::empty({0}, x.options());
}

at::Tensor keep_mask(int64_t N, int64_t k, int64_t seed, double p) {
  at::Tensor m = at::empty({N, k}, at::TensorOptions().dtype(at::kBool));
  bool* mp = m.data_ptr<bool>();
  const uint32_t thr = keep_threshold(p);
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint32_t key = row_key(seed, n);
      for (int64_t j = 0; j < k; ++j) mp[n * k + j] = cell(key, j) < thr;
    }
  });
  return m;
}

}  // namespace

TORCH_LIBRARY(adalora_fast_cpu, m) {
  m.def("dropout_shrink(Tensor x, Tensor A, int seed, float p) -> Tensor");
  m.def("dropout_shrink_backward(Tensor x, Tensor A, Tensor ge, Tensor(a!)? dx, int seed, float p, bool need_dA) -> Tensor");
  m.def("dropout_keep_mask(int N, int k, int seed, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(adalora_fast_cpu, CPU, m) {
  m.impl("dropout_shrink", &dropout_shrink);
  m.impl("dropout_shrink_backward", &dropout_shrink_backward);
}

TORCH_LIBRARY_IMPL(adalora_fast_cpu, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep_mask", &keep_mask);
}
