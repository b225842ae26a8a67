// Fused dropout + adapter shrink for the CPU, forward and backward, registered as torch ops
// (torch.ops.adalora_fast_cpu.dropout_shrink / dropout_shrink_backward, and dropout_keep_mask, the
// mask they draw, for tests) and called by adalora_fast/ops/adapter_linear.py.
//
// Why: on the CPU, torch's bernoulli_ costs as much per element as the base layer's matmul at
// hidden sizes of a few hundred, and regenerating the mask in backward (so that the dropped copy
// of x is never saved) would pay it twice. Here the keep mask is a counter-based hash of
// (seed, row, col), several times cheaper, regenerated in backward, never written to memory,
// and x is read once per pass.
//
// Shapes (fp32, contiguous): x [N, k], A [r, k], ge [N, r] (= (g @ B) * e), dx [N, k].
// forward : t[n, :] = A @ (x[n, :] * keep[n, :] / (1 - p))                  reads x once
// backward: dA = sum_n ge[n, :]^T (x[n, :] * keep / (1 - p))                  reads x once
//           dx[n, :] += keep[n, :] / (1 - p) * (ge[n, :] @ A)                 read+write dx once
// FLOPs: 2 N k r per pass (forward), 4 N k r (backward, both terms).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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

// Writes x[n, :] * keep / (1 - p) into buf (k floats, x in its own dtype): the forward's dropped row.
template <typename TX>
inline void dropped_row(const TX* xr, float* buf, int64_t k, uint32_t key, uint32_t thr, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) buf[j] = cell(key, j) < thr ? static_cast<float>(xr[j]) * scale : 0.0f;
}

// Columns [c0, c0 + n) of row `key`: kf[j] = keep / (1 - p) (0 or scale) and buf[j] = x[j] * kf[j]
// (buf may be null when only the factors are needed): the backward's, which uses kf twice.
template <typename TX>
inline void keep_factors(const TX* xr, float* buf, float* kf, int64_t c0, int64_t n, uint32_t key, uint32_t thr,
                         float scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float f = cell(key, c0 + j) < thr ? scale : 0.0f;
    kf[j] = f;
    if (buf) buf[j] = static_cast<float>(xr[j]) * f;
  }
}

// The arithmetic below is explicit fmaf on groups of V floats (one AVX-512 register): the
// extension is built with -ffp-contract=off (the allocator's EMA must round as torch does), and
// one accumulator chain per dot product is latency-bound (4 cycles per FMA: ~80 cycles per
// (row, q) at k = 256). Here several rows of A (forward) or of x (backward) are in flight at once,
// sharing every load; the backward goes through the columns in chunks of KC so that the rows of A,
// dA and the dropped x a chunk touches stay in L1.
constexpr int64_t V = 16;
constexpr int64_t KC = 256;
constexpr int64_t RB = 8;   // rows of x per backward block
constexpr int64_t QMAX = 64;  // ranks per backward pass (larger r: several passes)

// Sums the V lanes of s (the compiler's own reduction idiom: shuffles in registers, no stack round trip).
inline float lane_sum(const float* s) {
  float t = 0.0f;
#pragma omp simd reduction(+ : t)
  for (int64_t l = 0; l < V; ++l) t += s[l];
  return t;
}

// out[q] += buf . A[q, 0:n] for q in [q0, q0 + QB) (A rows lda apart): QB independent chains share
// each load of buf. Rows past r read a zero row (wasted lanes rather than another code path).
template <int64_t QB>
inline void dots_block(const float* buf, const float* A, int64_t lda, int64_t q0, int64_t r, int64_t n,
                       const float* zeros, float* out) {
  const float* a[QB];
  for (int64_t i = 0; i < QB; ++i) a[i] = q0 + i < r ? A + (q0 + i) * lda : zeros;
  float s[QB][V] = {};
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    for (int64_t i = 0; i < QB; ++i) {
      const float* ai = a[i] + j;
#pragma omp simd
      for (int64_t l = 0; l < V; ++l) s[i][l] = std::fma(buf[j + l], ai[l], s[i][l]);
    }
  }
  for (int64_t l = 0; j + l < n; ++l)  // tail, into the lanes
    for (int64_t i = 0; i < QB; ++i) s[i][l] = std::fma(buf[j + l], a[i][j + l], s[i][l]);
  for (int64_t i = 0; i < QB && q0 + i < r; ++i) out[q0 + i] += lane_sum(s[i]);
}

// out[q] += buf . A[q, 0:n] for every q < r, in blocks of up to 12 rows of A (12 accumulators + 1
// operand in AVX-512's 32 registers; r = 8 and r = 12, PEFT's usual init_r, are one block).
inline void dots(const float* buf, const float* A, int64_t lda, int64_t r, int64_t n, const float* zeros, float* out) {
  int64_t q = 0;
  for (; r - q > 8; q += 12) dots_block<12>(buf, A, lda, q, r, n, zeros, out);
  for (; r - q > 4; q += 8) dots_block<8>(buf, A, lda, q, r, n, zeros, out);
  for (; q < r; q += 4) dots_block<4>(buf, A, lda, q, r, n, zeros, out);
}

