// Torch-facing side of the CUDA ops: allocation, GEMMs (cuBLAS through at::mm), active-set
// compaction, and the launches of the kernels in lru_act.cu / mla_decode.cu. Compiled only
// when torch has CUDA (setup.py adds -DMETAREASON_WITH_CUDA).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "kernels.h"

namespace metareason {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

template <typename T>
std::vector<at::Tensor> lru_cuda_impl(const at::Tensor& x, const at::Tensor& W, const at::Tensor& U,
                                      const at::Tensor& b, const at::Tensor& W_h, const at::Tensor& U_h,
                                      const at::Tensor& b_h, const at::Tensor& w_p, double b_p, int64_t M,
                                      double thr, bool fixed) {
  const int64_t N = x.size(0), d = x.size(1);
  auto opts = x.options();
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor gx = at::addmm(at::cat({b, b_h}), x, at::cat({U, U_h}, 0).t()).contiguous();
  at::Tensor Wt = W.t().contiguous(), Wht = W_h.t().contiguous();
  at::Tensor out = at::zeros({N, d}, opts);
  at::Tensor acc = fixed ? at::Tensor() : at::zeros({N, d}, opts);
  at::Tensor cum = at::zeros({N}, opts);
  at::Tensor halt_probs = at::zeros({N, M}, opts), residuals = at::zeros({N, M}, opts);
  at::Tensor remainders = at::zeros({N}, opts);
  at::Tensor num_it = at::zeros({N}, opts.dtype(at::kLong));
  at::Tensor h = x.clone();
  at::Tensor idx = at::arange(N, opts.dtype(at::kLong));
  at::Tensor z = at::empty({N, d}, opts), rh = at::empty({N, d}, opts), g = at::empty({N, 2 * d}, opts);
  at::Tensor c = at::empty({N, d}, opts);
  at::Tensor halted = at::empty({N}, opts.dtype(at::kByte));
  int64_t A = N, rows_processed = 0;
  for (int64_t n = 1; n <= M && A > 0; ++n) {
    rows_processed += A;
    at::mm_out(g.narrow(0, 0, A), h, Wt);
    cuda::LruGateParams<T> gp{g.data_ptr<T>(), gx.data_ptr<T>(), h.data_ptr<T>(), z.data_ptr<T>(),
                              rh.data_ptr<T>(), idx.data_ptr<int64_t>(), A, d};
    check_cuda(cuda::launch_lru_gate<T>(gp, stream), "lru_gate");
    at::mm_out(c.narrow(0, 0, A), rh.narrow(0, 0, A), Wht);
    cuda::LruCandParams<T> cp{};
    cp.c = c.data_ptr<T>();
    cp.gx = gx.data_ptr<T>();
    cp.h = h.data_ptr<T>();
    cp.z = z.data_ptr<T>();
    cp.w_p = w_p.data_ptr<T>();
    cp.b_p = static_cast<T>(b_p);
    cp.threshold = static_cast<T>(thr);
    cp.out = out.data_ptr<T>();
    cp.acc = fixed ? nullptr : acc.data_ptr<T>();
    cp.cum = cum.data_ptr<T>();
    cp.halt_probs = halt_probs.data_ptr<T>();
    cp.residuals = residuals.data_ptr<T>();
    cp.remainders = remainders.data_ptr<T>();
    cp.num_iterations = num_it.data_ptr<int64_t>();
    cp.halted = halted.data_ptr<uint8_t>();
    cp.idx = idx.data_ptr<int64_t>();
    cp.A = A;
    cp.d = d;
    cp.n = static_cast<int>(n);
    cp.max_iterations = static_cast<int>(M);
    cp.fixed = fixed;
    check_cuda(cuda::launch_lru_cand<T>(cp, stream), "lru_cand");
    // compaction: the next GEMM sizes live on the host, so one sync per iteration is inherent
    at::Tensor keep = at::nonzero(halted.narrow(0, 0, A) == 0).squeeze(1);
    const int64_t A_next = keep.size(0);
    if (A_next > 0 && A_next < A) {
      h = h.narrow(0, 0, A).index_select(0, keep);
      idx = idx.index_select(0, keep);
    }
    A = A_next;
  }
  return {out, halt_probs, num_it, remainders, residuals, at::scalar_tensor(rows_processed, at::kLong)};
}

}  // namespace

