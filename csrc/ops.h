// Torch-facing declarations of the fused ops (CPU in csrc/cpu, CUDA in csrc/cuda).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace metareason {

// LRU/ACT forward on the compacted active set. All tensors contiguous, same float dtype
// (float32 or float64), on the CPU. Returns {out [N,d], halt_probs [N,M], num_iterations
// int64 [N], remainders [N], residuals [N,M], rows_processed int64 scalar}.
std::vector<at::Tensor> lru_act_forward_cpu(const at::Tensor& x, const at::Tensor& W, const at::Tensor& U,
                                            const at::Tensor& b, const at::Tensor& W_h, const at::Tensor& U_h,
                                            const at::Tensor& b_h, const at::Tensor& w_p, double b_p,
                                            int64_t max_iterations, double halt_threshold, bool fixed_iterations);

// MLA decode over the paged latent cache. Returns {out [B,s_q,H,dv] (q dtype), lse [B,H,s_q] fp32}.
std::vector<at::Tensor> mla_decode_cpu(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                                       const at::Tensor& cache_seqlens, int64_t head_dim_v, double softmax_scale,
                                       bool causal, int64_t num_splits);

#ifdef METAREASON_WITH_CUDA
std::vector<at::Tensor> lru_act_forward_cuda(const at::Tensor& x, const at::Tensor& W, const at::Tensor& U,
                                             const at::Tensor& b, const at::Tensor& W_h, const at::Tensor& U_h,
                                             const at::Tensor& b_h, const at::Tensor& w_p, double b_p,
                                             int64_t max_iterations, double halt_threshold, bool fixed_iterations);
std::vector<at::Tensor> mla_decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                                        const at::Tensor& cache_seqlens, int64_t head_dim_v, double softmax_scale,
                                        bool causal, int64_t num_splits);
#endif

}  // namespace metareason
