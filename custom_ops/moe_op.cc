// com.nomic::MoE (version 1): top-k mixture-of-experts FFN with true sparse dispatch, for ONNX Runtime.
//
// The op's specification is custom_ops/README.md; nomic_export/custom_ops/__init__.py defines the same
// domain, op name, version and attribute names in Python. Semantics (numpy-like, shapes in comments):
//
//   x      = X.reshape(N, H)                               # (N, H), N = prod(X.shape[:-1])
//   logits = x.astype(f32) @ router.astype(f32).T          # (N, E)   routing always in fp32
//   p      = softmax(logits, axis=-1)                      # (N, E)
//   idx    = top_k indices of p per row (ties: lower e)    # (N, k)   distinct experts
//   w      = take_along_axis(p, idx)                       # (N, k)   raw probabilities
//   if normalize_routing_weights: w /= w.sum(-1, keepdims=True)
//   for n, j: y[n] += w[n, j] * act(x[n] @ w1[e].T) @ w2[e]   where e = idx[n, j]
//                                                          # w1[e], w2[e]: (F, H); act(...): (F,)
//   y += bias                                              # once per token, unscaled; (H,) if given
//   Y  = y.reshape(X.shape)                                # fp16 inputs: computed in fp32, rounded once
//
// act: "gelu" = 0.5 x (1 + erf(x / sqrt 2)); "gelu_tanh" = the tanh approximation; "silu" = x sigmoid(x).
//
// Dispatch: route every token; then per wave of up to 2048 tokens, group the (token, expert) pairs by
// expert with a counting sort, cut each expert's rows into chunks of at most 480, and run each phase as one
// parallel loop over all chunks: gather x^T, h = act(w1[e] . x^T), y_e = h . w2[e] (one row per pair),
// then Y[n] = bias + sum_j w[n, j] y_e[pair (n, j)]. The GEMMs are this file's register-tiled kernel, which
// reads the weights in place, with no packed copy (see Tile). Experts with no tokens cost nothing. All
// loops run on the session's intra-op pool (KernelContext::ParallelFor); scratch comes from the kernel
// context's allocator, twice per call. custom_ops/README.md ("Kernel") says why each layout is as it is.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace nomic_moe {

// Defined once here and once in nomic_export/custom_ops/__init__.py; keep them in agreement.
constexpr const char* kDomain = "com.nomic";
constexpr const char* kOpType = "MoE";
constexpr int kOpVersion = 1;
constexpr const char* kAttrTopK = "top_k";
constexpr const char* kAttrActivation = "activation";
constexpr const char* kAttrNormalize = "normalize_routing_weights";
constexpr int64_t kDefaultTopK = 2;
constexpr const char* kDefaultActivation = "gelu";
constexpr int64_t kDefaultNormalize = 0;
// API 21 = ORT 1.21: the oldest runtime whose headers we build against (SPEC.md section 4).
constexpr uint32_t kMinOrtApi = 21;

constexpr const char* kInputNames[] = {"X", "router_weight", "w1", "w2", "bias"};
constexpr size_t kNumInputs = 5;

enum class Activation { kGelu, kGeluTanh, kSilu };

