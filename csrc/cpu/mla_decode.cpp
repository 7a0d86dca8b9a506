// MLA decode attention on the CPU: absorbed queries over the paged latent cache.
//
// All H heads share one latent KV row per position (MQA-shaped after weight absorption), so
// each 64-row cache block is read once per (batch, split) and used by all s_q·H query rows:
//   scores[r, t] = scale · q[r]·k[t]            (k = the full d_c + d_rope row)
//   acc[r]      += softmax-weights · v[t]        (v = the first head_dim_v channels of k)
// with an online (flash) softmax. The key range of a sequence is cut into splits that run
// in parallel (flash-decoding) and are merged through their log-sum-exp at the end.
// Everything accumulates in fp32; bf16/fp16 blocks are widened once into a scratch buffer.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../ops.h"
#include "vec_math.h"

namespace metareason {
namespace {

constexpr int64_t kBlock = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// s[r*ld_s + t] = scale * q[r]·k[t] for r < rows, t < nkeys. Four keys per pass so each q
// load is reused 4x; reductions through 16 lanes so the loop vectorises.
template <int L = 16>
inline void scores_block(const float* __restrict q, int64_t rows, const float* __restrict k, int64_t nkeys,
                         int64_t D, float scale, float* __restrict s, int64_t ld_s) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = q + r * D;
    int64_t t = 0;
    for (; t + 4 <= nkeys; t += 4) {
      const float *k0 = k + t * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
      float a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
      int64_t j = 0;
      for (; j + L <= D; j += L) {
        for (int l = 0; l < L; ++l) {
          const float qv = qr[j + l];
          a0[l] += qv * k0[j + l];
          a1[l] += qv * k1[j + l];
          a2[l] += qv * k2[j + l];
          a3[l] += qv * k3[j + l];
        }
      }
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (; j < D; ++j) {
        s0 += qr[j] * k0[j];
        s1 += qr[j] * k1[j];
        s2 += qr[j] * k2[j];
        s3 += qr[j] * k3[j];
      }
      for (int l = 0; l < L; ++l) {
        s0 += a0[l];
        s1 += a1[l];
        s2 += a2[l];
        s3 += a3[l];
      }
      s[r * ld_s + t] = s0 * scale;
      s[r * ld_s + t + 1] = s1 * scale;
      s[r * ld_s + t + 2] = s2 * scale;
      s[r * ld_s + t + 3] = s3 * scale;
    }
    for (; t < nkeys; ++t) {
      const float* kt = k + t * D;
      float a[L] = {};
      int64_t j = 0;
      for (; j + L <= D; j += L)
        for (int l = 0; l < L; ++l) a[l] += qr[j + l] * kt[j + l];
      float sum = 0;
      for (; j < D; ++j) sum += qr[j] * kt[j];
      for (int l = 0; l < L; ++l) sum += a[l];
      s[r * ld_s + t] = sum * scale;
    }
  }
}

// acc[r, :dv] += Σ_t p[r, t] · v[t, :dv], tiled over dv so a tile of v stays in L1.
inline void pv_block(const float* __restrict p, int64_t rows, int64_t ld_p, const float* __restrict v, int64_t nkeys,
                     int64_t ld_v, int64_t dv, float* __restrict acc) {
  constexpr int64_t kTile = 128;
  for (int64_t c0 = 0; c0 < dv; c0 += kTile) {
    const int64_t cn = std::min(kTile, dv - c0);
    for (int64_t r = 0; r < rows; ++r) {
      float* a = acc + r * dv + c0;
      const float* pr = p + r * ld_p;
      for (int64_t t = 0; t < nkeys; ++t) {
        const float w = pr[t];
        if (w == 0.0f) continue;
        const float* vt = v + t * ld_v + c0;
        for (int64_t j = 0; j < cn; ++j) a[j] += w * vt[j];
      }
    }
  }
}

// online-softmax step for one row: scores s[0..n) (already masked with -inf) -> weights in place
inline void softmax_update(float* __restrict s, int64_t n, float* m, float* l, float* __restrict acc_row, int64_t dv) {
  float mx = kNegInf;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
  if (mx == kNegInf) {  // nothing visible in this block for this row
    for (int64_t t = 0; t < n; ++t) s[t] = 0.0f;
    return;
  }
  const float m_new = std::max(*m, mx);
  const float alpha = (*m == kNegInf) ? 0.0f : fast_expf(*m - m_new);
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    const float e = (s[t] == kNegInf) ? 0.0f : fast_expf(s[t] - m_new);
    s[t] = e;
    sum += e;
  }
  if (alpha != 1.0f)
    for (int64_t j = 0; j < dv; ++j) acc_row[j] *= alpha;
  *l = *l * alpha + sum;
  *m = m_new;
}

MR_CLONES void scores_block_f32(const float* q, int64_t rows, const float* k, int64_t nkeys, int64_t D, float scale,
                                float* s, int64_t ld_s) {
  scores_block<16>(q, rows, k, nkeys, D, scale, s, ld_s);
}
MR_CLONES void pv_block_f32(const float* p, int64_t rows, int64_t ld_p, const float* v, int64_t nkeys, int64_t ld_v,
                            int64_t dv, float* acc) {
  pv_block(p, rows, ld_p, v, nkeys, ld_v, dv, acc);
}
MR_CLONES void softmax_rows_f32(float* s, int64_t rows, int64_t ld_s, int64_t n, float* m, float* l, float* acc,
                                int64_t dv) {
  for (int64_t r = 0; r < rows; ++r) softmax_update(s + r * ld_s, n, m + r, l + r, acc + r * dv, dv);
}

template <typename in_t>
inline void widen(const in_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename in_t>
std::vector<at::Tensor> mla_impl(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_table,
                                 const at::Tensor& seqlens, int64_t dv, float scale, bool causal, int64_t S) {
  const int64_t B = q.size(0), sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t max_blocks = block_table.size(1);
  const int64_t R = sq * H;  // query rows per sequence
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
    std::vector<float> qf(R * D), kbuf(std::is_same<in_t, float>::value ? 0 : kBlock * D), sbuf(R * kBlock);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / S, s = item % S;
      const int64_t L = slp[b];
      const int64_t nblk = (L + kBlock - 1) / kBlock;
      const int64_t per = (nblk + S - 1) / S;
      const int64_t blk0 = s * per, blk1 = std::min(nblk, blk0 + per);
      if (blk0 >= blk1) continue;
      // row r = i * H + h of this sequence's queries, widened to fp32
      widen<in_t>(qp + b * R * D, qf.data(), R * D);
      float* acc = pacc + (b * S + s) * R * dv;
      float* m = pm + (b * S + s) * R;
      float* l = pl + (b * S + s) * R;
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
        scores_block_f32(qf.data(), R, kf, nvalid, D, scale, sbuf.data(), kBlock);
        if (causal) {
          // query i sees positions < L - sq + i + 1 (FlashMLA: the last s_q cache rows are the queries)
          for (int64_t i = 0; i < sq; ++i) {
            const int64_t visible = L - sq + i + 1;
            const int64_t first_masked = std::max<int64_t>(0, visible - blk * kBlock);
            if (first_masked >= nvalid) continue;
            for (int64_t h = 0; h < H; ++h) {
              float* row = sbuf.data() + (i * H + h) * kBlock;
              for (int64_t t = first_masked; t < nvalid; ++t) row[t] = kNegInf;
            }
          }
        }
        softmax_rows_f32(sbuf.data(), R, kBlock, nvalid, m, l, acc, dv);
        pv_block_f32(sbuf.data(), R, kBlock, kf, nvalid, D, dv, acc);
      }
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
