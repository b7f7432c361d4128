// CPU fast path for 4-bit blockwise (NF4 / FP4) quantization with bitsandbytes semantics.
//
// Layout (shared with the plain-torch reference in qlorakit.quant.blockwise):
//   * the input is flattened row-major and cut into blocks of `blocksize` consecutive elements;
//   * absmax[b] = max |x| over block b (fp32);
//   * quantize: s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1) for full blocks; the trailing partial block
//     divides by max(absmax, 1e-38) instead (that is what bitsandbytes does), and stores the clamped absmax;
//     q = number of the 15 fp32 midpoints m with !(m >= s) (torch.bucketize semantics: strict >, NaN -> 15);
//   * packing: byte k = (q[2k] << 4) | q[2k+1]; an odd count is padded with the code of 0.0;
//   * dequantize: out[i] = code[q_i] * absmax[i / blocksize] in fp32, then round-to-nearest-even to the
//     output dtype exactly as torch's .to() does.
//
// Vector paths (AVX-512, AVX2) are compiled with per-function target attributes and chosen at run time, so
// one shared object runs on any x86-64 CPU; other architectures use the portable scalar path. Work is split
// over torch's intra-op thread pool with at::parallel_for.

// Only <ATen/Parallel.h> and <c10/util/Half.h> are included (not <torch/extension.h>): they parse in about two
// seconds instead of a minute or more, so the first-use compile stays short. The entry points are plain C
// functions over raw pointers; the Python wrapper validates and allocates every tensor.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLK_X86 1
#define QLK_TARGET(t) __attribute__((target(t)))
#else
#define QLK_X86 0
#endif

namespace {

constexpr float kMinAbsmax = 1e-38f;  // bitsandbytes clamps absmax before taking the reciprocal

enum class OutKind { F32, BF16, F16 };

// ---------------------------------------------------------------- scalar conversions (torch semantics)

inline uint16_t f32_to_bf16_rne(float f) {
  if (std::isnan(f)) return 0x7FC0;  // c10::BFloat16 canonical quiet NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t f32_to_f16_rne(float f) { return c10::Half(f).x; }  // the conversion torch itself uses

// Dequantize elements [e0, e1) (e0 even), scalar. Each block's 16 possible outputs are computed (and rounded)
// once, so the per-element work is a nibble extraction and a table load.
template <typename T, typename Convert>
void dequant_range_table(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                         int64_t e0, int64_t e1, T* out, Convert convert) {
  T table[16];
  for (int64_t b = e0 / blocksize; b * blocksize < e1; ++b) {
    for (int j = 0; j < 16; ++j) table[j] = convert(code[j] * absmax[b]);
    const int64_t lo = b * blocksize > e0 ? b * blocksize : e0;
    const int64_t hi = (b + 1) * blocksize < e1 ? (b + 1) * blocksize : e1;
    for (int64_t i = lo; i < hi; ++i) {
      const uint8_t byte = packed[i >> 1];
      out[i] = table[(i & 1) ? (byte & 0x0F) : (byte >> 4)];
    }
  }
}

void dequant_range_scalar(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                          int64_t e0, int64_t e1, void* out, OutKind kind) {
  switch (kind) {
    case OutKind::F32:
      return dequant_range_table(packed, absmax, code, blocksize, e0, e1, static_cast<float*>(out),
                                 [](float v) { return v; });
    case OutKind::BF16:
      return dequant_range_table(packed, absmax, code, blocksize, e0, e1, static_cast<uint16_t*>(out),
                                 f32_to_bf16_rne);
    case OutKind::F16:
      return dequant_range_table(packed, absmax, code, blocksize, e0, e1, static_cast<uint16_t*>(out),
                                 f32_to_f16_rne);
  }
}

inline uint8_t bucket_scalar(float s, const float* mid) {
  int q = 0;
  for (int j = 0; j < 15; ++j) q += !(mid[j] >= s);  // torch.bucketize(right=False): NaN counts past all
  return static_cast<uint8_t>(q);
}

// Quantize one block [e0, e1) scalar: returns its absmax, writes codes into q (length e1 - e0).
float quant_block_scalar(const float* x, int64_t e0, int64_t e1, bool partial, const float* mid,
                         uint8_t* q) {
  float amax = 0.f;
  bool nan = false;
  for (int64_t i = e0; i < e1; ++i) {
    const float a = std::fabs(x[i]);
    nan |= std::isnan(a);
    amax = a > amax ? a : amax;
  }
  if (nan) amax = std::numeric_limits<float>::quiet_NaN();
  const float clamped = std::isnan(amax) ? amax : (amax < kMinAbsmax ? kMinAbsmax : amax);
  const float recip = 1.0f / clamped;
  for (int64_t i = e0; i < e1; ++i) {
    float s = partial ? x[i] / clamped : x[i] * recip;
    if (!std::isnan(s)) s = s < -1.f ? -1.f : (s > 1.f ? 1.f : s);
    q[i - e0] = bucket_scalar(s, mid);
  }
  return partial ? clamped : amax;
}

#if QLK_X86
// ---------------------------------------------------------------- AVX-512

QLK_TARGET("avx512f,avx512bw,avx512vl")
inline __m256i bf16_from_f32_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// 32 nibbles (16 bytes, high nibble first) -> 32 x u16 indices in element order. Bits above the low nibble
// are left as they are: the lookup tables below repeat their 16 entries, so only the low 4 bits matter.
QLK_TARGET("avx512f,avx512bw,avx512vl")
inline __m512i nibble_indices32(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i hi = _mm_srli_epi16(v, 4);
  const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(hi, v)),
                                                _mm_unpackhi_epi8(hi, v), 1);
  return _mm512_cvtepu8_epi16(bytes);
}

