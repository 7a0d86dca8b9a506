// Branch-free float math that the compiler can vectorise (no libm calls in the hot loops),
// plus a target_clones macro so the hot row functions get AVX2/AVX-512 versions picked at
// load time while the extension itself is built for the baseline ISA.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(METAREASON_NO_CLONES)
#define MR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MR_CLONES
#endif

namespace metareason {

// exp(x) for float, Cephes polynomial after range reduction; relative error ~2 ulp on
// [-87, 88] (inputs are clamped there, so no inf/denormal paths).
static inline float fast_expf(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // round(x / ln2) with the 1.5 * 2^23 trick: exact without -ffast-math and vectorisable.
  const float magic = 12582912.0f;
  float k = (x * 1.44269504088896341f + magic) - magic;
  float r = x - k * 0.693359375f;
  r = r - k * (-2.12194440e-4f);
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  float e = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

static inline float fast_sigmoidf(float x) { return 1.0f / (1.0f + fast_expf(-x)); }
// tanh(x) = 2 sigmoid(2x) - 1: absolute error ~1e-7, which is what fp32 comparisons need.
static inline float fast_tanhf(float x) { return 2.0f / (1.0f + fast_expf(-2.0f * x)) - 1.0f; }

// double keeps libm: fp64 is the gradcheck path, where accuracy matters and speed does not.
static inline double mr_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
static inline double mr_tanh(double x) { return std::tanh(x); }
static inline float mr_sigmoid(float x) { return fast_sigmoidf(x); }
static inline float mr_tanh(float x) { return fast_tanhf(x); }
static inline double mr_exp(double x) { return std::exp(x); }
static inline float mr_exp(float x) { return fast_expf(x); }

}  // namespace metareason
