// LRU/ACT recurrence on the CPU with active-set compaction.
//
// Per iteration only the rows of tokens that are still running take part: the two GEMMs
// (h·Wᵀ for the z/r gates, (r⊙h)·W_hᵀ for the candidate) run on a compacted [A, d] buffer,
// and everything elementwise between and after them is fused into two row passes
// (gate_row, cand_row). Halted tokens are dropped from the buffer, so total work follows the
// mean ponder Σ n_t, not N · max_iterations.
//
// Inputs are compute-dtype (float32 or float64) and contiguous; the Python front casts.
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>

#include "../ops.h"
#include "vec_math.h"

namespace metareason {
namespace {

// z = σ(g_z + gx_z), rh = σ(g_r + gx_r) ⊙ h     (g = h·Wᵀ, gx = x·Uᵀ + b, both [2d])
template <typename T>
inline void gate_row(const T* __restrict g, const T* __restrict gx, const T* __restrict h, T* __restrict z,
                     T* __restrict rh, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    z[j] = mr_sigmoid(g[j] + gx[j]);
    rh[j] = mr_sigmoid(g[d + j] + gx[d + j]) * h[j];
  }
}

// h ← h + z ⊙ (tanh(c + gxh) − h); returns w_p·h_new and ||h_new − h_old||² through out-params.
// Reductions go through L independent lanes so the loop vectorises without -ffast-math.
template <typename T>
inline void cand_row(const T* __restrict c, const T* __restrict gxh, T* __restrict h, const T* __restrict z,
                     const T* __restrict wp, int64_t d, T* dot_out, T* diff2_out) {
  constexpr int L = 16;
  T dot[L] = {}, df[L] = {};
  int64_t j = 0;
  for (; j + L <= d; j += L) {
    for (int l = 0; l < L; ++l) {
      const T ho = h[j + l];
      const T dl = z[j + l] * (mr_tanh(c[j + l] + gxh[j + l]) - ho);
      const T hn = ho + dl;
      h[j + l] = hn;
      dot[l] += wp[j + l] * hn;
      df[l] += dl * dl;
    }
  }
  T sd = 0, s2 = 0;
  for (; j < d; ++j) {
    const T ho = h[j];
    const T dl = z[j] * (mr_tanh(c[j] + gxh[j]) - ho);
    const T hn = ho + dl;
    h[j] = hn;
    sd += wp[j] * hn;
    s2 += dl * dl;
  }
  for (int l = 0; l < L; ++l) {
    sd += dot[l];
    s2 += df[l];
  }
  *dot_out = sd;
  *diff2_out = s2;
}

template <typename T>
inline void axpy_row(T* __restrict y, T a, const T* __restrict x, int64_t d) {
  for (int64_t j = 0; j < d; ++j) y[j] += a * x[j];
}
template <typename T>
inline void final_row(T* __restrict out, const T* __restrict acc, T a, const T* __restrict x, int64_t d) {
  for (int64_t j = 0; j < d; ++j) out[j] = acc[j] + a * x[j];
}

// float versions compiled for AVX-512 / AVX2 / baseline, picked at load time.
MR_CLONES void gate_row_f32(const float* g, const float* gx, const float* h, float* z, float* rh, int64_t d) {
  gate_row<float>(g, gx, h, z, rh, d);
}
MR_CLONES void cand_row_f32(const float* c, const float* gxh, float* h, const float* z, const float* wp, int64_t d,
                            float* dot, float* diff2) {
  cand_row<float>(c, gxh, h, z, wp, d, dot, diff2);
}
MR_CLONES void axpy_row_f32(float* y, float a, const float* x, int64_t d) { axpy_row<float>(y, a, x, d); }
MR_CLONES void final_row_f32(float* out, const float* acc, float a, const float* x, int64_t d) {
  final_row<float>(out, acc, a, x, d);
}

template <typename T>
struct Rows {
  static void gate(const T* g, const T* gx, const T* h, T* z, T* rh, int64_t d) { gate_row<T>(g, gx, h, z, rh, d); }
  static void cand(const T* c, const T* gxh, T* h, const T* z, const T* wp, int64_t d, T* dot, T* diff2) {
    cand_row<T>(c, gxh, h, z, wp, d, dot, diff2);
  }
  static void axpy(T* y, T a, const T* x, int64_t d) { axpy_row<T>(y, a, x, d); }
  static void fin(T* out, const T* acc, T a, const T* x, int64_t d) { final_row<T>(out, acc, a, x, d); }
};
template <>
struct Rows<float> {
  static void gate(const float* g, const float* gx, const float* h, float* z, float* rh, int64_t d) {
    gate_row_f32(g, gx, h, z, rh, d);
  }
  static void cand(const float* c, const float* gxh, float* h, const float* z, const float* wp, int64_t d, float* dot,
                   float* diff2) {
    cand_row_f32(c, gxh, h, z, wp, d, dot, diff2);
  }
  static void axpy(float* y, float a, const float* x, int64_t d) { axpy_row_f32(y, a, x, d); }
  static void fin(float* out, const float* acc, float a, const float* x, int64_t d) { final_row_f32(out, acc, a, x, d); }
};

constexpr int64_t kRowGrain = 8;

template <typename T>
std::vector<at::Tensor> lru_forward_impl(const at::Tensor& x, const at::Tensor& W, const at::Tensor& U,
                                         const at::Tensor& b, const at::Tensor& W_h, const at::Tensor& U_h,
                                         const at::Tensor& b_h, const at::Tensor& w_p, double b_p_d, int64_t M,
                                         double thr_d, bool fixed) {
  const int64_t N = x.size(0), d = x.size(1);
  const T b_p = static_cast<T>(b_p_d), thr = static_cast<T>(thr_d);
  auto opts = x.options();

  // x-dependent parts of all three pre-activations, once: gx = x·[U; U_h]ᵀ + [b; b_h]  -> [N, 3d]
  at::Tensor gx = at::addmm(at::cat({b, b_h}), x, at::cat({U, U_h}, 0).t());
  at::Tensor Wt = W.t().contiguous();    // [d, 2d]
  at::Tensor Wht = W_h.t().contiguous(); // [d, d]

  at::Tensor out = at::zeros({N, d}, opts);
  at::Tensor acc = fixed ? at::Tensor() : at::zeros({N, d}, opts);
  at::Tensor halt_probs = at::zeros({N, M}, opts);
  at::Tensor residuals = at::zeros({N, M}, opts);
  at::Tensor remainders = at::zeros({N}, opts);
  at::Tensor num_it = at::zeros({N}, x.options().dtype(at::kLong));
  std::vector<T> cum(N, T(0));

  // compacted active-set buffers; row i of h/z/rh/g/c belongs to token idx[i]
  at::Tensor h = x.clone(), h_next = at::empty({N, d}, opts);
  at::Tensor z = at::empty({N, d}, opts), rh = at::empty({N, d}, opts);
  at::Tensor g = at::empty({N, 2 * d}, opts), c = at::empty({N, d}, opts);
  std::vector<int64_t> idx(N), idx_next(N), dst(N);
  std::iota(idx.begin(), idx.end(), int64_t(0));
  std::vector<uint8_t> halted(N);
  int64_t A = N, rows_processed = 0;

  const T* gxp = gx.data_ptr<T>();
  const T* wpp = w_p.data_ptr<T>();
  T* outp = out.data_ptr<T>();
  T* accp = fixed ? nullptr : acc.data_ptr<T>();
  T* hpp = halt_probs.data_ptr<T>();
  T* resp = residuals.data_ptr<T>();
  T* remp = remainders.data_ptr<T>();
  int64_t* nitp = num_it.data_ptr<int64_t>();

  for (int64_t n = 1; n <= M && A > 0; ++n) {
    rows_processed += A;
    at::Tensor ha = h.narrow(0, 0, A);
    at::Tensor ga = g.narrow(0, 0, A);
    at::mm_out(ga, ha, Wt);  // GEMM 1 on the active rows
    {
      T *hp = h.data_ptr<T>(), *zp = z.data_ptr<T>(), *rhp = rh.data_ptr<T>();
      const T* gp = g.data_ptr<T>();
      at::parallel_for(0, A, kRowGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          Rows<T>::gate(gp + i * 2 * d, gxp + idx[i] * 3 * d, hp + i * d, zp + i * d, rhp + i * d, d);
      });
    }
    at::Tensor ca = c.narrow(0, 0, A);
    at::mm_out(ca, rh.narrow(0, 0, A), Wht);  // GEMM 2 on the active rows
    {
      T *hp = h.data_ptr<T>();
      const T *zp = z.data_ptr<T>(), *cp = c.data_ptr<T>();
      at::parallel_for(0, A, kRowGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t t = idx[i];
          T* hrow = hp + i * d;
          T dot, diff2;
          Rows<T>::cand(cp + i * d, gxp + t * 3 * d + 2 * d, hrow, zp + i * d, wpp, d, &dot, &diff2);
          const T p = mr_sigmoid(dot + b_p);
          hpp[t * M + n - 1] = p;
          resp[t * M + n - 1] = std::sqrt(diff2);
          bool stop;
          if (fixed) {
            stop = (n == M);
            if (stop) std::copy(hrow, hrow + d, outp + t * d);
          } else {
            const T new_cum = cum[t] + p;
            stop = (new_cum >= thr) || (n == M);
            if (stop) {
              const T R = T(1) - cum[t];
              Rows<T>::fin(outp + t * d, accp + t * d, R, hrow, d);
              remp[t] = R;
            } else {
              Rows<T>::axpy(accp + t * d, p, hrow, d);
            }
            cum[t] = new_cum;
          }
          if (stop) nitp[t] = n;
          halted[i] = stop ? 1 : 0;
        }
      });
    }
    // compaction: positions by a (cheap, sequential) prefix scan, row copies in parallel
    int64_t A_next = 0;
    for (int64_t i = 0; i < A; ++i) {
      dst[i] = halted[i] ? -1 : A_next;
      if (!halted[i]) idx_next[A_next++] = idx[i];
    }
    if (A_next > 0 && A_next < A) {
      const T* src = h.data_ptr<T>();
      T* dstp = h_next.data_ptr<T>();
      at::parallel_for(0, A, 64, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          if (dst[i] >= 0) std::copy(src + i * d, src + (i + 1) * d, dstp + dst[i] * d);
      });
      std::swap(h, h_next);
    }
    std::swap(idx, idx_next);
    A = A_next;
  }
  return {out, halt_probs, num_it, remainders, residuals, at::scalar_tensor(rows_processed, at::kLong)};
}

}  // namespace