// Dequantize blocks [b0, b1) whose elements are all inside the tensor; blocksize is a multiple of 32.
// Every output of a block is one of 16 values, code[q] * absmax rounded to the output dtype, so each block
// builds that 16-entry table once (the same fp32 product and rounding as per element) and then each 32
// outputs are a single vector lookup: 16-bit outputs through vpermw, fp32 through vpermps.
QLK_TARGET("avx512f,avx512bw,avx512vl")
void dequant_blocks_avx512(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                           int64_t b0, int64_t b1, void* out, OutKind kind) {
  const __m512 codes = _mm512_loadu_ps(code);
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 values = _mm512_mul_ps(codes, _mm512_set1_ps(absmax[b]));
    const int64_t e_begin = b * blocksize, e_end = e_begin + blocksize;
    if (kind == OutKind::F32) {
      for (int64_t e = e_begin; e < e_end; e += 32) {
        const __m512i idx = nibble_indices32(packed + (e >> 1));
        float* o = static_cast<float*>(out) + e;
        _mm512_storeu_ps(o, _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx)), values));
        _mm512_storeu_ps(o + 16,
                         _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1)), values));
      }
      continue;
    }
    const __m256i half = kind == OutKind::BF16
                             ? bf16_from_f32_avx512(values)
                             : _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);  // entries 16..31 = 0..15
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t e = e_begin; e < e_end; e += 32) {
      _mm512_storeu_si512(o + e, _mm512_permutexvar_epi16(nibble_indices32(packed + (e >> 1)), table));
    }
  }
}

// Codes for 16 scaled values: count of midpoints m with !(m >= s), by a 4-step branch-free binary search.
QLK_TARGET("avx512f,avx512bw,avx512vl")
inline __m512i bucket16_avx512(__m512 s, __m512 mids) {
  __m512i q = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step >>= 1) {
    const __m512i probe = _mm512_add_epi32(q, _mm512_set1_epi32(step - 1));
    const __m512 m = _mm512_permutexvar_ps(probe, mids);
    const __mmask16 go = _mm512_cmp_ps_mask(m, s, _CMP_NGE_UQ);
    q = _mm512_mask_add_epi32(q, go, q, _mm512_set1_epi32(step));
  }
  return q;
}

