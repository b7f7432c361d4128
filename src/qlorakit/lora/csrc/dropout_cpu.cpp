// CPU fast path for LoRA dropout: a counter-based keep-mask, bit-packed, and its application.
//
// The mask (shared with the plain-torch reference in qlorakit.lora.dropout, bit for bit):
//   * element e of the flattened input uses the 64-bit hash z = splitmix64(seed + (e / 2 + 1) * golden),
//     its low 32 bits for even e and its high 32 bits for odd e;
//   * e is kept when that 32-bit value is >= threshold (threshold = round(p * 2^32));
//   * bit (e % 8) of byte e / 8 holds the keep flag (bits past the last element are unspecified).
// The mask depends only on (seed, e), so backward regenerates nothing: it reads the 1-bit mask saved in
// forward, 32x smaller than an fp32 input. Drawing it is one multiply-xorshift hash per two elements, which
// vectorizes (8 lanes with AVX-512DQ), instead of torch's per-element Bernoulli sampling.
//
// Applying the mask is a dtype-agnostic masked copy (out = keep ? x : 0) for 4- and 2-byte elements; the
// 1 / (1 - p) scale is folded into the low-rank factors by the caller. Work is split over torch's intra-op
// thread pool with at::parallel_for.
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLKD_X86 1
#define QLKD_TARGET(t) __attribute__((target(t)))
#else
#define QLKD_X86 0
#endif

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr int64_t kGrainBytes = 1 << 14;  // 128K elements per task

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Mask bytes [k0, k1): byte k covers elements 8k .. 8k+7, i.e. hashes 4k .. 4k+3.
inline void mask_bytes_generic(uint64_t seed, uint32_t threshold, int64_t k0, int64_t k1, uint8_t* bits) {
  for (int64_t k = k0; k < k1; ++k) {
    uint32_t b = 0;
    for (int q = 0; q < 4; ++q) {
      const uint64_t z = splitmix64(seed + static_cast<uint64_t>(4 * k + q + 1) * kGolden);
      b |= static_cast<uint32_t>(static_cast<uint32_t>(z) >= threshold) << (2 * q);
      b |= static_cast<uint32_t>(static_cast<uint32_t>(z >> 32) >= threshold) << (2 * q + 1);
    }
    bits[k] = static_cast<uint8_t>(b);
  }
}

void mask_bytes_scalar(uint64_t seed, uint32_t threshold, int64_t k0, int64_t k1, uint8_t* bits) {
  mask_bytes_generic(seed, threshold, k0, k1, bits);
}

template <typename T>
void apply_scalar(const T* x, const uint8_t* bits, int64_t i0, int64_t i1, T* out) {
  for (int64_t i = i0; i < i1; ++i) out[i] = ((bits[i >> 3] >> (i & 7)) & 1) ? x[i] : T(0);
}

#if QLKD_X86
// The same loop, compiled for AVX-512DQ so the 64-bit multiplies vectorize (vpmullq).
QLKD_TARGET("avx512f,avx512dq,avx512bw,avx512vl")
void mask_bytes_avx512(uint64_t seed, uint32_t threshold, int64_t k0, int64_t k1, uint8_t* bits) {
  mask_bytes_generic(seed, threshold, k0, k1, bits);
}

QLKD_TARGET("avx2")
void mask_bytes_avx2(uint64_t seed, uint32_t threshold, int64_t k0, int64_t k1, uint8_t* bits) {
  mask_bytes_generic(seed, threshold, k0, k1, bits);
}

// i0 is a multiple of 64, so every group of 16 (32) elements starts on a mask byte boundary.
QLKD_TARGET("avx512f,avx512bw")
void apply4_avx512(const uint32_t* x, const uint8_t* bits, int64_t i0, int64_t i1, uint32_t* out) {
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    uint16_t m;
    std::memcpy(&m, bits + (i >> 3), 2);
    _mm512_storeu_si512(out + i, _mm512_maskz_mov_epi32(m, _mm512_loadu_si512(x + i)));
  }
  apply_scalar(x, bits, i, i1, out);
}

QLKD_TARGET("avx512f,avx512bw")
void apply2_avx512(const uint16_t* x, const uint8_t* bits, int64_t i0, int64_t i1, uint16_t* out) {
  int64_t i = i0;
  for (; i + 32 <= i1; i += 32) {
    uint32_t m;
    std::memcpy(&m, bits + (i >> 3), 4);
    _mm512_storeu_si512(out + i, _mm512_maskz_mov_epi16(m, _mm512_loadu_si512(x + i)));
  }
  apply_scalar(x, bits, i, i1, out);
}

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
}
bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
#endif  // QLKD_X86

template <typename T>
void apply_range(const void* x, const uint8_t* bits, int64_t i0, int64_t i1, void* out, int64_t isa) {
#if QLKD_X86
  if (isa >= 2 && has_avx512()) {
    if constexpr (sizeof(T) == 4) {
      apply4_avx512(static_cast<const uint32_t*>(x), bits, i0, i1, static_cast<uint32_t*>(out));
      return;
    } else {
      apply2_avx512(static_cast<const uint16_t*>(x), bits, i0, i1, static_cast<uint16_t*>(out));
      return;
    }
  }
#endif
  apply_scalar(static_cast<const T*>(x), bits, i0, i1, static_cast<T*>(out));
}

}  // namespace

extern "C" {

// bits: uint8 [(n + 7) / 8] filled with the keep-mask of n elements. isa: 2 AVX-512, 1 AVX2, 0 scalar
// (the best available at or below it is used). Returns 0, or 1 if a worker thread failed.
int qlk_dropout_mask(uint64_t seed, int64_t n, uint32_t threshold, uint8_t* bits, int64_t isa) {
  const int64_t nbytes = (n + 7) / 8;
  try {
    at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t k0, int64_t k1) {
#if QLKD_X86
      if (isa >= 2 && has_avx512()) return mask_bytes_avx512(seed, threshold, k0, k1, bits);
      if (isa >= 1 && has_avx2()) return mask_bytes_avx2(seed, threshold, k0, k1, bits);
#endif
      mask_bytes_scalar(seed, threshold, k0, k1, bits);
    });
  } catch (...) {
    return 1;
  }
  return 0;
}

// out[i] = keep(i) ? x[i] : 0 for i < n, elements of elem_size 2 or 4 bytes; out may alias x.
// Returns 0, 1 if a worker thread failed, 2 for an unsupported element size.
int qlk_dropout_apply(const void* x, const uint8_t* bits, int64_t n, int64_t elem_size, void* out,
                      int64_t isa) {
  if (elem_size != 2 && elem_size != 4) return 2;
  try {
    // Tasks start on multiples of 64 elements (whole mask bytes, whole vectors).
    const int64_t groups = (n + 63) / 64;
    at::parallel_for(0, groups, kGrainBytes / 8, [&](int64_t g0, int64_t g1) {
      const int64_t i0 = g0 * 64, i1 = g1 * 64 < n ? g1 * 64 : n;
      if (elem_size == 4) {
        apply_range<uint32_t>(x, bits, i0, i1, out, isa);
      } else {
        apply_range<uint16_t>(x, bits, i0, i1, out, isa);
      }
    });
  } catch (...) {
    return 1;
  }
  return 0;
}

}  // extern "C"
