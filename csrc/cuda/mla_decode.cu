// MLA decode on the GPU: split-KV flash decoding over the paged latent cache.
//
// Grid (B, num_splits, ceil(s_q·H / kRows)). A CTA stages kRows query rows and, tile by tile,
// kKeys cache rows (gathered through the block table) in shared memory as fp32, computes the
// scores, runs the online softmax, and accumulates P·V in registers (each thread owns up to
// kMaxCols value columns for all kRows rows). Splits are merged through their log-sum-exp by
// mla_combine_kernel. Written for correctness and clarity first; the layout (one cache read
// per CTA for all heads) is the memory-bound part that matters at decode.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "kernels.h"

namespace metareason {
namespace cuda {
namespace {

constexpr int kPage = 64;
constexpr int kRows = 16;
constexpr int kKeys = 32;
constexpr int kThreads = 256;
constexpr int kMaxCols = 4;  // dv <= kThreads * kMaxCols = 1024

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

template <typename in_t>
__global__ void __launch_bounds__(kThreads) mla_split_kernel(MlaDecodeParams p) {
  extern __shared__ float smem[];
  const int D = p.D, ld = p.D + 1;  // +1: rows of a tile fall into different banks
  float* qs = smem;                  // [kRows, ld]
  float* ks = qs + kRows * ld;       // [kKeys, ld]
  float* ps = ks + kKeys * ld;       // [kRows, kKeys]
  __shared__ float m_s[kRows], l_s[kRows], alpha_s[kRows];

  const int b = blockIdx.x, s = blockIdx.y;
  const int R = p.s_q * p.H;
  const int r0 = blockIdx.z * kRows;
  const int rows = min(kRows, R - r0);
  const int L = p.seqlens[b];
  const int nblk = (L + kPage - 1) / kPage;
  const int per = (nblk + p.num_splits - 1) / p.num_splits;
  const int k_begin = s * per * kPage;
  const int k_end = min(L, (s + 1) * per * kPage);
  const in_t* q = static_cast<const in_t*>(p.q);
  const in_t* kv = static_cast<const in_t*>(p.kv_cache);

  for (int e = threadIdx.x; e < kRows * D; e += kThreads) {
    const int r = e / D, j = e % D;
    qs[r * ld + j] = r < rows ? to_f(q[((int64_t)b * R + r0 + r) * D + j]) : 0.0f;
  }
  if (threadIdx.x < kRows) {
    m_s[threadIdx.x] = -FLT_MAX;
    l_s[threadIdx.x] = 0.0f;
  }
  float acc[kMaxCols][kRows];
#pragma unroll
  for (int c = 0; c < kMaxCols; ++c)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[c][r] = 0.0f;
  __syncthreads();

  for (int k0 = k_begin; k0 < k_end; k0 += kKeys) {
    const int nk = min(kKeys, k_end - k0);
    for (int e = threadIdx.x; e < nk * D; e += kThreads) {
      const int k = e / D, j = e % D;
      const int pos = k0 + k;
      const int64_t phys = p.block_table[(int64_t)b * p.max_blocks + pos / kPage];
      ks[k * ld + j] = to_f(kv[(phys * kPage + pos % kPage) * D + j]);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kRows * kKeys; e += kThreads) {
      const int r = e / kKeys, k = e % kKeys;
      float sc = -INFINITY;
      const int visible = p.causal ? L - p.s_q + (r0 + r) / p.H + 1 : L;
      if (r < rows && k < nk && k0 + k < visible) {
        float dot = 0.0f;
        for (int j = 0; j < D; ++j) dot += qs[r * ld + j] * ks[k * ld + j];
        sc = dot * p.scale;
      }
      ps[e] = sc;
    }
    __syncthreads();
    if (threadIdx.x < kRows) {
      const int r = threadIdx.x;
      float mx = -INFINITY;
      for (int k = 0; k < nk; ++k) mx = fmaxf(mx, ps[r * kKeys + k]);
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      float alpha = 1.0f, sum = 0.0f;
      if (mx != -INFINITY) {
        alpha = __expf(m_old - m_new);  // m_old = -FLT_MAX at start -> 0
        for (int k = 0; k < kKeys; ++k) {
          const float e = (k < nk && ps[r * kKeys + k] != -INFINITY) ? __expf(ps[r * kKeys + k] - m_new) : 0.0f;
          ps[r * kKeys + k] = e;
          sum += e;
        }
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + sum;
      } else {
        for (int k = 0; k < kKeys; ++k) ps[r * kKeys + k] = 0.0f;
      }
      alpha_s[r] = alpha;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kMaxCols; ++c) {
      const int col = threadIdx.x + c * kThreads;
      if (col < p.dv) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float a = acc[c][r] * alpha_s[r];
          for (int k = 0; k < nk; ++k) a += ps[r * kKeys + k] * ks[k * ld + col];
          acc[c][r] = a;
        }
      }
    }
    __syncthreads();
  }