// dx[i, 0:W] += kf[i, 0:W] * sum_q g[i][q] * A[q, 0:W] for rows i < rows (A, kf, dx at their first
// column; row strides lda, ldk, ldx): RB independent chains per lane share each load of A.
template <int64_t W, typename TD>
inline void dx_chunk(const float* A, int64_t lda, int64_t qn, const float (*g)[QMAX], const float* kf, int64_t ldk,
                     TD* dx, int64_t ldx, int64_t rows) {
  float s[RB][W] = {};
  for (int64_t q = 0; q < qn; ++q) {
    const float* a = A + q * lda;
    for (int64_t i = 0; i < RB; ++i) {
      const float gi = g[i][q];
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) s[i][l] = std::fma(gi, a[l], s[i][l]);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    TD* d = dx + i * ldx;
    const float* f = kf + i * ldk;
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) d[l] = static_cast<TD>(std::fma(f[l], s[i][l], static_cast<float>(d[l])));
  }
}

void check(const at::Tensor& t, const char* name, int64_t dim, bool any_float = false) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || (any_float && (st == at::kBFloat16 || st == at::kHalf)), name, " must be float32",
              any_float ? ", bfloat16 or float16" : "", ", got ", st);
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Calls f(TX{}) with x's element type: float, BFloat16 or Half (the base layer's dtype: read as is,
// no N x k fp32 copy of x; the arithmetic is fp32).
template <typename F>
void with_x_type(at::ScalarType st, F&& f) {
  if (st == at::kBFloat16) {
    f(c10::BFloat16{});
  } else if (st == at::kHalf) {
    f(c10::Half{});
  } else {
    f(float{});
  }
}

template <typename TX>
void shrink_impl(const TX* xp, const at::Tensor& A, int64_t seed, double p, int64_t N, int64_t k, int64_t r,
                 at::Tensor& t) {
  const float* ap = A.data_ptr<float>();
  float* tp = t.data_ptr<float>();
  const uint32_t thr = keep_threshold(p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  // Several rows of A in flight per pass pay off while one block of them (12 rows) fits in L1 beside
  // the row of x; once a block outgrows L1 (48 KB at k = 1024) one dot product at a time, whose rows
  // of A and x stay in L1, is faster.
  const bool blocked = std::min<int64_t>(r, 12) * k < 12288;
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    std::vector<float> buf(k), zeros(blocked ? k : 0, 0.0f);
    for (int64_t row = b; row < e; ++row) {
      dropped_row(xp + row * k, buf.data(), k, row_key(seed, row), thr, scale);
      if (blocked) {
        dots(buf.data(), ap, k, r, k, zeros.data(), tp + row * r);
        continue;
      }
      for (int64_t q = 0; q < r; ++q) {
        const float* arow = ap + q * k;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < k; ++j) acc += buf[j] * arow[j];
        tp[row * r + q] = acc;
      }
    }
  });
}

// x [N, k] (float, bfloat16 or float16), A [r, k] float -> t [N, r] float.
at::Tensor dropout_shrink(const at::Tensor& x, const at::Tensor& A, int64_t seed, double p) {
  check(x, "x", 2, true);
  check(A, "A", 2);
  TORCH_CHECK(x.size(1) == A.size(1), "x is [N, ", x.size(1), "] but A is [", A.size(0), ", ", A.size(1), "]");
  TORCH_CHECK(p > 0.0 && p < 1.0, "p must lie in (0, 1), got ", p);
  const int64_t N = x.size(0), k = x.size(1), r = A.size(0);
  at::Tensor t = at::zeros({N, r}, A.options());
  with_x_type(x.scalar_type(), [&](auto tag) { shrink_impl(x.data_ptr<decltype(tag)>(), A, seed, p, N, k, r, t); });
  return t;
}