[[noreturn]] void Fail(const std::string& message) {
  throw Ort::Exception(std::string(kDomain) + "::" + kOpType + ": " + message, ORT_INVALID_ARGUMENT);
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

Activation ParseActivation(const std::string& name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  Fail("attribute 'activation' is '" + name + "'; expected one of 'gelu', 'gelu_tanh', 'silu'");
}

// ---- fp16 <-> fp32 rows: F16C when the CPU has it, a portable scalar path otherwise ----

__attribute__((target("avx,f16c"))) void HalfToFloatF16c(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx,f16c"))) void FloatToHalfF16c(const float* src, uint16_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

const bool kHasF16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");

void ToFloat(const float* src, float* dst, size_t n) { std::memcpy(dst, src, n * sizeof(float)); }
void ToFloat(const Ort::Float16_t* src, float* dst, size_t n) {
  if (kHasF16c) return HalfToFloatF16c(reinterpret_cast<const uint16_t*>(src), dst, n);
  for (size_t i = 0; i < n; ++i) dst[i] = src[i].ToFloat();
}
void FromFloat(const float* src, float* dst, size_t n) { std::memcpy(dst, src, n * sizeof(float)); }
void FromFloat(const float* src, Ort::Float16_t* dst, size_t n) {
  if (kHasF16c) return FloatToHalfF16c(src, reinterpret_cast<uint16_t*>(dst), n);
  for (size_t i = 0; i < n; ++i) dst[i] = Ort::Float16_t(src[i]);
}
inline float ScalarToFloat(float v) { return v; }
inline float ScalarToFloat(Ort::Float16_t v) { return v.ToFloat(); }

// Runs fn(i) for i in [0, total) on ORT's intra-op thread pool.
template <class Fn>
void ParallelFor(const Ort::KernelContext& ctx, size_t total, Fn&& fn) {
  if (total == 0) return;
  if (total == 1) return fn(size_t{0});
  using FnT = std::remove_reference_t<Fn>;
  ctx.ParallelFor([](void* data, size_t i) { (*static_cast<FnT*>(data))(i); }, total, 0, &fn);
}

// Splits `rows` rows of `row_cost` flops each into chunks worth a pool dispatch.
inline size_t ChunkRows(size_t rows, size_t row_cost) {
  constexpr size_t kMinChunkCost = size_t{1} << 16;
  return std::max<size_t>(1, std::min(rows, kMinChunkCost / std::max<size_t>(row_cost, 1) + 1));
}

template <class Fn>
void ParallelRows(const Ort::KernelContext& ctx, size_t rows, size_t row_cost, Fn&& fn) {
  const size_t chunk = ChunkRows(rows, row_cost);
  const size_t chunks = (rows + chunk - 1) / chunk;
  ParallelFor(ctx, chunks, [&](size_t c) {
    const size_t end = std::min(rows, (c + 1) * chunk);
    for (size_t r = c * chunk; r < end; ++r) fn(r);
  });
}

// One scratch block from the kernel context's allocator, freed when the call ends.
struct Scratch {
  OrtAllocator* allocator = nullptr;
  void* data = nullptr;
  Scratch(OrtAllocator* a, size_t bytes) : allocator(a) {
    data = allocator->Alloc(allocator, std::max<size_t>(bytes, 64));
    if (data == nullptr) throw Ort::Exception("com.nomic::MoE: scratch allocation failed", ORT_FAIL);
  }
  ~Scratch() { allocator->Free(allocator, data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---- activations: branch-free, so that the loops over a tile vectorise (target_clones below) ----

// exp(x), Cephes expf: range reduction by ln 2 in two parts, degree-5 polynomial, ~1 ulp on [-87, 88]
// (clamped there, so 2^n stays a normal float).
inline float ExpApprox(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r -= n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// erf(x) as x P(x^2) / Q(x^2) on [-4, 4] (|erf| rounds to 1 outside), the rational approximation of
// Eigen / XLA (ErfImpl32); max-abs error 4e-7 against math.erf (checked in numpy over [-6, 6]).
inline float ErfApprox(float x) {
  x = std::min(std::max(x, -4.0f), 4.0f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

__attribute__((target_clones("avx512f", "avx2,fma", "default")))
void Activate(Activation act, float* v, size_t n) {
  switch (act) {
    case Activation::kGelu:
#pragma omp simd
      for (size_t i = 0; i < n; ++i) v[i] = 0.5f * v[i] * (1.0f + ErfApprox(v[i] * 0.70710678118654752f));
      break;
    case Activation::kGeluTanh:  // tanh(u) = 1 - 2 / (exp(2u) + 1)
#pragma omp simd
      for (size_t i = 0; i < n; ++i) {
        const float u = 0.79788456080286536f * (v[i] + 0.044715f * v[i] * v[i] * v[i]);
        v[i] = 0.5f * v[i] * (2.0f - 2.0f / (ExpApprox(2.0f * u) + 1.0f));
      }
      break;
    case Activation::kSilu:
#pragma omp simd
      for (size_t i = 0; i < n; ++i) v[i] = v[i] / (1.0f + ExpApprox(-v[i]));
      break;
  }
}

// ---- the expert GEMMs: one register-tiled micro-kernel, no packing of the weights ----
//
// tile[i][j] = sum_k a[i * a_row + k * a_k] * b[k * ldb + j]   for i < rows <= kTileRows, j < cols <= kTileCols
//
// `a` is broadcast one element at a time and `b` is loaded as vectors, so either operand can be a weight
// matrix read in place, in the checkpoint's [F, H] layout (Layout below):
//   fc1  h^T (F, M) = w1[e] (F, H) . x^T (H, M):  a = w1[e] rows (a_row = H, a_k = 1), b = x^T in 48-token panels;
//   fc2  y   (M, F) . w2[e] (F, H) -> (M, H):     a = h in 8-token panels (a_row = 1, a_k = 8), b = w2[e] rows.
// MLAS instead packs its whole B operand per call: for a weight passed as a plain input that is a copy of
// 9.4 MB per expert and call, as costly as the product itself at a few hundred tokens.
// 8 x 48 keeps 24 of the 32 zmm registers as accumulators; per k it issues 8 broadcasts and 3 loads for
// 24 FMAs, so the FMA ports, not the loads, set the pace.
constexpr size_t kTileRows = 8;
constexpr size_t kTileCols = 48;
constexpr size_t kPrefetchLines = 4;  // fc1: lines ahead in each w1 row
constexpr size_t kPrefetchRows = 24;  // ~24 x 12 cycles ahead: enough for L2 hits and most of a trip to L3
constexpr size_t kChunkRows = 10 * kTileCols;  // rows of one expert per chunk: its x^T (H, 480) fits L2
constexpr size_t kWaveTokens = 2048;           // tokens per wave: bounds the scratch (~90 MB at full dims)
constexpr size_t kFc1TaskRows = 4 * kTileRows;  // rows of w1[e] per fc1 task
constexpr size_t kFc1Depth = 128;               // fc1 K block: 128 x 48 tokens = 24 KB of x^T, kept in L1
constexpr size_t kFc2TaskCols = 2 * kTileCols;  // columns of w2[e] per fc2 task
constexpr size_t kFc2Depth = 128;               // fc2 K block: 128 rows x 48 columns = 24 KB of w2[e], kept in L1

// One expert's rows [begin, begin + rows) of a wave, at padded token offset `pad` in the scratch panels.
struct Chunk {
  size_t e, begin, rows, pad;
};

inline size_t RoundUp(size_t n, size_t step) { return (n + step - 1) / step * step; }

// The two operand layouts, fixed at compile time so that the hot loop addresses with constants:
//   kWeightA (fc1): a = weight rows (a_row = ldw, a_k = 1), b = a token panel (ldb = kTileCols);
//   kWeightB (fc2): a = a token panel (a_row = 1, a_k = kTileRows), b = weight rows (ldb = ldw), prefetched,
//                   since rows of w2 lie 3 KB apart, a stride the hardware prefetchers do not follow.
enum class Layout { kWeightA, kWeightB };

template <int R, int C, Layout L>
__attribute__((target("avx512f"), always_inline)) inline void TileAvx512(const float* a, const float* b, size_t ldw,
                                                                         size_t K, __mmask16 last, float* out,
                                                                         size_t ldo, bool accumulate) {
  constexpr bool kWeightB = L == Layout::kWeightB;
  const size_t a_row = kWeightB ? 1 : ldw;
  constexpr size_t a_k = kWeightB ? kTileRows : 1;
  const size_t ldb = kWeightB ? ldw : kTileCols;
  // Fully unrolled (the pragmas), so that GCC keeps acc in registers instead of on the stack.
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 3
    for (int c = 0; c < C; ++c) {
      acc[i][c] = accumulate ? _mm512_maskz_loadu_ps(c + 1 < C ? __mmask16(0xFFFF) : last, out + i * ldo + 16 * c)
                             : _mm512_setzero_ps();
    }
  for (size_t k = 0; k < K; ++k, a += a_k, b += ldb) {
    if constexpr (kWeightB) {
#pragma GCC unroll 3
      for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchRows * ldb + 16 * c), _MM_HINT_T0);
    } else if (k % 16 == 0) {  // one line of each weight row every 16 steps, kPrefetchLines ahead
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(a + i * a_row + 16 * kPrefetchLines), _MM_HINT_T0);
    }
    __m512 bv[C];
#pragma GCC unroll 3
    for (int c = 0; c < C; ++c) bv[c] = c + 1 < C ? _mm512_loadu_ps(b + 16 * c) : _mm512_maskz_loadu_ps(last, b + 16 * c);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * a_row]);
#pragma GCC unroll 3
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(av, bv[c], acc[i][c]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 3
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(out + i * ldo + 16 * c, c + 1 < C ? __mmask16(0xFFFF) : last, acc[i][c]);
}

template <int R, Layout L>
__attribute__((target("avx512f"))) void TileAvx512Rows(const float* a, const float* b, size_t ldw, size_t K,
                                                       size_t cols, float* out, size_t ldo, bool accumulate) {
  const __mmask16 last = static_cast<__mmask16>(0xFFFFu >> (15 - (cols - 1) % 16));
  switch ((cols + 15) / 16) {
    case 1: return TileAvx512<R, 1, L>(a, b, ldw, K, last, out, ldo, accumulate);
    case 2: return TileAvx512<R, 2, L>(a, b, ldw, K, last, out, ldo, accumulate);
    default: return TileAvx512<R, 3, L>(a, b, ldw, K, last, out, ldo, accumulate);
  }
}

template <Layout L>
void TileAvx512Any(const float* a, const float* b, size_t ldw, size_t K, size_t rows, size_t cols, float* out,
                   size_t ldo, bool accumulate) {
  switch (rows) {
    case 1: return TileAvx512Rows<1, L>(a, b, ldw, K, cols, out, ldo, accumulate);
    case 2: return TileAvx512Rows<2, L>(a, b, ldw, K, cols, out, ldo, accumulate);
    case 3: return TileAvx512Rows<3, L>(a, b, ldw, K, cols, out, ldo, accumulate);
    case 4: return TileAvx512Rows<4, L>(a, b, ldw, K, cols, out, ldo, accumulate);
    case 5: return TileAvx512Rows<5, L>(a, b, ldw, K, cols, out, ldo, accumulate);
    case 6: return TileAvx512Rows<6, L>(a, b, ldw, K, cols, out, ldo, accumulate);
    case 7: return TileAvx512Rows<7, L>(a, b, ldw, K, cols, out, ldo, accumulate);
    default: return TileAvx512Rows<8, L>(a, b, ldw, K, cols, out, ldo, accumulate);
  }
}

// Any CPU: the same product with the tile in memory; the compiler vectorises the j loop.
__attribute__((target_clones("avx2,fma", "default")))
void TilePortable(const float* a, size_t a_row, size_t a_k, const float* b, size_t ldb, size_t K, size_t rows,
                  size_t cols, float* out, size_t ldo, bool accumulate) {
  if (!accumulate) {
    for (size_t i = 0; i < rows; ++i) std::fill(out + i * ldo, out + i * ldo + cols, 0.0f);
  }
  for (size_t k = 0; k < K; ++k, a += a_k, b += ldb) {
    for (size_t i = 0; i < rows; ++i) {
      const float av = a[i * a_row];
      float* t = out + i * ldo;
#pragma omp simd
      for (size_t j = 0; j < cols; ++j) t[j] += av * b[j];
    }
  }
}

// NOMIC_MOE_KERNEL=portable makes an AVX-512 CPU run the portable tiles too, so that tests can check them.
bool PortableRequested() {
  const char* value = std::getenv("NOMIC_MOE_KERNEL");
  return value != nullptr && std::strcmp(value, "portable") == 0;
}

const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && !PortableRequested();

// out[i * ldo + j] (+)= tile[i][j] for i < rows, j < cols; accumulate adds the product to what out holds.
template <Layout L>
void Tile(const float* a, const float* b, size_t ldw, size_t K, size_t rows, size_t cols, float* out, size_t ldo,
          bool accumulate) {
  if (kHasAvx512) return TileAvx512Any<L>(a, b, ldw, K, rows, cols, out, ldo, accumulate);
  if constexpr (L == Layout::kWeightB) {
    TilePortable(a, 1, kTileRows, b, ldw, K, rows, cols, out, ldo, accumulate);
  } else {
    TilePortable(a, ldw, 1, b, kTileCols, K, rows, cols, out, ldo, accumulate);
  }
}

// ---- fc1 for a few tokens: dot products along H ----
//
// tile[i][j] = a[i * H + :] . x[j * H + :]   for i < rows <= kTileRows, j < cols <= kDotCols
//
// With a handful of tokens the broadcast tile above spends one load per 16 lanes of which few are
// tokens; here each 64-byte load of a weight row serves every token, so fc1 streams w1[e] at memory speed.
constexpr size_t kDotCols = 3;    // 8 x 3 accumulators + 3 token vectors + 1 weight vector
constexpr size_t kDotRows = 16;   // chunks of at most this many rows take the dot-product path

// Sum of the 16 lanes. The maskz forms: the plain ones (and _mm512_reduce_add_ps) start from
// _mm512_undefined_*, which trips GCC 12's -Wmaybe-uninitialized inside its own header.
__attribute__((target("avx512f"), always_inline)) inline float ReduceAdd(__m512 v) {
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xFFFF, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xFFFF, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(v);
}

template <int R, int J>
__attribute__((target("avx512f"), always_inline)) inline void DotTileAvx512(const float* a, const float* x, size_t H,
                                                                            float* tile) {
  __m512 acc[R][J];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < J; ++j) acc[i][j] = _mm512_setzero_ps();
  for (size_t h = 0; h < H; h += 16) {
    const __mmask16 mask = H - h >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (H - h)) - 1);
    __m512 xv[J];
#pragma GCC unroll 3
    for (int j = 0; j < J; ++j) xv[j] = _mm512_maskz_loadu_ps(mask, x + j * H + h);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, a + i * H + h);
#pragma GCC unroll 3
      for (int j = 0; j < J; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < J; ++j) tile[i * kTileCols + j] = ReduceAdd(acc[i][j]);
}

template <int R>
__attribute__((target("avx512f"))) void DotTileAvx512Rows(const float* a, const float* x, size_t H, size_t cols,
                                                          float* tile) {
  switch (cols) {
    case 1: return DotTileAvx512<R, 1>(a, x, H, tile);
    case 2: return DotTileAvx512<R, 2>(a, x, H, tile);
    default: return DotTileAvx512<R, 3>(a, x, H, tile);
  }
}

__attribute__((target_clones("avx2,fma", "default")))
void DotTilePortable(const float* a, const float* x, size_t H, size_t rows, size_t cols, float* tile) {
  for (size_t i = 0; i < rows; ++i) {
    for (size_t j = 0; j < cols; ++j) {
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (size_t h = 0; h < H; ++h) acc += a[i * H + h] * x[j * H + h];
      tile[i * kTileCols + j] = acc;
    }
  }
}

void DotTile(const float* a, const float* x, size_t H, size_t rows, size_t cols, float* tile) {
  if (!kHasAvx512) return DotTilePortable(a, x, H, rows, cols, tile);
  switch (rows) {
    case 1: return DotTileAvx512Rows<1>(a, x, H, cols, tile);
    case 2: return DotTileAvx512Rows<2>(a, x, H, cols, tile);
    case 3: return DotTileAvx512Rows<3>(a, x, H, cols, tile);
    case 4: return DotTileAvx512Rows<4>(a, x, H, cols, tile);
    case 5: return DotTileAvx512Rows<5>(a, x, H, cols, tile);
    case 6: return DotTileAvx512Rows<6>(a, x, H, cols, tile);
    case 7: return DotTileAvx512Rows<7>(a, x, H, cols, tile);
    default: return DotTileAvx512Rows<8>(a, x, H, cols, tile);
  }
}

// y = a y + (b or 0)
__attribute__((target_clones("avx512f", "avx2,fma", "default")))
void ScaleAdd(float* y, size_t n, float a, const float* b) {
  if (b == nullptr) {
#pragma omp simd
    for (size_t i = 0; i < n; ++i) y[i] *= a;
  } else {
#pragma omp simd
    for (size_t i = 0; i < n; ++i) y[i] = a * y[i] + b[i];
  }
}

// y += a x
__attribute__((target_clones("avx512f", "avx2,fma", "default")))
void Axpy(float a, const float* x, float* y, size_t n) {
#pragma omp simd
  for (size_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Routing logits: out[e] = x . router[e], vectorised (the sum order differs from a plain loop).
__attribute__((target_clones("avx512f", "avx2,fma", "default")))
void RouterLogits(const float* x, const float* router, size_t E, size_t H, float* out) {
  for (size_t e = 0; e < E; ++e) {
    const float* r = router + e * H;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (size_t h = 0; h < H; ++h) acc += x[h] * r[h];
    out[e] = acc;
  }
}

struct Attributes {
  int64_t top_k = kDefaultTopK;
  std::string activation = kDefaultActivation;
  int64_t normalize = kDefaultNormalize;
};

// Reads attributes with their defaults; the C++ wrapper throws on a missing attribute, so ask the C API.
Attributes ReadAttributes(const OrtKernelInfo* info) {
  const OrtApi& api = Ort::GetApi();
  Attributes attrs;
  int64_t value = 0;
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, kAttrTopK, &value)) {
    api.ReleaseStatus(status);
  } else {
    attrs.top_k = value;
  }
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, kAttrNormalize, &value)) {
    api.ReleaseStatus(status);
  } else {
    attrs.normalize = value;
  }
  size_t size = 0;
  if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, kAttrActivation, nullptr, &size)) {
    api.ReleaseStatus(status);
  } else {
    std::string text(size, '\0');
    Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, kAttrActivation, text.data(), &size));
    text.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
    attrs.activation = text;
  }
  if (attrs.top_k < 1) Fail("attribute 'top_k' is " + std::to_string(attrs.top_k) + "; it must be >= 1");
  if (attrs.normalize != 0 && attrs.normalize != 1) {
    Fail("attribute 'normalize_routing_weights' is " + std::to_string(attrs.normalize) + "; it must be 0 or 1");
  }
  ParseActivation(attrs.activation);
  return attrs;
}

