// MLA decode attention on the CPU: absorbed queries over the paged latent cache.
//
// All H heads share one latent KV row per position (MQA-shaped after weight absorption), so
// each 64-row cache block is read once per (batch, split) and used by all s_q·H query rows:
//   scores[r, t] = scale · q[r]·k[t]            (k = the full d_c + d_rope row)
//   acc[r]      += softmax-weights · v[t]        (v = the first head_dim_v channels of k)
// with an online (flash) softmax. The key range of a sequence is cut into splits that run
// in parallel (flash-decoding) and are merged through their log-sum-exp at the end.
// Everything accumulates in fp32; bf16/fp16 blocks are widened once into a scratch buffer.
// Register tiling (mla_block_f32): query rows are the 16 vector lanes (q transposed once per
// item), scores come from 8 keys x 16 rows of accumulators fed by broadcast key scalars, and
// P·V from 4 rows x 64 channels of accumulators over the block's keys. Measured numbers and
// the roofline (the op is compute-bound on the CPU): docs/ops.md.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../ops.h"
#include "vec_math.h"

namespace metareason {
namespace {

constexpr int64_t kBlock = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The block kernel works on 16-lane float vectors (GCC vector extensions: one zmm register
// under the x86-64-v4 clone, split into ymm/xmm by the compiler for the other clones).
// Query rows are the vector lanes: q is kept transposed (qT [D][RP], RP = rows rounded up to
// 16), so a score tile is built from broadcast key scalars times query-row vectors, with no
// horizontal reductions, and the online softmax runs over 16 rows at once.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;
// forced, so every helper is compiled inside each target clone (a shared out-of-line copy would be baseline ISA)
#define MR_INLINE static inline __attribute__((always_inline))

MR_INLINE v16 vload(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
MR_INLINE void vstore(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
MR_INLINE v16 vsplat(float x) { return v16{} + x; }

// fast_expf (vec_math.h) on 16 lanes: same polynomial, same clamping.
MR_INLINE v16 vexp(v16 x) {
  x = x < vsplat(-87.0f) ? vsplat(-87.0f) : x;
  x = x > vsplat(88.0f) ? vsplat(88.0f) : x;
  const v16 magic = vsplat(12582912.0f);
  v16 k = (x * 1.44269504088896341f + magic) - magic;
  v16 r = x - k * 0.693359375f;
  r = r - k * (-2.12194440e-4f);
  v16 p = vsplat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  v16 e = p * r * r + r + 1.0f;
  vi16 bits = (__builtin_convertvector(k, vi16) + 127) << 23;
  v16 two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return e * two_k;
}

// sT[t*RP + 16g ...] = scale * q·k[t] for NT consecutive keys and one 16-row group g.
template <int NT>
MR_INLINE void score_tile(const float* __restrict qT, int64_t RP, const float* __restrict k, int64_t D,
                              float scale, float* __restrict sT) {
  v16 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = v16{};
  for (int64_t d = 0; d < D; ++d) {
    const v16 qv = vload(qT + d * RP);
    for (int j = 0; j < NT; ++j) acc[j] += k[j * D + d] * qv;
  }
  for (int j = 0; j < NT; ++j) vstore(sT + j * RP, acc[j] * scale);
}

// acc[r, c0 : c0 + 16·NV] += Σ_t p[t, r] · v[t, c0 : ...] for NR rows r0.., accumulated in registers.
template <int NR, int NV>
MR_INLINE void pv_tile(const float* __restrict sT, int64_t RP, int64_t r0, const float* __restrict v,
                           int64_t ld_v, int64_t nkeys, int64_t c0, float* __restrict acc, int64_t dv) {
  v16 a[NR][NV];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NV; ++j) a[i][j] = vload(acc + (r0 + i) * dv + c0 + j * kLanes);
  for (int64_t t = 0; t < nkeys; ++t) {
    v16 vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = vload(v + t * ld_v + c0 + j * kLanes);
    for (int i = 0; i < NR; ++i) {
      const float p = sT[t * RP + r0 + i];
      for (int j = 0; j < NV; ++j) a[i][j] += p * vv[j];
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NV; ++j) vstore(acc + (r0 + i) * dv + c0 + j * kLanes, a[i][j]);
}

template <int NR>
MR_INLINE void pv_rows(const float* sT, int64_t RP, int64_t r0, const float* v, int64_t ld_v, int64_t nkeys,
                           float* acc, int64_t dv) {
  int64_t c0 = 0;
  for (; c0 + 4 * kLanes <= dv; c0 += 4 * kLanes) pv_tile<NR, 4>(sT, RP, r0, v, ld_v, nkeys, c0, acc, dv);
  for (; c0 + kLanes <= dv; c0 += kLanes) pv_tile<NR, 1>(sT, RP, r0, v, ld_v, nkeys, c0, acc, dv);
  for (; c0 < dv; ++c0)  // channel tail
    for (int i = 0; i < NR; ++i) {
      float s = acc[(r0 + i) * dv + c0];
      for (int64_t t = 0; t < nkeys; ++t) s += sT[t * RP + r0 + i] * v[t * ld_v + c0];
      acc[(r0 + i) * dv + c0] = s;
    }
}

// One cache block (nkeys <= 64 rows k [nkeys][D], values = the first dv channels) for all
// query rows: scores, causal mask, online-softmax update of (m, l, acc), then P·V.
// masked_from[r] (or null): row r sees block keys t < masked_from[r] only.
MR_CLONES void mla_block_f32(const float* qT, int64_t R, int64_t RP, const float* k, int64_t nkeys, int64_t D,
                             int64_t dv, float scale, const int64_t* masked_from, float* sT, float* m, float* l,
                             float* acc) {
  for (int64_t g = 0; g < RP; g += kLanes) {
    int64_t t = 0;
    for (; t + 8 <= nkeys; t += 8) score_tile<8>(qT + g, RP, k + t * D, D, scale, sT + t * RP + g);
    for (; t < nkeys; ++t) score_tile<1>(qT + g, RP, k + t * D, D, scale, sT + t * RP + g);
  }
  if (masked_from != nullptr)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t t = std::max<int64_t>(0, masked_from[r]); t < nkeys; ++t) sT[t * RP + r] = kNegInf;
  const v16 ninf = vsplat(kNegInf), zero = v16{};
  for (int64_t g = 0; g < RP; g += kLanes) {
    v16 mx = ninf;
    for (int64_t t = 0; t < nkeys; ++t) {
      const v16 s = vload(sT + t * RP + g);
      mx = s > mx ? s : mx;
    }
    const v16 m_old = vload(m + g);
    const v16 m_new = mx > m_old ? mx : m_old;
    const v16 m_ref = m_new == ninf ? zero : m_new;  // rows with nothing visible yet: no NaN
    const v16 alpha = m_old == ninf ? zero : vexp(m_old - m_ref);
    v16 sum = zero;
    for (int64_t t = 0; t < nkeys; ++t) {
      const v16 s = vload(sT + t * RP + g);
      const v16 p = s == ninf ? zero : vexp(s - m_ref);
      vstore(sT + t * RP + g, p);
      sum += p;
    }
    vstore(l + g, vload(l + g) * alpha + sum);
    vstore(m + g, m_new);
    float al[kLanes];
    vstore(al, alpha);
    for (int64_t i = 0; i < kLanes && g + i < R; ++i)
      if (al[i] != 1.0f) {
        float* a = acc + (g + i) * dv;
        for (int64_t j = 0; j < dv; ++j) a[j] *= al[i];
      }
  }
  int64_t r0 = 0;
  for (; r0 + 4 <= R; r0 += 4) pv_rows<4>(sT, RP, r0, k, D, nkeys, acc, dv);
  for (; r0 < R; ++r0) pv_rows<1>(sT, RP, r0, k, D, nkeys, acc, dv);
}

// bf16 -> fp32 is a 16-bit shift; done on raw bits so the loop vectorises.
MR_CLONES void widen_bf16(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

template <typename in_t>
inline void widen(const in_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same<in_t, c10::BFloat16>::value) {
    widen_bf16(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename in_t>
std::vector<at::Tensor> mla_impl(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_table,
                                 const at::Tensor& seqlens, int64_t dv, float scale, bool causal, int64_t S) {
  const int64_t B = q.size(0), sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t max_blocks = block_table.size(1);
  const int64_t R = sq * H;  // query rows per sequence
  const int64_t RP = (R + kLanes - 1) / kLanes * kLanes;
  const in_t* qp = q.data_ptr<in_t>();
  const in_t* kp = cache.data_ptr<in_t>();
  const int32_t* btp = block_table.data_ptr<int32_t>();
  const int32_t* slp = seqlens.data_ptr<int32_t>();

  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_acc = at::zeros({B, S, R, dv}, f32);
  at::Tensor part_m = at::full({B, S, R}, kNegInf, f32);
  at::Tensor part_l = at::zeros({B, S, R}, f32);
  float* pacc = part_acc.data_ptr<float>();
  float* pm = part_m.data_ptr<float>();
  float* pl = part_l.data_ptr<float>();

  at::parallel_for(0, B * S, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> qrow(R * D), qT(D * RP), kbuf(std::is_same<in_t, float>::value ? 0 : kBlock * D),
        sT(kBlock * RP), acc(RP * dv), m(RP), l(RP);
    std::vector<int64_t> masked_from(R);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / S, s = item % S;
      const int64_t L = slp[b];
      const int64_t nblk = (L + kBlock - 1) / kBlock;
      const int64_t per = (nblk + S - 1) / S;
      const int64_t blk0 = s * per, blk1 = std::min(nblk, blk0 + per);
      if (blk0 >= blk1) continue;
      // row r = i * H + h of this sequence's queries, widened to fp32 and transposed (rows = lanes)
      widen<in_t>(qp + b * R * D, qrow.data(), R * D);
      std::fill(qT.begin(), qT.end(), 0.0f);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t d = 0; d < D; ++d) qT[d * RP + r] = qrow[r * D + d];
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t phys = btp[b * max_blocks + blk];
        const int64_t nvalid = std::min(kBlock, L - blk * kBlock);
        const float* kf;
        if constexpr (std::is_same<in_t, float>::value) {
          kf = kp + phys * kBlock * D;
        } else {
          widen<in_t>(kp + phys * kBlock * D, kbuf.data(), nvalid * D);
          kf = kbuf.data();
        }
        // query i sees positions < L - sq + i + 1 (FlashMLA: the last s_q cache rows are the queries)
        bool any_masked = false;
        if (causal) {
          for (int64_t i = 0; i < sq; ++i) {
            const int64_t first_masked = L - sq + i + 1 - blk * kBlock;
            any_masked |= first_masked < nvalid;
            for (int64_t h = 0; h < H; ++h) masked_from[i * H + h] = first_masked;
          }
        }
        mla_block_f32(qT.data(), R, RP, kf, nvalid, D, dv, scale, any_masked ? masked_from.data() : nullptr,
                      sT.data(), m.data(), l.data(), acc.data());
      }
      std::copy(acc.begin(), acc.begin() + R * dv, pacc + (b * S + s) * R * dv);
      std::copy(m.begin(), m.begin() + R, pm + (b * S + s) * R);
      std::copy(l.begin(), l.begin() + R, pl + (b * S + s) * R);
    }
  });

  // merge the splits through their log-sum-exp
  at::Tensor out32 = at::empty({B, sq, H, dv}, f32);
  at::Tensor lse = at::empty({B, H, sq}, f32);
  float* op = out32.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, B * R, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t br = lo; br < hi; ++br) {
      const int64_t b = br / R, r = br % R, i = r / H, h = r % H;
      float gm = kNegInf;
      for (int64_t s = 0; s < S; ++s) gm = std::max(gm, pm[(b * S + s) * R + r]);
      float* o = op + br * dv;
      std::fill(o, o + dv, 0.0f);
      if (gm == kNegInf) {  // no visible key: out 0, lse -inf
        lp[(b * H + h) * sq + i] = kNegInf;
        continue;
      }
      float tot = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        const float ms = pm[(b * S + s) * R + r];
        if (ms == kNegInf) continue;
        const float w = std::exp(ms - gm);
        tot += w * pl[(b * S + s) * R + r];
        const float* a = pacc + ((b * S + s) * R + r) * dv;
        for (int64_t j = 0; j < dv; ++j) o[j] += w * a[j];
      }
      const float inv = 1.0f / tot;
      for (int64_t j = 0; j < dv; ++j) o[j] *= inv;
      lp[(b * H + h) * sq + i] = gm + std::log(tot);
    }
  });
  at::Tensor out = q.scalar_type() == at::kFloat ? out32 : out32.to(q.scalar_type());
  return {out, lse};
}

}  // namespace

