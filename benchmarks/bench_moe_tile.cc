// The MoE op's fc1 product on one core, outside ONNX Runtime: w1 read in place (the op's way, broadcast from
// 8 rows 3 KB apart) against w1 packed once into 8-row micro-panels (the 8 broadcasts of a k-step in one
// 32-byte run), interleaved per round. It answers whether a packed weight copy (+0.9 GB at full size) would
// pay; the op itself never packs (custom_ops/README.md, "Kernel").
//
// Build and run (the op's source is included whole, so the harness times exactly its Tile and Activate):
//   INC=$(python -c 'from nomic_export import custom_ops as c; print(c.find_ort_include_dir())')
//   g++ -O3 -std=c++17 -fopenmp-simd -I"$INC" benchmarks/bench_moe_tile.cc -o /tmp/bench_moe_tile
//   /tmp/bench_moe_tile 256
// The argument is the tokens per expert (the full model at 32x128 gives ~1024 per expert, in chunks of <= 480).

#include "../custom_ops/moe_op.cc"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

using nomic_moe::Activate;
using nomic_moe::Activation;
using nomic_moe::kFc1Depth;
using nomic_moe::kFc1TaskRows;
using nomic_moe::kTileCols;
using nomic_moe::kTileRows;
using nomic_moe::Layout;
using nomic_moe::RoundUp;
using nomic_moe::Tile;

constexpr size_t kHidden = 768, kFfn = 3072, kExperts = 8, kRounds = 7;

// One fc1 pass over every expert, as the op's fc1 tasks run it (tasks of kFc1TaskRows rows of w1, token panels
// of 48, K blocks of kFc1Depth, activation, 8-token output panels). Returns seconds.
double Fc1Pass(bool packed, const std::vector<float>& w1, const std::vector<float>& w1_packed,
               const std::vector<float>& xt, std::vector<float>& panels, size_t tokens) {
  const size_t H = kHidden, F = kFfn, padded = RoundUp(tokens, kTileCols);
  alignas(64) float tile[kFc1TaskRows * kTileCols];
  const auto start = std::chrono::steady_clock::now();
  for (size_t e = 0; e < kExperts; ++e) {
    for (size_t f_begin = 0; f_begin < F; f_begin += kFc1TaskRows) {
      for (size_t m0 = 0; m0 < padded; m0 += kTileCols) {
        const size_t cols = std::min(kTileCols, RoundUp(tokens - m0, 16));
        for (size_t k0 = 0; k0 < H; k0 += kFc1Depth) {
          for (size_t f0 = f_begin; f0 < f_begin + kFc1TaskRows; f0 += kTileRows) {
            float* out = tile + (f0 - f_begin) * kTileCols;
            const float* x_block = xt.data() + m0 * H + k0 * kTileCols;
            if (packed) {  // panel (f0 / 8) holds rows f0..f0+7 as [h][8]: a_row = 1, a_k = 8, like fc2's token panels
              Tile<Layout::kWeightB>(w1_packed.data() + (e * F + f0) * H + k0 * kTileRows, x_block, kTileCols,
                                     kFc1Depth, kTileRows, cols, out, kTileCols, k0 > 0);
            } else {
              Tile<Layout::kWeightA>(w1.data() + (e * F + f0) * H + k0, x_block, H, kFc1Depth, kTileRows, cols, out,
                                     kTileCols, k0 > 0);
            }
          }
        }
        for (size_t f = 0; f < kFc1TaskRows; ++f) {
          float* t = tile + f * kTileCols;
          Activate(Activation::kGelu, t, cols);
          for (size_t j = 0; j < cols; j += 8) {
            std::memcpy(panels.data() + (m0 + j) * F + (f_begin + f) * 8, t + j, 8 * sizeof(float));
          }
        }
      }
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  const long tokens = argc > 1 ? std::atol(argv[1]) : 256;
  if (tokens < 16 || tokens > 4096) {
    std::fprintf(stderr, "tokens per expert is %ld; give 16..4096 (the op takes a dot-product path below 17)\n", tokens);
    return 2;
  }
  const size_t H = kHidden, F = kFfn, M = static_cast<size_t>(tokens), padded = RoundUp(M, kTileCols);
  std::vector<float> w1(kExperts * F * H), w1_packed(w1.size()), xt(padded * H), panels(padded * F);
  for (size_t i = 0; i < w1.size(); ++i) w1[i] = 0.001f * static_cast<float>(i % 97) - 0.05f;
  for (size_t i = 0; i < xt.size(); ++i) xt[i] = 0.01f * static_cast<float>(i % 89) - 0.4f;
  for (size_t r = 0; r < kExperts * F; ++r) {  // row r of all experts' w1 -> panel r / 8, lane r % 8
    for (size_t h = 0; h < H; ++h) w1_packed[(r / kTileRows * H + h) * kTileRows + r % kTileRows] = w1[r * H + h];
  }
  const double flop = 2.0 * kExperts * F * H * M;
  std::vector<double> in_place, packed, ratio;
  // warm-up, and both ways must give the same h (same products, same order): else the timing means nothing
  Fc1Pass(false, w1, w1_packed, xt, panels, M);
  const std::vector<float> expected = panels;
  Fc1Pass(true, w1, w1_packed, xt, panels, M);
  float worst = 0.0f;
  for (size_t i = 0; i < panels.size(); ++i) worst = std::max(worst, std::abs(panels[i] - expected[i]));
  if (worst > 0.0f) {
    std::fprintf(stderr, "packed and in-place fc1 differ by up to %g; the harness is wrong\n", worst);
    return 1;
  }
  for (size_t round = 0; round < kRounds; ++round) {
    in_place.push_back(Fc1Pass(false, w1, w1_packed, xt, panels, M));
    packed.push_back(Fc1Pass(true, w1, w1_packed, xt, panels, M));
    ratio.push_back(in_place.back() / packed.back());
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::sort(ratio.begin(), ratio.end());
  std::printf("fc1, %zu experts x %zu tokens, one core, median of %zu interleaved rounds:\n", kExperts, M, kRounds);
  std::printf("  w1 in place  %6.1f GFLOP/s\n", flop / median(in_place) / 1e9);
  std::printf("  w1 packed    %6.1f GFLOP/s\n", flop / median(packed) / 1e9);
  std::printf("  packed speed-up per round: min %.2fx, median %.2fx, max %.2fx\n", ratio.front(), ratio[ratio.size() / 2],
              ratio.back());
  return 0;
}