std::vector<at::Tensor> lru_act_forward_cpu(const at::Tensor& x, const at::Tensor& W, const at::Tensor& U,
                                            const at::Tensor& b, const at::Tensor& W_h, const at::Tensor& U_h,
                                            const at::Tensor& b_h, const at::Tensor& w_p, double b_p,
                                            int64_t max_iterations, double halt_threshold, bool fixed_iterations) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected [N, d], got ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: expected a CPU tensor");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "x: expected float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(max_iterations >= 1, "max_iterations: must be >= 1");
  const int64_t d = x.size(1);
  struct Spec {
    const at::Tensor* t;
    const char* name;
    std::vector<int64_t> shape;
  };
  const Spec specs[] = {{&W, "W", {2 * d, d}}, {&U, "U", {2 * d, d}}, {&b, "b", {2 * d}}, {&W_h, "W_h", {d, d}},
                        {&U_h, "U_h", {d, d}}, {&b_h, "b_h", {d}},       {&w_p, "w_p", {d}}};
  TORCH_CHECK_VALUE(x.is_contiguous(), "x: must be contiguous");
  for (const auto& s : specs) {
    TORCH_CHECK_VALUE(s.t->sizes().vec() == s.shape, s.name, ": expected shape ", s.shape, ", got ", s.t->sizes());
    TORCH_CHECK_VALUE(s.t->scalar_type() == x.scalar_type(), s.name, ": dtype must match x");
    TORCH_CHECK_VALUE(s.t->device() == x.device(), s.name, ": device must match x");
    TORCH_CHECK_VALUE(s.t->is_contiguous(), s.name, ": must be contiguous");
  }
  if (x.scalar_type() == at::kFloat)
    return lru_forward_impl<float>(x, W, U, b, W_h, U_h, b_h, w_p, b_p, max_iterations, halt_threshold,
                                   fixed_iterations);
  return lru_forward_impl<double>(x, W, U, b, W_h, U_h, b_h, w_p, b_p, max_iterations, halt_threshold,
                                  fixed_iterations);
}

}  // namespace metareason