// Shapes of the five inputs checked against each other; `unknown` dims (< 0) are skipped, so the same
// check serves session creation (symbolic dims) and the run (concrete dims).
struct Dims {
  int64_t E = -1, F = -1, H = -1;
};

Dims CheckShapes(const std::vector<int64_t>* shapes[kNumInputs], int64_t top_k) {
  auto show = [&](size_t i) { return std::string("input ") + std::to_string(i) + " '" + kInputNames[i] + "' " + ShapeStr(*shapes[i]); };
  const auto& x = *shapes[0];
  const auto& router = *shapes[1];
  const auto& w1 = *shapes[2];
  const auto& w2 = *shapes[3];
  if (x.size() < 2) Fail(show(0) + " must have rank >= 2: [..., H]");
  if (router.size() != 2) Fail(show(1) + " must have rank 2: [E, H]");
  if (w1.size() != 3) Fail(show(2) + " must have rank 3: [E, F, H]");
  if (w2.size() != 3) Fail(show(3) + " must have rank 3: [E, F, H] (the checkpoint's layout, not [E, H, F])");
  Dims d;
  auto agree = [&](int64_t& dim, int64_t value, const char* name, size_t input) {
    if (value < 0) return;
    if (dim >= 0 && dim != value) {
      Fail(std::string("dimension ") + name + " disagrees: " + show(input) + " vs " + show(0) + ", " + show(1) +
           ", " + show(2) + ", " + show(3));
    }
    dim = value;
  };
  agree(d.H, x.back(), "H", 0);
  agree(d.E, router[0], "E", 1);
  agree(d.H, router[1], "H", 1);
  agree(d.E, w1[0], "E", 2);
  agree(d.F, w1[1], "F", 2);
  agree(d.H, w1[2], "H", 2);
  agree(d.E, w2[0], "E", 3);
  agree(d.F, w2[1], "F", 3);
  agree(d.H, w2[2], "H", 3);
  if (shapes[4] != nullptr) {
    if (shapes[4]->size() != 1) Fail(show(4) + " must have rank 1: [H]");
    agree(d.H, (*shapes[4])[0], "H", 4);
  }
  if (d.E == 0) Fail("E = 0 experts: " + show(1));
  if (d.H == 0 || d.F == 0) Fail("H and F must be > 0: " + show(2));
  if (d.E > 0 && top_k > d.E) {
    Fail("attribute 'top_k' is " + std::to_string(top_k) + " but there are only E = " + std::to_string(d.E) +
         " experts (" + show(1) + ")");
  }
  return d;
}

