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
// Dispatch: route every token, group (token, weight) pairs by expert with a counting sort, then per
// expert with tokens: gather its rows into a contiguous block, run Gemm(block, w1[e], transB=1), the
// activation and MatMul(., w2[e]) as ORT's own CPU kernels (MLAS, on the session's intra-op pool),
// and scale + scatter-add the block back. Experts with no tokens cost nothing. The row loops run on
// KernelContext::ParallelFor; scratch comes from the kernel context's allocator, once per call.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// ---- small blocks: ORT's MatMul packs the whole weight for every call, which at a few rows costs more
// than the product; these stream each weight row once instead. Compiled for AVX-512, AVX2 and baseline,
// picked at load time (ifunc), so the library runs on any x86-64. ----

constexpr size_t kSmallRows = 16;  // blocks with at most this many rows take the streaming path

// out[m, f] = sum_h x[m, h] w[f, h] for f in [f0, f1); x (M, H), w (F, H), out (M, F)
__attribute__((target_clones("avx512f", "avx2,fma", "default")))
void StreamGemmNT(const float* x, size_t M, const float* w, size_t H, size_t F, size_t f0, size_t f1, float* out) {
  for (size_t f = f0; f < f1; ++f) {
    const float* wr = w + f * H;
    for (size_t m = 0; m < M; ++m) {
      const float* xr = x + m * H;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (size_t h = 0; h < H; ++h) acc += xr[h] * wr[h];
      out[m * F + f] = acc;
    }
  }
}

