// CUDA kernels of metareason: plain pointers and params structs only, no torch headers, so
// nvcc compiles these files in seconds on a machine without a GPU (`make cuda-check`).
// The torch-facing side (allocation, cuBLAS GEMMs through at::mm, compaction) is ops_cuda.cpp.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace metareason {
namespace cuda {

// ---- lru_act: the two fused epilogues around the per-iteration GEMMs (row i <-> token idx[i])
template <typename T>
struct LruGateParams {
  const T* g;        // [A, 2d]  h·Wᵀ on the active rows
  const T* gx;       // [N, 3d]  x·[U; U_h]ᵀ + [b; b_h]
  const T* h;        // [A, d]
  T* z;              // [A, d]   out: update gate
  T* rh;             // [A, d]   out: r ⊙ h
  const int64_t* idx;
  int64_t A, d;
};

template <typename T>
struct LruCandParams {
  const T* c;        // [A, d]   (r⊙h)·W_hᵀ
  const T* gx;       // [N, 3d]
  T* h;              // [A, d]   in: h_{n-1}, out: h_n
  const T* z;        // [A, d]
  const T* w_p;      // [d]
  T b_p, threshold;
  T* out;            // [N, d]
  T* acc;            // [N, d]   Σ p_i h_i of running tokens (unused when fixed)
  T* cum;            // [N]      Σ p_i
  T* halt_probs;     // [N, M]
  T* residuals;      // [N, M]
  T* remainders;     // [N]
  int64_t* num_iterations;  // [N]
  uint8_t* halted;   // [A]      out: 1 if the row stops at this iteration
  const int64_t* idx;
  int64_t A, d;
  int n, max_iterations;
  bool fixed;
};

template <typename T>
cudaError_t launch_lru_gate(const LruGateParams<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_lru_cand(const LruCandParams<T>& p, cudaStream_t stream);

// ---- mla_decode: split-KV flash decoding over the paged latent cache
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct MlaDecodeParams {
  const void* q;            // [B, s_q, H, D]
  const void* kv_cache;     // [num_blocks, 64, 1, D]
  const int32_t* block_table;  // [B, max_blocks]
  const int32_t* seqlens;   // [B]
  float* part_acc;          // [B, S, s_q*H, dv] (workspace)
  float* part_m;            // [B, S, s_q*H]
  float* part_l;            // [B, S, s_q*H]
  void* out;                // [B, s_q, H, dv] (q's dtype)
  float* lse;               // [B, H, s_q]
  int B, s_q, H, D, dv, max_blocks, num_splits;
  float scale;
  bool causal;
  DType dtype;
};

// Returns cudaErrorInvalidValue for shapes the kernel does not support (dv > 1024).
cudaError_t launch_mla_decode(const MlaDecodeParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace metareason