template <class T>
constexpr ONNXTensorElementDataType kElementType =
    std::is_same_v<T, float> ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;

std::string TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    default: return "element type " + std::to_string(static_cast<int>(type));
  }
}

template <class T>
struct MoEKernel {
  MoEKernel(const OrtKernelInfo* info) {
    Attributes attrs = ReadAttributes(info);
    CheckStaticInputs(info, attrs.top_k);
    top_k_ = attrs.top_k;
    normalize_ = attrs.normalize != 0;
    activation_ = ParseActivation(attrs.activation);

  }

  // Element types and the shapes the graph declares, checked while the session is created: ORT ignores
  // errors from a custom op's shape inference, but not from kernel creation. Unknown dims are -1.
  static void CheckStaticInputs(const OrtKernelInfo* info, int64_t top_k) {
    Ort::ConstKernelInfo kinfo(info);
    const size_t count = kinfo.GetInputCount();
    if (count < 4 || count > kNumInputs) {
      Fail("expected 4 or 5 inputs (X, router_weight, w1, w2[, bias]), got " + std::to_string(count));
    }
    std::vector<int64_t> shapes[kNumInputs];
    const std::vector<int64_t>* shape_ptrs[kNumInputs] = {};
    bool rank_known = true;
    for (size_t i = 0; i < count; ++i) {
      if (i == 4 && kinfo.GetInputName(i).empty()) continue;  // optional bias given as ""
      Ort::TypeInfo type_info = kinfo.GetInputTypeInfo(i);
      if (type_info.GetONNXType() != ONNX_TYPE_TENSOR) Fail(std::string("input '") + kInputNames[i] + "' must be a tensor");
      auto tensor_info = type_info.GetTensorTypeAndShapeInfo();
      const ONNXTensorElementDataType type = tensor_info.GetElementType();
      if (type != kElementType<T>) {
        Fail(std::string("input ") + std::to_string(i) + " '" + kInputNames[i] + "' has element type " +
             TypeName(type) + " but X has " + TypeName(kElementType<T>) + "; all inputs must share X's type");
      }
      shapes[i] = tensor_info.GetShape();
      shape_ptrs[i] = &shapes[i];
      rank_known &= tensor_info.GetDimensionsCount() > 0 || i == 4;
    }
    if (rank_known) CheckShapes(shape_ptrs, top_k);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("com.nomic::MoE: ") + e.what()).c_str());
    }
    return nullptr;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t num_inputs = ctx.GetInputCount();
    if (num_inputs < 4 || num_inputs > kNumInputs) {
      Fail("expected 4 or 5 inputs (X, router_weight, w1, w2[, bias]), got " + std::to_string(num_inputs));
    }
    Ort::ConstValue values[kNumInputs]{Ort::ConstValue{nullptr}, Ort::ConstValue{nullptr}, Ort::ConstValue{nullptr},
                                       Ort::ConstValue{nullptr}, Ort::ConstValue{nullptr}};
    std::vector<int64_t> shapes[kNumInputs];
    const std::vector<int64_t>* shape_ptrs[kNumInputs] = {};
    for (size_t i = 0; i < num_inputs; ++i) {
      values[i] = ctx.GetInput(i);
      if (!values[i]) {
        if (i < 4) Fail(std::string("input '") + kInputNames[i] + "' is missing");
        continue;
      }
      shapes[i] = values[i].GetTensorTypeAndShapeInfo().GetShape();
      shape_ptrs[i] = &shapes[i];
    }
    const Dims d = CheckShapes(shape_ptrs, top_k_);
    const size_t E = static_cast<size_t>(d.E), F = static_cast<size_t>(d.F), H = static_cast<size_t>(d.H);
    const size_t k = static_cast<size_t>(top_k_);
    size_t N = 1;
    for (size_t i = 0; i + 1 < shapes[0].size(); ++i) N *= static_cast<size_t>(shapes[0][i]);

    auto output = ctx.GetOutput(0, shapes[0]);
    if (N == 0) return;
    T* y_out = output.GetTensorMutableData<T>();
    const T* x = values[0].GetTensorData<T>();
    const T* router = values[1].GetTensorData<T>();
    const T* w1 = values[2].GetTensorData<T>();
    const T* w2 = values[3].GetTensorData<T>();
    const T* bias = values[4] ? values[4].GetTensorData<T>() : nullptr;

    // ---- scratch, phase 1 (routing): probabilities (N, E), top-k (N, k), rows grouped by expert (N k) ----
    constexpr bool kHalf = std::is_same_v<T, Ort::Float16_t>;
    Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
    OrtAllocator* allocator = ctx.GetAllocator(*cpu.GetConst());
    const size_t route_chunk = ChunkRows(N, E * H);
    const size_t route_chunks = (N + route_chunk - 1) / route_chunk;
    Scratch route_scratch(allocator, (E * H + H + N * E + route_chunks * H) * sizeof(float) +
                                         N * k * (2 * sizeof(int32_t) + 2 * sizeof(float)) +
                                         (2 * E + 2) * sizeof(size_t));
    size_t* offset = static_cast<size_t*>(route_scratch.data);         // (E + 1,)
    size_t* cursor = offset + E + 1;                                  // (E + 1,)
    float* router_f = reinterpret_cast<float*>(cursor + E + 1);       // (E, H)
    float* bias_f = router_f + E * H;                                 // (H,)
    float* probs = bias_f + H;                                        // (N, E)
    float* x_rows = probs + N * E;                                    // (chunks, H): fp16 rows in fp32
    float* top_w = x_rows + route_chunks * H;                         // (N, k)
    int32_t* top_idx = reinterpret_cast<int32_t*>(top_w + N * k);     // (N, k)
    int32_t* rows_token = top_idx + N * k;                            // (N k,) a wave's pairs by expert
    int32_t* pair_row = rows_token + N * k;                           // (N, k) row of each pair in rows_token
    ToFloat(router, router_f, E * H);
    if (bias != nullptr) ToFloat(bias, bias_f, H);

    // ---- routing, fp32: (N, E) logits -> softmax -> top-k (N, k) ----
    ParallelFor(ctx, route_chunks, [&](size_t c) {
      float* xr = x_rows + c * H;
      const size_t end = std::min(N, (c + 1) * route_chunk);
      for (size_t n = c * route_chunk; n < end; ++n) {
        const float* xn;
        if constexpr (kHalf) {
          ToFloat(x + n * H, xr, H);
          xn = xr;
        } else {
          xn = x + n * H;
        }
        float* pr = probs + n * E;
        RouterLogits(xn, router_f, E, H, pr);
        float max_logit = -INFINITY;
        for (size_t e = 0; e < E; ++e) max_logit = std::max(max_logit, pr[e]);
        float total = 0.0f;
        for (size_t e = 0; e < E; ++e) total += (pr[e] = std::exp(pr[e] - max_logit));
        for (size_t e = 0; e < E; ++e) pr[e] /= total;
        // Selection that always yields k distinct, in-range experts, even if p holds NaN.
        int32_t* idx = top_idx + n * k;
        float* w = top_w + n * k;
        float picked_sum = 0.0f;
        for (size_t j = 0; j < k; ++j) {
          int32_t best = -1;
          for (size_t e = 0; e < E; ++e) {
            bool taken = false;
            for (size_t i = 0; i < j; ++i) taken |= idx[i] == static_cast<int32_t>(e);
            if (!taken && (best < 0 || pr[e] > pr[best])) best = static_cast<int32_t>(e);
          }
          idx[j] = best;
          w[j] = pr[best];
          picked_sum += pr[best];
        }
        if (normalize_) {
          for (size_t j = 0; j < k; ++j) w[j] /= picked_sum;
        }
      }
    });

    // ---- experts, in waves of tokens (bounds the scratch; each wave reads the used weights once) ----
    const size_t wave_max = std::min(N, kWaveTokens);
    const size_t half_floats = kHalf ? 2 * F * H : 0;
    const size_t max_chunks = wave_max * k / kChunkRows + E;
    const size_t pad_max = wave_max * k + max_chunks * kTileCols;  // each chunk pads to whole 48-token panels
    Scratch scratch(allocator, max_chunks * sizeof(Chunk) +
                                   (pad_max * (H + F) + wave_max * k * H + half_floats) * sizeof(float));
    Chunk* chunks = static_cast<Chunk*>(scratch.data);
    float* xt = reinterpret_cast<float*>(chunks + max_chunks);  // (pad, H) as 48-token panels (pad / 48, H, 48)
    float* panels = xt + pad_max * H;              // (pad, F) as 8-token panels (pad / 8, F, 8), activated
    float* y_rows = panels + pad_max * F;           // (wave k, H) each pair's expert output, unscaled
    float* w1_f = y_rows + wave_max * k * H;        // fp16: one expert's weights in fp32
    float* w2_f = w1_f + (kHalf ? F * H : 0);

    for (size_t n0 = 0; n0 < N; n0 += wave_max) {
      const size_t n1 = std::min(N, n0 + wave_max);
      // group the wave's (token, expert) pairs by expert: counting sort
      std::fill(offset, offset + E + 1, size_t{0});
      for (size_t i = n0 * k; i < n1 * k; ++i) ++offset[top_idx[i] + 1];
      for (size_t e = 0; e < E; ++e) offset[e + 1] += offset[e];
      std::copy(offset, offset + E + 1, cursor);
      for (size_t n = n0; n < n1; ++n) {
        for (size_t j = 0; j < k; ++j) {
          const size_t row = cursor[top_idx[n * k + j]]++;
          rows_token[row] = static_cast<int32_t>(n);
          pair_row[n * k + j] = static_cast<int32_t>(row);
        }
      }
      // fp32 runs all experts in one pass of each phase (few pool dispatches, balanced across experts);
      // fp16 converts and runs one expert at a time, so its fp32 weight copy stays one expert's.
      const size_t group = kHalf ? 1 : E;
      for (size_t e0 = 0; e0 < E; e0 += group) {
        const size_t e1 = std::min(E, e0 + group);
        size_t num_chunks = 0, pad = 0;
        for (size_t e = e0; e < e1; ++e) {
          // equal chunks: 512 rows are 2 x 256, not 480 + a 32-row chunk that rereads the weights for little
          const size_t count = offset[e + 1] - offset[e], parts = (count + kChunkRows - 1) / kChunkRows;
          for (size_t part = 0; part < parts; ++part) {
            const size_t begin = offset[e] + count * part / parts, end = offset[e] + count * (part + 1) / parts;
            chunks[num_chunks++] = Chunk{e, begin, end - begin, pad};
            pad += RoundUp(end - begin, kTileCols);
          }
        }
        if (num_chunks == 0) continue;
        if constexpr (kHalf) {
          ParallelRows(ctx, 2 * F, H, [&](size_t r) {
            if (r < F) {
              ToFloat(w1 + (e0 * F + r) * H, w1_f + r * H, H);
            } else {
              ToFloat(w2 + (e0 * F + r - F) * H, w2_f + (r - F) * H, H);
            }
          });
        }
        auto expert_w1 = [&](size_t e) -> const float* { if constexpr (kHalf) return w1_f; else return w1 + e * F * H; };
        auto expert_w2 = [&](size_t e) -> const float* { if constexpr (kHalf) return w2_f; else return w2 + e * F * H; };

        // x^T: each chunk's rows gathered and transposed into 48-token panels (H, 48), zero-padded, so a
        // fc1 tile reads its tokens as one contiguous stream
        ParallelFor(ctx, pad / kTileCols, [&](size_t p) {
          const size_t m0 = p * kTileCols;
          const Chunk* c = std::upper_bound(chunks, chunks + num_chunks, m0,
                                            [](size_t m, const Chunk& ch) { return m < ch.pad; }) - 1;
          float* dst = xt + m0 * H;
          if (c->rows <= kDotRows) {  // a small chunk: one panel, its rows kept as rows for DotTile
            for (size_t r = 0; r < c->rows; ++r) ToFloat(x + static_cast<size_t>(rows_token[c->begin + r]) * H, dst + r * H, H);
            return;
          }
          for (size_t m = 0; m < kTileCols; ++m) {
            const size_t r = m0 + m - c->pad;
            if (r >= c->rows) {
              for (size_t h = 0; h < H; ++h) dst[h * kTileCols + m] = 0.0f;
              continue;
            }
            const T* xr = x + static_cast<size_t>(rows_token[c->begin + r]) * H;
            for (size_t h = 0; h < H; ++h) dst[h * kTileCols + m] = ScalarToFloat(xr[h]);
          }
        });

        // fc1 + activation: panels[m / 8][f][m % 8] = act(x[m] . w1[e][f]). A task owns kFc1TaskRows rows
        // of w1[e] for one chunk; they stay in L2 while the chunk's tokens sweep past (the tile prefetches
        // each row a few lines ahead), so w1[e] is read from memory once per chunk.
        const size_t fc1_groups = (F + kFc1TaskRows - 1) / kFc1TaskRows;
        ParallelFor(ctx, num_chunks * fc1_groups, [&](size_t task) {
          const Chunk& c = chunks[task / fc1_groups];
          const float* w1_e = expert_w1(c.e);
          const size_t mp = RoundUp(c.rows, kTileCols);
          const size_t f_begin = task % fc1_groups * kFc1TaskRows, f_end = std::min(F, f_begin + kFc1TaskRows);
          alignas(64) float tile[kFc1TaskRows * kTileCols];
          if (c.rows <= kDotRows) {
            for (size_t f0 = f_begin; f0 < f_end; f0 += kTileRows) {
              const size_t rows = std::min(kTileRows, f_end - f0);
              for (size_t m0 = 0; m0 < c.rows; m0 += kDotCols) {
                const size_t cols = std::min(kDotCols, c.rows - m0);
                DotTile(w1_e + f0 * H, xt + (c.pad + m0) * H, H, rows, cols, tile);
                for (size_t i = 0; i < rows; ++i) {
                  Activate(activation_, tile + i * kTileCols, cols);
                  for (size_t j = 0; j < cols; ++j) {
                    const size_t m = c.pad + m0 + j;
                    panels[(m / 8 * F + f0 + i) * 8 + m % 8] = tile[i * kTileCols + j];
                  }
                }
              }
            }
            return;
          }
          // whole vectors of tokens: the zero padding beyond c.rows is computed, not the empty vectors.
          // K is cut into blocks so that one block of the token panel stays in L1 while every tile of the
          // task's w1 rows reads it; the task's tiles accumulate in `tile` until the last block.
          for (size_t m0 = c.pad; m0 < c.pad + mp; m0 += kTileCols) {
            const size_t cols = std::min(kTileCols, RoundUp(c.pad + c.rows - m0, 16));
            for (size_t k0 = 0; k0 < H; k0 += kFc1Depth) {
              const size_t depth = std::min(kFc1Depth, H - k0);
              for (size_t f0 = f_begin; f0 < f_end; f0 += kTileRows) {
                Tile<Layout::kWeightA>(w1_e + f0 * H + k0, xt + m0 * H + k0 * kTileCols, H, depth,
                                       std::min(kTileRows, f_end - f0), cols, tile + (f0 - f_begin) * kTileCols, kTileCols, k0 > 0);
              }
            }
            for (size_t f = f_begin; f < f_end; ++f) {
              float* t = tile + (f - f_begin) * kTileCols;
              Activate(activation_, t, cols);
              for (size_t j = 0; j < cols; j += 8) {
                std::memcpy(panels + ((m0 + j) * F + f * 8), t + j, 8 * sizeof(float));
              }
            }
          }
        });

        // fc2: y_rows[row] = h[row] . w2[e]. A task owns kFc2TaskCols columns of w2[e] for one chunk and
        // walks F in blocks of kFc2Depth rows; each block's 48 columns stay in L1 while the token panels pass.
        const size_t fc2_groups = (H + kFc2TaskCols - 1) / kFc2TaskCols;
        ParallelFor(ctx, num_chunks * fc2_groups, [&](size_t task) {
          const Chunk& c = chunks[task / fc2_groups];
          const float* w2_e = expert_w2(c.e);
          const size_t h_begin = task % fc2_groups * kFc2TaskCols, h_end = std::min(H, h_begin + kFc2TaskCols);
          for (size_t k0 = 0; k0 < F; k0 += kFc2Depth) {
            const size_t depth = std::min(kFc2Depth, F - k0);
            for (size_t h0 = h_begin; h0 < h_end; h0 += kTileCols) {
              const size_t cols = std::min(kTileCols, h_end - h0);
              for (size_t m0 = 0; m0 < c.rows; m0 += kTileRows) {
                Tile<Layout::kWeightB>(panels + (c.pad + m0) * F + k0 * 8, w2_e + k0 * H + h0, H, depth,
                                       std::min(kTileRows, c.rows - m0), cols, y_rows + (c.begin + m0) * H + h0, H, k0 > 0);
              }
            }
          }
        });
      }

      // y[n] = bias + sum_j w[n, j] y_rows[row of (n, j)]
      ParallelRows(ctx, n1 - n0, k * H, [&](size_t i) {
        const size_t n = n0 + i;
        float* acc = y_rows + static_cast<size_t>(pair_row[n * k]) * H;  // reused in place: the pair is done
        ScaleAdd(acc, H, top_w[n * k], bias != nullptr ? bias_f : nullptr);
        for (size_t j = 1; j < k; ++j) Axpy(top_w[n * k + j], y_rows + static_cast<size_t>(pair_row[n * k + j]) * H, acc, H);
        FromFloat(acc, y_out + n * H, H);
      });
    }
  }

  int64_t top_k_;
  bool normalize_;
  Activation activation_;
};