std::vector<at::Tensor> lru_act_forward_cuda(const at::Tensor& x, const at::Tensor& W, const at::Tensor& U,
                                             const at::Tensor& b, const at::Tensor& W_h, const at::Tensor& U_h,
                                             const at::Tensor& b_h, const at::Tensor& w_p, double b_p,
                                             int64_t max_iterations, double halt_threshold, bool fixed_iterations) {
  TORCH_CHECK_VALUE(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x: expected a contiguous CUDA [N, d] tensor");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x: expected float32/float64");
  TORCH_CHECK_VALUE(max_iterations >= 1, "max_iterations: must be >= 1");
  const int64_t d = x.size(1);
  for (const at::Tensor* t : {&W, &U, &b, &W_h, &U_h, &b_h, &w_p})
    TORCH_CHECK_VALUE(t->device() == x.device() && t->scalar_type() == x.scalar_type() && t->is_contiguous(),
                      "params: must be contiguous, on x's device, in x's dtype");
  TORCH_CHECK_VALUE(W.sizes() == at::IntArrayRef({2 * d, d}) && U.sizes() == at::IntArrayRef({2 * d, d}) &&
                        b.numel() == 2 * d && W_h.sizes() == at::IntArrayRef({d, d}) &&
                        U_h.sizes() == at::IntArrayRef({d, d}) && b_h.numel() == d && w_p.numel() == d,
                    "params: shapes do not match d = ", d);
  c10::cuda::CUDAGuard guard(x.device());
  if (x.scalar_type() == at::kFloat)
    return lru_cuda_impl<float>(x, W, U, b, W_h, U_h, b_h, w_p, b_p, max_iterations, halt_threshold, fixed_iterations);
  return lru_cuda_impl<double>(x, W, U, b, W_h, U_h, b_h, w_p, b_p, max_iterations, halt_threshold, fixed_iterations);
}

std::vector<at::Tensor> mla_decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                                        const at::Tensor& cache_seqlens, int64_t head_dim_v, double softmax_scale,
                                        bool causal, int64_t num_splits) {
  TORCH_CHECK_VALUE(q.is_cuda() && q.dim() == 4 && q.is_contiguous(), "q: expected a contiguous CUDA [B, s_q, H, D]");
  TORCH_CHECK_VALUE(kv_cache.dim() == 4 && kv_cache.size(1) == 64 && kv_cache.size(2) == 1 &&
                        kv_cache.size(3) == q.size(3) && kv_cache.scalar_type() == q.scalar_type() &&
                        kv_cache.is_contiguous() && kv_cache.device() == q.device(),
                    "kv_cache: expected contiguous [num_blocks, 64, 1, D] in q's dtype and device");
  TORCH_CHECK_VALUE(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.is_contiguous() &&
                        block_table.size(0) == q.size(0) && block_table.device() == q.device(),
                    "block_table: expected contiguous int32 [B, max_blocks] on q's device");
  TORCH_CHECK_VALUE(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.numel() == q.size(0) &&
                        cache_seqlens.device() == q.device(),
                    "cache_seqlens: expected int32 [B] on q's device");
  TORCH_CHECK_VALUE(head_dim_v >= 1 && head_dim_v <= q.size(3) && head_dim_v <= 1024, "head_dim_v: out of range");
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), sq = q.size(1), H = q.size(2), D = q.size(3), R = sq * H;
  int64_t S = num_splits;
  if (S <= 0) {  // enough CTAs to fill the SMs
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t ctas = B * ((R + 15) / 16);
    S = std::max<int64_t>(1, std::min<int64_t>((2 * sms + ctas - 1) / ctas, block_table.size(1)));
  }
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_acc = at::empty({B, S, R, head_dim_v}, f32);
  at::Tensor part_m = at::empty({B, S, R}, f32), part_l = at::empty({B, S, R}, f32);
  at::Tensor out = at::empty({B, sq, H, head_dim_v}, q.options());
  at::Tensor lse = at::empty({B, H, sq}, f32);
  cuda::MlaDecodeParams p{};
  p.q = q.data_ptr();
  p.kv_cache = kv_cache.data_ptr();
  p.block_table = block_table.data_ptr<int32_t>();
  p.seqlens = cache_seqlens.data_ptr<int32_t>();
  p.part_acc = part_acc.data_ptr<float>();
  p.part_m = part_m.data_ptr<float>();
  p.part_l = part_l.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = B;
  p.s_q = sq;
  p.H = H;
  p.D = D;
  p.dv = head_dim_v;
  p.max_blocks = block_table.size(1);
  p.num_splits = S;
  p.scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  switch (q.scalar_type()) {
    case at::kFloat: p.dtype = cuda::DType::kFloat32; break;
    case at::kBFloat16: p.dtype = cuda::DType::kBFloat16; break;
    case at::kHalf: p.dtype = cuda::DType::kFloat16; break;
    default: TORCH_CHECK_VALUE(false, "q: expected float32, bfloat16 or float16");
  }
  check_cuda(cuda::launch_mla_decode(p, at::cuda::getCurrentCUDAStream()), "mla_decode");
  return {out, lse};
}

}  // namespace metareason
