// Fused elementwise epilogues of the LRU/ACT iteration (see csrc/cpu/lru_act.cpp for the
// algorithm). One thread per element for the gates; one CTA per active row for the candidate
// step, which needs two row reductions (w_p·h and ||Δh||²) before the halting decision.
#include "kernels.h"

namespace metareason {
namespace cuda {
namespace {

__device__ __forceinline__ float sigmoid_(float x) { return 1.0f / (1.0f + __expf(-x)); }
__device__ __forceinline__ double sigmoid_(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

template <typename T>
__global__ void lru_gate_kernel(LruGateParams<T> p) {
  const int64_t total = p.A * p.d;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = e / p.d, j = e % p.d;
    const T* g = p.g + i * 2 * p.d;
    const T* gx = p.gx + p.idx[i] * 3 * p.d;
    p.z[e] = sigmoid_(g[j] + gx[j]);
    p.rh[e] = sigmoid_(g[p.d + j] + gx[p.d + j]) * p.h[e];
  }
}

template <typename T, int kThreads>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T s = 0;
  if (threadIdx.x < 32) {
    s = threadIdx.x < kThreads / 32 ? smem[threadIdx.x] : T(0);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) smem[0] = s;
  }
  __syncthreads();
  s = smem[0];
  __syncthreads();
  return s;
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) lru_cand_kernel(LruCandParams<T> p) {
  __shared__ T red[32];
  __shared__ T weight;  // p or R for this row's acc/out update
  __shared__ int mode;  // 0: acc += p h, 1: out = acc + R h, 2: out = h (fixed, last step), 3: nothing
  const int64_t i = blockIdx.x;
  const int64_t t = p.idx[i];
  const int64_t d = p.d;
  T* h = p.h + i * d;
  const T* c = p.c + i * d;
  const T* z = p.z + i * d;
  const T* gxh = p.gx + t * 3 * d + 2 * d;
  T dot = 0, diff2 = 0;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const T ho = h[j];
    const T dl = z[j] * (tanh_(c[j] + gxh[j]) - ho);
    const T hn = ho + dl;
    h[j] = hn;
    dot += p.w_p[j] * hn;
    diff2 += dl * dl;
  }
  dot = block_sum<T, kThreads>(dot, red);
  diff2 = block_sum<T, kThreads>(diff2, red);
  if (threadIdx.x == 0) {
    const T prob = sigmoid_(dot + p.b_p);
    const int64_t slot = t * p.max_iterations + p.n - 1;
    p.halt_probs[slot] = prob;
    p.residuals[slot] = sqrt(diff2);
    bool stop;
    if (p.fixed) {
      stop = p.n == p.max_iterations;
      mode = stop ? 2 : 3;
    } else {
      const T c0 = p.cum[t], c1 = c0 + prob;
      stop = c1 >= p.threshold || p.n == p.max_iterations;
      if (stop) {
        weight = T(1) - c0;
        p.remainders[t] = weight;
        mode = 1;
      } else {
        weight = prob;
        mode = 0;
      }
      p.cum[t] = c1;
    }
    if (stop) p.num_iterations[t] = p.n;
    p.halted[i] = stop ? 1 : 0;
  }
  __syncthreads();
  const int m = mode;
  const T w = weight;
  if (m == 3) return;
  T* out = p.out + t * d;
  T* acc = p.acc ? p.acc + t * d : nullptr;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    if (m == 0) acc[j] += w * h[j];
    else if (m == 1) out[j] = acc[j] + w * h[j];
    else out[j] = h[j];
  }
}

}  // namespace

template <typename T>
cudaError_t launch_lru_gate(const LruGateParams<T>& p, cudaStream_t stream) {
  if (p.A == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (p.A * p.d + threads - 1) / threads;
  lru_gate_kernel<T><<<(unsigned)(blocks < 65535 * 8 ? blocks : 65535 * 8), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_lru_cand(const LruCandParams<T>& p, cudaStream_t stream) {
  if (p.A == 0) return cudaSuccess;
  lru_cand_kernel<T, 128><<<(unsigned)p.A, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_lru_gate<float>(const LruGateParams<float>&, cudaStream_t);
template cudaError_t launch_lru_gate<double>(const LruGateParams<double>&, cudaStream_t);
template cudaError_t launch_lru_cand<float>(const LruCandParams<float>&, cudaStream_t);
template cudaError_t launch_lru_cand<double>(const LruCandParams<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace metareason