// Quantize full blocks [b0, b1) (blocksize a multiple of 32) into packed bytes and absmax.
QLK_TARGET("avx512f,avx512bw,avx512vl")
void quant_blocks_avx512(const float* x, const float* mid, int64_t blocksize, int64_t b0, int64_t b1,
                         uint8_t* packed, float* absmax) {
  float mids16[16];
  std::memcpy(mids16, mid, 15 * sizeof(float));
  mids16[15] = std::numeric_limits<float>::infinity();  // never probed; keeps the table full
  const __m512 mids = _mm512_loadu_ps(mids16);
  const __m512 one = _mm512_set1_ps(1.f), minus_one = _mm512_set1_ps(-1.f);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + b * blocksize;
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i = 0; i < blocksize; i += 16) {
      const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(xb + i)), abs_mask));
      nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
      vmax = _mm512_max_ps(vmax, a);
    }
    float amax = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(vmax);
    absmax[b] = amax;
    const float clamped = std::isnan(amax) ? amax : (amax < kMinAbsmax ? kMinAbsmax : amax);
    const __m512 recip = _mm512_set1_ps(1.0f / clamped);
    uint8_t* pb = packed + b * (blocksize >> 1);
    for (int64_t i = 0; i < blocksize; i += 32) {
      // min/max return their second operand when one is NaN, so NaN passes through like torch.clamp.
      __m512 s0 = _mm512_mul_ps(_mm512_loadu_ps(xb + i), recip);
      __m512 s1 = _mm512_mul_ps(_mm512_loadu_ps(xb + i + 16), recip);
      s0 = _mm512_max_ps(minus_one, _mm512_min_ps(one, s0));
      s1 = _mm512_max_ps(minus_one, _mm512_min_ps(one, s1));
      const __m512i q0 = bucket16_avx512(s0, mids);
      const __m512i q1 = bucket16_avx512(s1, mids);
      // pair (even, odd) elements: byte = (q[2k] << 4) | q[2k+1] via 16-bit lanes.
      const __m256i w0 = _mm512_cvtepi32_epi16(q0);  // 16 x u16
      const __m256i w1 = _mm512_cvtepi32_epi16(q1);
      const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);  // 32 x u16
      const __m512i even = _mm512_and_si512(w, _mm512_set1_epi32(0xFFFF));
      const __m512i odd = _mm512_srli_epi32(w, 16);
      const __m512i bytes = _mm512_or_si512(_mm512_slli_epi32(even, 4), odd);  // 16 x u32, value < 256
      _mm_storeu_si128(reinterpret_cast<__m128i*>(pb + (i >> 1)), _mm512_cvtepi32_epi8(bytes));
    }
  }
}

// ---------------------------------------------------------------- AVX2

QLK_TARGET("avx2,fma,f16c")
inline __m128i bf16_from_f32_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // pack 8 x u32 (< 65536) into 8 x u16; packus works per 128-bit lane, then fix the lane order.
  const __m256i packed = _mm256_packus_epi32(r, r);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

QLK_TARGET("avx2,fma,f16c")
inline void store8_avx2(void* out, int64_t i, __m256 v, OutKind kind) {
  switch (kind) {
    case OutKind::F32: _mm256_storeu_ps(static_cast<float*>(out) + i, v); break;
    case OutKind::BF16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), bf16_from_f32_avx2(v));
      break;
    case OutKind::F16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

// 8-entry lookups twice, then pick by bit 3 of the index.
QLK_TARGET("avx2,fma,f16c")
inline __m256 lookup8_avx2(__m256i idx, __m256 lo_tab, __m256 hi_tab) {
  const __m256 lo = _mm256_permutevar8x32_ps(lo_tab, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(hi_tab, idx);
  const __m256 pick_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(lo, hi, pick_hi);
}

QLK_TARGET("avx2,fma,f16c")
void dequant_blocks_avx2(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                         int64_t b0, int64_t b1, void* out, OutKind kind) {
  const __m256 lo_tab = _mm256_loadu_ps(code), hi_tab = _mm256_loadu_ps(code + 8);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t b = b0; b < b1; ++b) {
    const __m256 scale = _mm256_set1_ps(absmax[b]);
    const int64_t e_begin = b * blocksize;
    for (int64_t e = e_begin; e < e_begin + blocksize; e += 32) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (e >> 1)));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
      const __m128i lo = _mm_and_si128(v, low4);
      const __m128i idx[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};
      for (int h = 0; h < 2; ++h) {
        const __m256i i0 = _mm256_cvtepu8_epi32(idx[h]);
        const __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(idx[h], 8));
        store8_avx2(out, e + 16 * h, _mm256_mul_ps(lookup8_avx2(i0, lo_tab, hi_tab), scale), kind);
        store8_avx2(out, e + 16 * h + 8, _mm256_mul_ps(lookup8_avx2(i1, lo_tab, hi_tab), scale), kind);
      }
    }
  }
}

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}
bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif  // QLK_X86

// ---------------------------------------------------------------- dispatch over full blocks