// Registered once per element type: ORT does not cast fp16 inputs for a custom op (SPEC.md section 4).
template <class T>
struct MoEOp : Ort::CustomOpBase<MoEOp<T>, MoEKernel<T>, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new MoEKernel<T>(info);
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("com.nomic::MoE: ") + e.what()).c_str());
    }
    return nullptr;
  }
  const char* GetName() const { return kOpType; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  // X picks the kernel; the other inputs accept any type, so a mismatch gets our error naming the input
  // instead of ORT's "could not find an implementation".
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? kElementType<T> : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return kElementType<T>; }

  // Static shapes are checked here, so a bad graph fails at session creation, not at the first run.
  MoEOp() {
    // Set here rather than through CustomOpBase's InferOutputShape hook, so that an exception thrown
    // while the context reads the input shapes is also turned into a status.
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ort_ctx) -> OrtStatusPtr {
      try {
        Ort::ShapeInferContext ctx(&Ort::GetApi(), ort_ctx);
        return InferShapes(ctx);
      } catch (const Ort::Exception& e) {
        return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
      } catch (const std::exception& e) {
        return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("com.nomic::MoE: ") + e.what()).c_str());
      }
    };
  }

  static OrtStatusPtr InferShapes(Ort::ShapeInferContext& ctx) {
    try {
      const size_t count = ctx.GetInputCount();
      if (count < 4 || count > kNumInputs) {
        Fail("expected 4 or 5 inputs (X, router_weight, w1, w2[, bias]), got " + std::to_string(count));
      }
      std::vector<int64_t> shapes[kNumInputs];
      const std::vector<int64_t>* shape_ptrs[kNumInputs] = {};
      std::vector<Ort::ShapeInferContext::SymbolicInteger> x_shape;
      for (size_t i = 0; i < count; ++i) {
        const auto& shape = ctx.GetInputShape(i);
        if (i == 4 && shape.empty()) continue;  // bias absent ("") or a scalar: checked at run
        for (const auto& dim : shape) shapes[i].push_back(dim.IsInt() ? dim.AsInt() : -1);
        shape_ptrs[i] = &shapes[i];
        if (i == 0) x_shape = shape;
      }
      int64_t top_k = kDefaultTopK;
      try {
        top_k = ctx.GetAttrInt(kAttrTopK);
      } catch (const Ort::Exception&) {
        // attribute absent: the default
      }
      if (shapes[0].empty()) return nullptr;  // rank unknown here; the run checks it
      CheckShapes(shape_ptrs, top_k);
      Ort::Status status = ctx.SetOutputShape(0, x_shape, kElementType<T>);
      return status.release();
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    }
  }
};

}  // namespace nomic_moe

extern "C" {

// Entry point for SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary_V2.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
  using namespace nomic_moe;
  const OrtApi* api = api_base->GetApi(kMinOrtApi);
  if (api == nullptr) {
    // API 1 exists in every runtime, so it can still report the error.
    const OrtApi* oldest = api_base->GetApi(1);
    const std::string message = std::string("libnomic_moe_ops needs ONNX Runtime >= 1.") +
                                std::to_string(kMinOrtApi) + "; this runtime is " + api_base->GetVersionString() +
                                ". Upgrade onnxruntime.";
    return oldest != nullptr ? oldest->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  static MoEOp<float> op_float;
  static MoEOp<Ort::Float16_t> op_half;
  // Domains must outlive every session that uses them; one per registration, kept for the process.
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;
  try {
    Ort::CustomOpDomain domain{kDomain};
    domain.Add(&op_float);
    domain.Add(&op_half);
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}

}  // extern "C"