// out[m, h] = sum_f a[m, f] w[f, h] for h in [h0, h1); a (M, F), w (F, H), out (M, H)
__attribute__((target_clones("avx512f", "avx2,fma", "default")))
void StreamGemmNN(const float* a, size_t M, const float* w, size_t F, size_t H, size_t h0, size_t h1, float* out) {
  for (size_t m = 0; m < M; ++m) std::fill(out + m * H + h0, out + m * H + h1, 0.0f);
  for (size_t f = 0; f < F; ++f) {
    const float* wr = w + f * H;
    for (size_t m = 0; m < M; ++m) {
      const float g = a[m * F + f];
      float* o = out + m * H;
#pragma omp simd
      for (size_t h = h0; h < h1; ++h) o[h] += g * wr[h];
    }
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

Ort::Value WrapFloat(float* data, std::initializer_list<int64_t> shape) {
  static const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
  size_t count = 1;
  for (int64_t d : shape) count *= static_cast<size_t>(d);
  return Ort::Value::CreateTensor<float>(cpu, data, count, shape.begin(), shape.size());
}

template <class T>
struct MoEKernel {
  MoEKernel(const OrtKernelInfo* info) {
    Attributes attrs = ReadAttributes(info);
    CheckStaticInputs(info, attrs.top_k);
    top_k_ = attrs.top_k;
    normalize_ = attrs.normalize != 0;
    activation_ = ParseActivation(attrs.activation);

    const char* type_names[] = {"T"};
    const ONNXTensorElementDataType float_type[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    // An invoked kernel sees no schema defaults: every attribute it reads must be given.
    const int64_t zero = 0, one = 1;
    const float unit = 1.0f;
    Ort::OpAttr gemm_attrs[] = {
        Ort::OpAttr("transA", &zero, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
        Ort::OpAttr("transB", &one, 1, OrtOpAttrType::ORT_OP_ATTR_INT),
        Ort::OpAttr("alpha", &unit, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT),
        Ort::OpAttr("beta", &unit, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT),
    };
    gemm_w1_ = Ort::Op::Create(info, "Gemm", "", 13, type_names, float_type, 1, gemm_attrs, 4, 2, 1);
    matmul_w2_ = Ort::Op::Create(info, "MatMul", "", 13, type_names, float_type, 1, nullptr, 0, 2, 1);
    switch (activation_) {
      case Activation::kGelu:  // MLAS erf: exact GELU, as the checkpoint's activation_function "gelu"
        act_ = Ort::Op::Create(info, "Gelu", "com.microsoft", 1, type_names, float_type, 1, nullptr, 0, 1, 1);
        break;
      case Activation::kGeluTanh:
        act_ = Ort::Op::Create(info, "FastGelu", "com.microsoft", 1, type_names, float_type, 1, nullptr, 0, 1, 1);
        break;
      case Activation::kSilu: {  // QuickGelu(alpha=1) is x * sigmoid(x)
        const float alpha = 1.0f;
        Ort::OpAttr a("alpha", &alpha, 1, OrtOpAttrType::ORT_OP_ATTR_FLOAT);
        act_ = Ort::Op::Create(info, "QuickGelu", "com.microsoft", 1, type_names, float_type, 1, &a, 1, 1, 1);
        break;
      }
    }
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
    Scratch route_scratch(allocator, (E * H + N * E + route_chunks * H) * sizeof(float) +
                                         N * k * (2 * sizeof(int32_t) + 2 * sizeof(float)) +
                                         (2 * E + 2) * sizeof(size_t));
    size_t* offset = static_cast<size_t*>(route_scratch.data);         // (E + 1,)
    size_t* cursor = offset + E + 1;                                  // (E + 1,)
    float* router_f = reinterpret_cast<float*>(cursor + E + 1);       // (E, H)
    float* probs = router_f + E * H;                                  // (N, E)
    float* x_rows = probs + N * E;                                    // (chunks, H): fp16 rows in fp32
    float* top_w = x_rows + route_chunks * H;                         // (N, k)
    float* rows_weight = top_w + N * k;                               // (N k,) grouped by expert
    int32_t* top_idx = reinterpret_cast<int32_t*>(rows_weight + N * k);  // (N, k)
    int32_t* rows_token = top_idx + N * k;                            // (N k,) grouped by expert
    ToFloat(router, router_f, E * H);

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
        float max_logit = -INFINITY;
        for (size_t e = 0; e < E; ++e) {
          const float* r = router_f + e * H;
          float acc = 0.0f;
          for (size_t h = 0; h < H; ++h) acc += xn[h] * r[h];
          pr[e] = acc;
          max_logit = std::max(max_logit, acc);
        }
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

    // ---- group (token, weight) pairs by expert: counting sort ----
    std::fill(offset, offset + E + 1, size_t{0});
    for (size_t i = 0; i < N * k; ++i) ++offset[top_idx[i] + 1];
    for (size_t e = 0; e < E; ++e) offset[e + 1] += offset[e];
    std::copy(offset, offset + E + 1, cursor);
    for (size_t n = 0; n < N; ++n) {
      for (size_t j = 0; j < k; ++j) {
        const size_t slot = cursor[top_idx[n * k + j]]++;
        rows_token[slot] = static_cast<int32_t>(n);
        rows_weight[slot] = top_w[n * k + j];
      }
    }
    size_t max_rows = 0;
    for (size_t e = 0; e < E; ++e) max_rows = std::max(max_rows, offset[e + 1] - offset[e]);

    // ---- scratch, phase 2: x block (M, H), hidden (M, F) x2, y block (M, H); fp16 adds fp32 weights, y ----
    const size_t block_floats = max_rows * H + 2 * max_rows * F + max_rows * H;
    const size_t half_floats = kHalf ? (2 * F * H + N * H) : 0;
    Scratch scratch(allocator, (block_floats + half_floats) * sizeof(float));
    float* x_block = static_cast<float*>(scratch.data);
    float* hidden = x_block + max_rows * H;
    float* activated = hidden + max_rows * F;
    float* y_block = activated + max_rows * F;
    float* w1_f = y_block + max_rows * H;
    float* w2_f = w1_f + (kHalf ? F * H : 0);
    float* y_acc = kHalf ? w2_f + F * H : reinterpret_cast<float*>(y_out);

    // y = bias (once per token) or 0
    ParallelRows(ctx, N, H, [&](size_t n) {
      float* yr = y_acc + n * H;
      if (bias != nullptr) {
        ToFloat(bias, yr, H);
      } else {
        std::fill(yr, yr + H, 0.0f);
      }
    });

    for (size_t e = 0; e < E; ++e) {
      const size_t begin = offset[e], M = offset[e + 1] - offset[e];
      if (M == 0) continue;
      const int32_t* tokens = rows_token + begin;
      const float* weights = rows_weight + begin;
      ParallelRows(ctx, M, H, [&](size_t r) { ToFloat(x + static_cast<size_t>(tokens[r]) * H, x_block + r * H, H); });
      const float* w1_e;
      const float* w2_e;
      if constexpr (kHalf) {
        ParallelRows(ctx, 2 * F, H, [&](size_t r) {
          if (r < F) {
            ToFloat(w1 + (e * F + r) * H, w1_f + r * H, H);
          } else {
            ToFloat(w2 + (e * F + r - F) * H, w2_f + (r - F) * H, H);
          }
        });
        w1_e = w1_f;
        w2_e = w2_f;
      } else {
        w1_e = w1 + e * F * H;
        w2_e = w2 + e * F * H;
      }
      const int64_t m = static_cast<int64_t>(M), f = static_cast<int64_t>(F), h = static_cast<int64_t>(H);
      // ORT's kernels only read their inputs; the casts drop const for the tensor wrappers.
      Ort::Value x_v = WrapFloat(x_block, {m, h});
      Ort::Value w1_v = WrapFloat(const_cast<float*>(w1_e), {f, h});
      Ort::Value hidden_v = WrapFloat(hidden, {m, f});
      Ort::Value act_v = WrapFloat(activated, {m, f});
      Ort::Value w2_v = WrapFloat(const_cast<float*>(w2_e), {f, h});
      Ort::Value y_v = WrapFloat(y_block, {m, h});
      const bool small = M <= kSmallRows;
      if (small) {
        constexpr size_t kCols = 32;
        ParallelFor(ctx, (F + kCols - 1) / kCols, [&](size_t c) {
          StreamGemmNT(x_block, M, w1_e, H, F, c * kCols, std::min(F, (c + 1) * kCols), hidden);
        });
      } else {
        const OrtValue* in[] = {x_v, w1_v};
        OrtValue* out[] = {hidden_v};
        gemm_w1_.Invoke(context, in, 2, out, 1);  // (M, H) x (F, H)^T -> (M, F)
      }
      {
        const OrtValue* in[] = {hidden_v};
        OrtValue* out[] = {act_v};
        act_.Invoke(context, in, 1, out, 1);
      }
      if (small) {
        constexpr size_t kCols = 128;
        ParallelFor(ctx, (H + kCols - 1) / kCols, [&](size_t c) {
          StreamGemmNN(activated, M, w2_e, F, H, c * kCols, std::min(H, (c + 1) * kCols), y_block);
        });
      } else {
        const OrtValue* in[] = {act_v, w2_v};
        OrtValue* out[] = {y_v};
        matmul_w2_.Invoke(context, in, 2, out, 1);  // (M, F) x (F, H) -> (M, H)
      }
      // Each token appears at most once per expert, so the rows of one expert never collide.
      ParallelRows(ctx, M, H, [&](size_t r) {
        float* dst = y_acc + static_cast<size_t>(tokens[r]) * H;
        const float* src = y_block + r * H;
        const float g = weights[r];
        for (size_t i = 0; i < H; ++i) dst[i] += g * src[i];
      });
    }
    if constexpr (kHalf) {
      ParallelRows(ctx, N, H, [&](size_t n) { FromFloat(y_acc + n * H, y_out + n * H, H); });
    }
  }

  int64_t top_k_;
  bool normalize_;
  Activation activation_;
  Ort::Op gemm_w1_{nullptr};
  Ort::Op matmul_w2_{nullptr};
  Ort::Op act_{nullptr};
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
