// el_reduce_probe: what holds HT combine's reduce back. One GPU, no communication: T tokens, each the sum
// of two BF16 rows (float32, the first row then the second, rounded once), written to `out`, by G blocks of
// 1024 threads whose second 16 warps reduce (the combine kernel's layout: the first half sends there).
// Variants, each the library's own device helpers:
//   copy          one row in, one out, 8 loads of 16 B per lane in flight (what the SMs can move)
//   reg-seq       the combine kernel's path: per 2 KB piece, the first row's 4 loads
//                 per lane, add, then the second row's, add
//   reg-pair      both rows' 4 loads per lane in flight before adding (8 per lane)
//   bulk-S        the bulk reduce combine had until e8bb4aa: S stages of 2 KB per warp filled by bulk (TMA)
//                 loads, lane 0 issuing, the pipeline drained at each token's end (S = 2, 6)
//   bulk-cross-6  the same with the pipeline running on across the warp's tokens
// Every output is compared bitwise with the host's sum. Times: median of 20 after an L2 flush.
// Usage: el_reduce_probe [tokens=4096] [hidden=7168]. Prints one line per (variant, blocks).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <vector>

#include "check.hpp"
#include "kernels/bulk_copy.cuh"
#include "kernels/vector_io.cuh"

namespace {

using namespace expertlink::kernels;
using expertlink::WaitRecord;

constexpr int kThreads = 1024, kWorkWarps = 16, kPiece = 2048, kMaxStages = 6;
enum Variant : int { kCopy, kRegSeq, kRegPair, kBulk, kBulkCross };

struct Args {
  const char* a;
  const char* b;
  char* out;
  int tokens;
  int64_t row_bytes;
  int stages;
  WaitContext ctx;
};

// Token j of warp w (of all reducing warps): w + j * warps.
template <int kVariant>
__global__ void __launch_bounds__(kThreads, 1) reduce_rows(Args p) {
  __shared__ uint64_t bars[kWorkWarps][kMaxStages];
  extern __shared__ __align__(128) char smem[];
  const int warp = threadIdx.x / 32 - (32 - kWorkWarps), lane = threadIdx.x % 32;
  if (warp < 0) return;  // the sending half of the combine kernel
  const int warps = gridDim.x * kWorkWarps, gw = blockIdx.x * kWorkWarps + warp;
  const int64_t vecs = p.row_bytes / 16;
  if constexpr (kVariant == kCopy || kVariant == kRegSeq || kVariant == kRegPair) {
    constexpr int kUnroll = kVariant == kCopy ? 8 : 4;
    for (int t = gw; t < p.tokens; t += warps) {
      const int4* a = reinterpret_cast<const int4*>(p.a + t * p.row_bytes);
      const int4* b = reinterpret_cast<const int4*>(p.b + t * p.row_bytes);
      int4* out = reinterpret_cast<int4*>(p.out + t * p.row_bytes);
      for (int64_t v0 = lane; v0 < vecs; v0 += 32 * kUnroll) {
        int4 va[kUnroll], vb[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (v0 + 32 * u < vecs) va[u] = ld_nc_v4(a + v0 + 32 * u);
        if constexpr (kVariant == kCopy) {
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (v0 + 32 * u < vecs) out[v0 + 32 * u] = va[u];
        } else {
          float acc[kUnroll][8] = {};
          if constexpr (kVariant == kRegPair) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
              if (v0 + 32 * u < vecs) vb[u] = ld_nc_v4(b + v0 + 32 * u);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (v0 + 32 * u < vecs) add_bf16x8(acc[u], va[u]);
          if constexpr (kVariant == kRegSeq) {
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
              if (v0 + 32 * u < vecs) vb[u] = ld_nc_v4(b + v0 + 32 * u);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (v0 + 32 * u < vecs) {
              add_bf16x8(acc[u], vb[u]);
              out[v0 + 32 * u] = to_bf16x8(acc[u]);
            }
        }
      }
    }
  } else {
    // Unit u of this warp: token gw + (u / per_token) * warps, piece (u % per_token) / 2, row u % 2.
    const int pieces = static_cast<int>((p.row_bytes + kPiece - 1) / kPiece), per_token = 2 * pieces;
    const int my_tokens = gw < p.tokens ? (p.tokens - gw + warps - 1) / warps : 0;
    char* const stage = smem + size_t(warp) * p.stages * kPiece;
    if (lane == 0)
      for (int s = 0; s < p.stages; ++s) mbar_init(&bars[warp][s]);
    __syncwarp();
    auto issue = [&](int u) {  // lane 0
      const int t = gw + (u / per_token) * warps, piece = (u % per_token) / 2;
      const char* row = ((u & 1) ? p.b : p.a) + t * p.row_bytes + int64_t(piece) * kPiece;
      const int slot = u % p.stages;
      bulk_load(stage + slot * kPiece, row,
                static_cast<uint32_t>(min(int64_t(kPiece), p.row_bytes - int64_t(piece) * kPiece)),
                &bars[warp][slot]);
    };
    const int total = my_tokens * per_token;
    int next = 0;  // next unit to issue
    for (int j = 0; j < my_tokens; ++j) {
      const int first = j * per_token, end = first + per_token;
      // Drained per token: only this token's units; across tokens: up to `stages` ahead, any token.
      const int limit = kVariant == kBulkCross ? total : end;
      if (lane == 0)
        for (; next < min(limit, first + p.stages); ++next) issue(next);
      __syncwarp();
      const int t = gw + j * warps;
      int4* out = reinterpret_cast<int4*>(p.out + t * p.row_bytes);
      for (int piece = 0; piece < pieces; ++piece) {
        float acc[4][8] = {};
        for (int i = 0; i < 2; ++i) {
          const int u = first + 2 * piece + i;
          if (!mbar_wait(&bars[warp][u % p.stages], (u / p.stages) & 1, p.ctx)) return;
          const int4* v = reinterpret_cast<const int4*>(stage + (u % p.stages) * kPiece);
#pragma unroll
          for (int k = 0; k < 4; ++k)
            if (int64_t(piece) * (kPiece / 16) + 32 * k + lane < vecs) add_bf16x8(acc[k], v[32 * k + lane]);
          __syncwarp();
          if (lane == 0 && next < min(limit, u + 1 + p.stages)) issue(next++);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int64_t vi = int64_t(piece) * (kPiece / 16) + 32 * k + lane;
          if (vi < vecs) out[vi] = to_bf16x8(acc[k]);
        }
      }
    }
  }
}

uint16_t to_bf16(float f) {  // round to nearest even (inputs are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

namespace {

int run(int argc, char** argv) {
  const int tokens = argc > 1 ? std::atoi(argv[1]) : 4096;
  const int hidden = argc > 2 ? std::atoi(argv[2]) : 7168;
  if (tokens <= 0 || hidden <= 0 || hidden % 8 != 0) {
    std::fprintf(stderr, "usage: el_reduce_probe [tokens > 0] [hidden, a multiple of 8]\n");
    return 2;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("el_reduce_probe: no GPU, nothing measured\n");
    return 0;
  }
  cudaDeviceProp prop{};
  EL_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const int64_t row_bytes = 2ll * hidden, bytes = row_bytes * tokens;
  std::vector<uint16_t> ha(bytes / 2), hb(bytes / 2), want(bytes / 2), got(bytes / 2);
  std::mt19937 rng(12345);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (size_t i = 0; i < ha.size(); ++i) {
    ha[i] = to_bf16(dist(rng));
    hb[i] = to_bf16(dist(rng));
    want[i] = to_bf16((0.f + from_bf16(ha[i])) + from_bf16(hb[i]));
  }
  char *a, *b, *out, *flush;
  const size_t flush_bytes = size_t{256} << 20;
  EL_CUDA_CHECK(cudaMalloc(&a, bytes));
  EL_CUDA_CHECK(cudaMalloc(&b, bytes));
  EL_CUDA_CHECK(cudaMalloc(&out, bytes));
  EL_CUDA_CHECK(cudaMalloc(&flush, flush_bytes));
  EL_CUDA_CHECK(cudaMemcpy(a, ha.data(), bytes, cudaMemcpyHostToDevice));
  EL_CUDA_CHECK(cudaMemcpy(b, hb.data(), bytes, cudaMemcpyHostToDevice));
  WaitRecord* record;
  EL_CUDA_CHECK(cudaHostAlloc(&record, sizeof(WaitRecord), cudaHostAllocMapped));
  std::memset(record, 0, sizeof(WaitRecord));
  WaitRecord* record_dev;
  EL_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&record_dev), record, 0));
  cudaEvent_t start, stop;
  EL_CUDA_CHECK(cudaEventCreate(&start));
  EL_CUDA_CHECK(cudaEventCreate(&stop));

  struct Row {
    const char* name;
    void (*kernel)(Args);
    int stages;
    bool is_copy;
  };
  const Row rows[] = {
      {"copy", reduce_rows<kCopy>, 0, true},         {"reg-seq", reduce_rows<kRegSeq>, 0, false},
      {"reg-pair", reduce_rows<kRegPair>, 0, false}, {"bulk-2", reduce_rows<kBulk>, 2, false},
      {"bulk-6", reduce_rows<kBulk>, 6, false},      {"bulk-cross-6", reduce_rows<kBulkCross>, 6, false}};
  std::printf(
      "el_reduce_probe: %s, %d SMs, T = %d, H = %d (rows of %lld B), 16 reducing warps per block of "
      "1024 threads; median of 20, L2 flushed\n",
      prop.name, prop.multiProcessorCount, tokens, hidden, static_cast<long long>(row_bytes));
  for (const Row& r : rows) {
    const size_t smem = size_t(kWorkWarps) * r.stages * kPiece;
    EL_CUDA_CHECK(
        cudaFuncSetAttribute(r.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    for (int blocks : {8, 24, 132}) {
      if (blocks > prop.multiProcessorCount) continue;
      Args args{a, b, out, tokens, row_bytes, r.stages, WaitContext{record_dev, 1000000000ull, 0}};
      std::vector<float> ms;
      for (int it = 0; it < 23; ++it) {
        EL_CUDA_CHECK(cudaMemset(out, 0xFF, bytes));  // poison: unwritten rows show
        EL_CUDA_CHECK(cudaMemsetAsync(flush, it & 0xFF, flush_bytes));
        EL_CUDA_CHECK(cudaEventRecord(start));
        r.kernel<<<blocks, kThreads, smem>>>(args);
        EL_CUDA_CHECK(cudaEventRecord(stop));
        EL_CUDA_CHECK(cudaGetLastError());
        EL_CUDA_CHECK(cudaEventSynchronize(stop));
        float t = 0;
        EL_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
        if (it >= 3) ms.push_back(t);
      }
      if (record->flag != 0) {
        std::printf("%s: a bulk load did not land within 1 s\n", r.name);
        return 1;
      }
      EL_CUDA_CHECK(cudaMemcpy(got.data(), out, bytes, cudaMemcpyDeviceToHost));
      const std::vector<uint16_t>& expect = r.is_copy ? ha : want;
      size_t bad = 0;
      for (size_t i = 0; i < got.size(); ++i) bad += got[i] != expect[i];
      std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
      const double us = ms[ms.size() / 2] * 1e3;
      const double moved = double(bytes) * (r.is_copy ? 2 : 3);  // rows read + written
      std::printf("%-13s %3d blocks  %8.1f us  %7.1f GB/s  %6.1f GB/s per SM  %s\n", r.name, blocks, us,
                  moved / us * 1e-3, moved / us * 1e-3 / blocks, bad == 0 ? "ok" : "MISMATCH");
      if (bad != 0) std::printf("  %zu of %zu values differ from the host's\n", bad, got.size());
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // a failed CUDA call (EL_CUDA_CHECK)
    std::fprintf(stderr, "el_reduce_probe: %s\n", e.what());
    return 1;
  }
}