// Rows go in blocks of RB: each dA row chunk is read and written once per block (not once per row
// of x), each A row chunk loaded once for the block's dx rows; the keep factors are hashed once.
template <typename TX, typename TD>
at::Tensor shrink_backward_impl(const TX* xp, const at::Tensor& A, const at::Tensor& ge, TD* dxp, int64_t seed,
                                double p, bool need_dA, int64_t N, int64_t k, int64_t r) {
  const bool has_dx = dxp != nullptr;
  const float* ap = A.data_ptr<float>();
  const float* gp = ge.data_ptr<float>();
  const uint32_t thr = keep_threshold(p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  // One partial dA per chunk of rows; chunks are few (four per thread), summed at the end.
  const int64_t grain = 32;
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, (N + grain - 1) / grain));
  const int64_t rows_per_chunk = (N + n_chunks - 1) / n_chunks;
  at::Tensor partial = need_dA ? at::zeros({n_chunks, r, k}, A.options()) : at::Tensor();
  float* pp = need_dA ? partial.data_ptr<float>() : nullptr;
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> buf(RB * KC, 0.0f), kf(RB * KC);
    float g[RB][QMAX];
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t n0 = c * rows_per_chunk, n1 = std::min(N, n0 + rows_per_chunk);
      float* acc = need_dA ? pp + c * r * k : nullptr;
      for (int64_t nb = n0; nb < n1; nb += RB) {
        const int64_t rows = std::min<int64_t>(RB, n1 - nb);
        for (int64_t c0 = 0; c0 < k; c0 += KC) {
          const int64_t n = std::min(KC, k - c0);
          for (int64_t i = 0; i < rows; ++i)
            keep_factors(xp + (nb + i) * k + c0, need_dA ? buf.data() + i * KC : nullptr, kf.data() + i * KC, c0, n,
                         row_key(seed, nb + i), thr, scale);
          if (rows < RB) std::fill(buf.begin() + rows * KC, buf.end(), 0.0f);  // a short block: no stale rows
          for (int64_t q0 = 0; q0 < r; q0 += QMAX) {
            const int64_t qn = std::min(QMAX, r - q0);
            for (int64_t i = 0; i < RB; ++i)
              for (int64_t q = 0; q < qn; ++q) g[i][q] = i < rows ? gp[(nb + i) * r + q0 + q] : 0.0f;
            if (need_dA) {  // dA[q, c0:c0+n] += sum_i g[i][q] * buf[i, 0:n]
              for (int64_t q = 0; q < qn; ++q) {
                float* arow = acc + (q0 + q) * k + c0;
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) {
                  float v = arow[j];
                  for (int64_t i = 0; i < RB; ++i) v = std::fma(g[i][q], buf[i * KC + j], v);
                  arow[j] = v;
                }
              }
            }
            if (has_dx) {  // dx[i, c0:c0+n] += kf[i, 0:n] * sum_q g[i][q] * A[q, c0:c0+n]
              const float* a = ap + q0 * k + c0;
              TD* d = dxp + nb * k + c0;
              int64_t j = 0;
              for (; j + V <= n; j += V) dx_chunk<V>(a + j, k, qn, g, kf.data() + j, KC, d + j, k, rows);
              for (; j < n; ++j) dx_chunk<1>(a + j, k, qn, g, kf.data() + j, KC, d + j, k, rows);
            }
          }
        }
      }
    }
  });
  return need_dA ? partial.sum(0) : at::empty({0}, A.options());
}

// x [N, k] (float, bfloat16 or float16), A [r, k] and ge [N, r] float; dx [N, k] of x's dtype or
// float, or none. Returns dA [r, k] float (an empty tensor if !need_dA); adds the adapter term
// into dx in place (fp32 arithmetic, one rounding to dx's dtype).
at::Tensor dropout_shrink_backward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& ge,
                                   const c10::optional<at::Tensor>& dx_opt, int64_t seed, double p, bool need_dA) {
  check(x, "x", 2, true);
  check(A, "A", 2);
  check(ge, "ge", 2);
  const int64_t N = x.size(0), k = x.size(1), r = A.size(0);
  TORCH_CHECK(ge.size(0) == N && ge.size(1) == r, "ge must be [", N, ", ", r, "]");
  TORCH_CHECK(A.size(1) == k, "x is [N, ", k, "] but A is [", r, ", ", A.size(1), "]");
  const bool has_dx = dx_opt.has_value() && dx_opt->defined();
  if (has_dx) {
    check(*dx_opt, "dx", 2, true);
    TORCH_CHECK(dx_opt->size(0) == N && dx_opt->size(1) == k, "dx must be [", N, ", ", k, "]");
    TORCH_CHECK(dx_opt->scalar_type() == at::kFloat || dx_opt->scalar_type() == x.scalar_type(),
                "dx must be float32 or x's dtype (", x.scalar_type(), "), got ", dx_opt->scalar_type());
  }
  at::Tensor dA;
  with_x_type(x.scalar_type(), [&](auto tag) {
    using TX = decltype(tag);
    const TX* xp = x.data_ptr<TX>();
    if (has_dx && dx_opt->scalar_type() == x.scalar_type()) {
      dA = shrink_backward_impl<TX, TX>(xp, A, ge, dx_opt->data_ptr<TX>(), seed, p, need_dA, N, k, r);
    } else {
      float* dxp = has_dx ? dx_opt->data_ptr<float>() : nullptr;
      dA = shrink_backward_impl<TX, float>(xp, A, ge, dxp, seed, p, need_dA, N, k, r);
    }
  });
  return dA;
}

at::Tensor dropout_keep_mask(int64_t N, int64_t k, int64_t seed, double p) {
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
  m.impl("dropout_keep_mask", &dropout_keep_mask);
}