std::vector<at::Tensor> mla_decode_cpu(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                                       const at::Tensor& cache_seqlens, int64_t head_dim_v, double softmax_scale,
                                       bool causal, int64_t num_splits) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected [B, s_q, H, D]");
  TORCH_CHECK_VALUE(kv_cache.dim() == 4 && kv_cache.size(1) == kBlock && kv_cache.size(2) == 1 &&
                        kv_cache.size(3) == q.size(3),
                    "kv_cache: expected [num_blocks, 64, 1, ", q.size(3), "], got ", kv_cache.sizes());
  TORCH_CHECK_VALUE(kv_cache.scalar_type() == q.scalar_type(), "kv_cache: dtype must match q");
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == q.size(0) &&
                        block_table.scalar_type() == at::kInt,
                    "block_table: expected int32 [B, max_blocks]");
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == q.size(0) &&
                        cache_seqlens.scalar_type() == at::kInt,
                    "cache_seqlens: expected int32 [B]");
  TORCH_CHECK_VALUE(head_dim_v >= 1 && head_dim_v <= q.size(3), "head_dim_v: must be in [1, ", q.size(3), "]");
  for (const at::Tensor* t : {&q, &kv_cache, &block_table, &cache_seqlens}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "mla_decode_cpu: all tensors must be on the CPU");
    TORCH_CHECK_VALUE(t->is_contiguous(), "mla_decode_cpu: all tensors must be contiguous");
  }
  // bounds: every used block id must be a valid cache block (never read out of bounds)
  const int64_t B = q.size(0), max_blocks = block_table.size(1), nb = kv_cache.size(0);
  const int32_t* slp = cache_seqlens.data_ptr<int32_t>();
  const int32_t* btp = block_table.data_ptr<int32_t>();
  int64_t max_used = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(slp[b] >= 0 && slp[b] <= max_blocks * kBlock, "cache_seqlens: entry ", b, " = ", slp[b],
                      " is outside [0, ", max_blocks * kBlock, "] (block_table capacity)");
    const int64_t used = (slp[b] + kBlock - 1) / kBlock;
    max_used = std::max(max_used, used);
    for (int64_t j = 0; j < used; ++j)
      TORCH_CHECK_VALUE(btp[b * max_blocks + j] >= 0 && btp[b * max_blocks + j] < nb, "block_table: entry [", b, ", ",
                        j, "] = ", btp[b * max_blocks + j], " is not a block of kv_cache (", nb, " blocks)");
  }
  int64_t S = num_splits;
  if (S <= 0) {  // enough (batch, split) items to keep every thread busy, >= 4 blocks per split
    const int64_t threads = at::get_num_threads();
    S = std::max<int64_t>(1, std::min<int64_t>((2 * threads + B - 1) / B, std::max<int64_t>(1, max_used / 4)));
  }
  const float scale = static_cast<float>(softmax_scale);
  switch (q.scalar_type()) {
    case at::kFloat:
      return mla_impl<float>(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, S);
    case at::kBFloat16:
      return mla_impl<c10::BFloat16>(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, S);
    case at::kHalf:
      return mla_impl<c10::Half>(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, S);
    default:
      TORCH_CHECK_VALUE(false, "q: expected float32, bfloat16 or float16, got ", q.scalar_type());
  }
  return {};
}

}  // namespace metareason
