// el_nvlink_probe: what SM-driven and copy-engine copies achieve between two GPUs of this host, by SM
// count, so the HT kernels' targets can be set against what the hardware gives a given SM budget.
// One process, GPUs 0 and 1 (peer access), both copying towards each other at once (as in dispatch).
// Each warp copies whole rows of `row_bytes` (as the HT senders do), kUnroll 16-byte loads in flight
// per lane. Modes: push (read own, write peer), pull (read peer, write own), push+local (read own, write
// peer and own: dispatch's sending pattern), local (own to own), ce (cudaMemcpyPeerAsync).
// Usage: el_nvlink_probe [rows=4096] [row_bytes=14336]. Prints one line per (mode, SMs, threads).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

namespace {

constexpr int kUnroll = 8;

__global__ void copy_rows(const int4* __restrict__ src, int4* __restrict__ dst_a, int4* __restrict__ dst_b,
                          int rows, int vecs_per_row) {
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * blockDim.x / 32;
  for (int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
    const int4* s = src + int64_t(r) * vecs_per_row;
    int4* a = dst_a + int64_t(r) * vecs_per_row;
    int4* b = dst_b != nullptr ? dst_b + int64_t(r) * vecs_per_row : nullptr;
    for (int v0 = lane; v0 < vecs_per_row; v0 += 32 * kUnroll) {
      int4 val[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (v0 + u * 32 < vecs_per_row) val[u] = __ldcg(s + v0 + u * 32);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (v0 + u * 32 < vecs_per_row) a[v0 + u * 32] = val[u];
      if (b != nullptr) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (v0 + u * 32 < vecs_per_row) b[v0 + u * 32] = val[u];
      }
    }
  }
}

struct Gpu {
  int4 *src, *dst, *local_dst;
  cudaStream_t stream;
  cudaEvent_t start, stop;
};

}  // namespace

int main(int argc, char** argv) {
  const int rows = argc > 1 ? std::atoi(argv[1]) : 4096;
  const int row_bytes = argc > 2 ? std::atoi(argv[2]) : 14336;
  int n = 0;
  CK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::printf("el_nvlink_probe: needs 2 GPUs, found %d\n", n);
    return 0;
  }
  const size_t bytes = size_t(rows) * row_bytes;
  Gpu g[2];
  for (int d = 0; d < 2; ++d) {
    CK(cudaSetDevice(d));
    CK(cudaDeviceEnablePeerAccess(1 - d, 0));
    CK(cudaMalloc(&g[d].src, bytes));
    CK(cudaMalloc(&g[d].dst, bytes));
    CK(cudaMalloc(&g[d].local_dst, bytes));
    CK(cudaMemset(g[d].src, d + 1, bytes));
    CK(cudaStreamCreateWithFlags(&g[d].stream, cudaStreamNonBlocking));
    CK(cudaEventCreate(&g[d].start));
    CK(cudaEventCreate(&g[d].stop));
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("probe: %s x2, %d rows x %d B = %.1f MB per direction\n", prop.name, rows, row_bytes,
              bytes / 1e6);
  const char* modes[] = {"push", "pull", "push+local", "local", "ce"};
  for (const char* mode : modes) {
    const std::string m = mode;
    const std::vector<int> sms =
        m == "ce" ? std::vector<int>{0} : std::vector<int>{4, 8, 16, 24, 32, 64, 132};
    const std::vector<int> threads = m == "ce" ? std::vector<int>{0} : std::vector<int>{512, 1024};
    for (int s : sms)
      for (int t : threads) {
        auto launch = [&](int d) {
          const int peer = 1 - d;
          if (m == "ce") {
            CK(cudaMemcpyPeerAsync(g[peer].dst, peer, g[d].src, d, bytes, g[d].stream));
            return;
          }
          const int4* src = m == "pull" ? g[peer].src : g[d].src;
          int4* a = m == "push" || m == "push+local" ? g[peer].dst : g[d].dst;
          int4* b = m == "push+local" ? g[d].local_dst : nullptr;
          copy_rows<<<s, t, 0, g[d].stream>>>(src, a, b, rows, row_bytes / 16);
          CK(cudaGetLastError());
        };
        std::vector<double> us;
        for (int it = 0; it < 12; ++it) {
          for (int d = 0; d < 2; ++d) {
            CK(cudaSetDevice(d));
            CK(cudaDeviceSynchronize());
          }
          for (int d = 0; d < 2; ++d) {
            CK(cudaSetDevice(d));
            CK(cudaEventRecord(g[d].start, g[d].stream));
            launch(d);
            CK(cudaEventRecord(g[d].stop, g[d].stream));
          }
          double worst = 0;
          for (int d = 0; d < 2; ++d) {
            CK(cudaSetDevice(d));
            CK(cudaEventSynchronize(g[d].stop));
            float ms = 0;
            CK(cudaEventElapsedTime(&ms, g[d].start, g[d].stop));
            worst = std::max(worst, ms * 1e3);
          }
          if (it >= 2) us.push_back(worst);
        }
        std::sort(us.begin(), us.end());
        const double med = us[us.size() / 2];
        std::printf("PROBE %-10s sms=%3d threads=%4d: %8.1f us  %6.1f GB/s per direction\n", mode, s, t, med,
                    bytes / med / 1e3);
      }
  }
  return 0;
}