  const int64_t base = ((int64_t)b * p.num_splits + s) * R + r0;
#pragma unroll
  for (int c = 0; c < kMaxCols; ++c) {
    const int col = threadIdx.x + c * kThreads;
    if (col < p.dv)
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rows) p.part_acc[(base + r) * p.dv + col] = acc[c][r];
  }
  if (threadIdx.x < rows) {
    const bool any = l_s[threadIdx.x] > 0.0f;
    p.part_m[base + threadIdx.x] = any ? m_s[threadIdx.x] : -INFINITY;
    p.part_l[base + threadIdx.x] = l_s[threadIdx.x];
  }
}

template <typename out_t>
__global__ void __launch_bounds__(kThreads) mla_combine_kernel(MlaDecodeParams p) {
  const int R = p.s_q * p.H;
  const int b = blockIdx.x / R, r = blockIdx.x % R, i = r / p.H, h = r % p.H;
  const int S = p.num_splits;
  float gm = -INFINITY;
  for (int s = 0; s < S; ++s) gm = fmaxf(gm, p.part_m[((int64_t)b * S + s) * R + r]);
  float tot = 0.0f;
  if (gm != -INFINITY)
    for (int s = 0; s < S; ++s) {
      const float ms = p.part_m[((int64_t)b * S + s) * R + r];
      if (ms != -INFINITY) tot += __expf(ms - gm) * p.part_l[((int64_t)b * S + s) * R + r];
    }
  out_t* out = static_cast<out_t*>(p.out) + ((int64_t)b * R + r) * p.dv;
  for (int col = threadIdx.x; col < p.dv; col += kThreads) {
    float o = 0.0f;
    if (gm != -INFINITY) {
      for (int s = 0; s < S; ++s) {
        const int64_t row = ((int64_t)b * S + s) * R + r;
        const float ms = p.part_m[row];
        if (ms != -INFINITY) o += __expf(ms - gm) * p.part_acc[row * p.dv + col];
      }
      o /= tot;
    }
    out[col] = from_f<out_t>(o);
  }
  if (threadIdx.x == 0) p.lse[((int64_t)b * p.H + h) * p.s_q + i] = gm == -INFINITY ? -INFINITY : gm + logf(tot);
}

template <typename T>
cudaError_t launch_typed(const MlaDecodeParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(float) * ((size_t)(kRows + kKeys) * (p.D + 1) + kRows * kKeys);
  cudaError_t err = cudaFuncSetAttribute(mla_split_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const int R = p.s_q * p.H;
  dim3 grid(p.B, p.num_splits, (R + kRows - 1) / kRows);
  mla_split_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  mla_combine_kernel<T><<<p.B * R, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_mla_decode(const MlaDecodeParams& p, cudaStream_t stream) {
  if (p.dv > kThreads * kMaxCols || p.num_splits < 1) return cudaErrorInvalidValue;
  if (p.B == 0 || p.s_q * p.H == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return launch_typed<float>(p, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace metareason