void dequant_full_blocks(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                         int64_t b0, int64_t b1, void* out, OutKind kind, int64_t isa) {
#if QLK_X86
  if (blocksize % 32 == 0) {
    if (isa >= 2) return dequant_blocks_avx512(packed, absmax, code, blocksize, b0, b1, out, kind);
    if (isa >= 1) return dequant_blocks_avx2(packed, absmax, code, blocksize, b0, b1, out, kind);
  }
#endif
  dequant_range_scalar(packed, absmax, code, blocksize, b0 * blocksize, b1 * blocksize, out, kind);
}

void quant_full_blocks(const float* x, const float* mid, int64_t blocksize, int64_t b0, int64_t b1,
                       uint8_t* packed, float* absmax, int64_t isa) {
#if QLK_X86
  if (isa >= 2 && blocksize % 32 == 0) return quant_blocks_avx512(x, mid, blocksize, b0, b1, packed, absmax);
#endif
  std::vector<uint8_t> q(blocksize);
  for (int64_t b = b0; b < b1; ++b) {
    absmax[b] = quant_block_scalar(x, b * blocksize, (b + 1) * blocksize, false, mid, q.data());
    uint8_t* pb = packed + b * (blocksize >> 1);
    for (int64_t k = 0; k < blocksize / 2; ++k) pb[k] = static_cast<uint8_t>((q[2 * k] << 4) | q[2 * k + 1]);
  }
}

int64_t grain_blocks(int64_t blocksize) {
  // ~32K elements per task: large enough to amortise scheduling, small enough to balance two threads.
  const int64_t g = (int64_t{1} << 15) / blocksize;
  return g > 0 ? g : 1;
}

}  // namespace

extern "C" {

// Highest instruction set the vector paths may use: 2 = AVX-512, 1 = AVX2, 0 = scalar.
int64_t qlk_best_isa() {
#if QLK_X86
  if (cpu_has_avx512()) return 2;
  if (cpu_has_avx2()) return 1;
#endif
  return 0;
}

// packed uint8 [(numel + 1) / 2], absmax fp32 [ceil(numel / blocksize)], code fp32 [16], out [numel] of
// kind 0 = fp32, 1 = bf16, 2 = fp16. blocksize is even. Returns 0, or 1 if a worker thread failed.
int qlk_dequantize(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                   int64_t numel, int32_t kind_id, void* out, int64_t isa) {
  try {
    const OutKind kind = kind_id == 0 ? OutKind::F32 : (kind_id == 1 ? OutKind::BF16 : OutKind::F16);
    const int64_t full = numel / blocksize;
    at::parallel_for(0, full, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
      dequant_full_blocks(packed, absmax, code, blocksize, b0, b1, out, kind, isa);
    });
    if (full * blocksize < numel)
      dequant_range_scalar(packed, absmax, code, blocksize, full * blocksize, numel, out, kind);
    return 0;
  } catch (...) {
    return 1;
  }
}

// x fp32 [n]; mids fp32 [15]: midpoints of the sorted code table; order uint8 [16]: code index of each sorted
// position (identity for NF4; bitsandbytes buckets FP4 against its sorted table and maps back).
// Writes packed uint8 [(n + 1) / 2] and absmax fp32 [ceil(n / blocksize)]. Returns 0, or 1 on failure.
int qlk_quantize(const float* x, int64_t n, const float* mid, const uint8_t* ord, int64_t blocksize,
                 uint8_t* p, float* a, int64_t isa) {
  try {
    bool identity = true;
    for (int j = 0; j < 16; ++j) identity &= (ord[j] == j);
    const int64_t full = n / blocksize;
    at::parallel_for(0, full, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
      quant_full_blocks(x, mid, blocksize, b0, b1, p, a, isa);
    });
    if (!identity) {  // bucket index -> code index, for the full blocks written so far
      uint8_t lut[256];
      for (int v = 0; v < 256; ++v) lut[v] = static_cast<uint8_t>((ord[v >> 4] << 4) | ord[v & 0x0F]);
      const int64_t nbytes = full * blocksize / 2;
      at::parallel_for(0, nbytes, 1 << 16, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) p[k] = lut[p[k]];
      });
    }
    const int64_t tail = full * blocksize;
    if (tail < n) {
      const int64_t m = n - tail;
      std::vector<uint8_t> q(m + 1);
      a[full] = quant_block_scalar(x, tail, n, true, mid, q.data());
      q[m] = bucket_scalar(0.f, mid);  // odd count: pad with the code of 0.0
      for (int64_t i = 0; i < m; i += 2)
        p[(tail + i) >> 1] = static_cast<uint8_t>((ord[q[i]] << 4) | ord[q[i + 1]]);
    }
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // extern "C"
