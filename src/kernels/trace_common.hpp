// The host side the diagnostics traces share (ht_trace.cpp, ll_trace.cpp).
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "check.hpp"

namespace expertlink::kernels {

// Print every N calls, N from $`env` (0: tracing off). A build without the stamps (`built` false) says
// once which build option adds them, and traces nothing.
inline long trace_every(const char* env, bool built, const char* option) {
  const char* v = std::getenv(env);
  if (v == nullptr) return 0;
  if (!built) {
    std::fprintf(stderr, "%s is set but this build has no stamps: configure with %s\n", env, option);
    return 0;
  }
  return std::max(1l, std::atol(v));
}

// Stamps are read back with a synchronous copy, which a capturing stream cannot take: no trace then.
inline bool trace_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  EL_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return capture != cudaStreamCaptureStatusNone;
}

// One kernel kind's stamp array on the device: grown to the largest call, cleared on the stream when a call
// starts, read back for the printout.
struct TraceStamps {
  uint64_t* device = nullptr;
  size_t capacity = 0;  // stamps allocated
  size_t entries = 0;   // stamps of the last call
  long calls = 0;

  uint64_t* start_call(size_t n, cudaStream_t stream) {
    if (n > capacity) {
      if (device != nullptr) EL_CUDA_CHECK(cudaFree(device));
      EL_CUDA_CHECK(cudaMalloc(&device, n * sizeof(uint64_t)));
      capacity = n;
    }
    entries = n;
    EL_CUDA_CHECK(cudaMemsetAsync(device, 0, n * sizeof(uint64_t), stream));
    ++calls;
    return device;
  }

  // The last call's stamps. Synchronizes the device: a split call's halves may run on other streams.
  std::vector<uint64_t> read() const {
    std::vector<uint64_t> h(entries);
    EL_CUDA_CHECK(cudaDeviceSynchronize());
    EL_CUDA_CHECK(cudaMemcpy(h.data(), device, h.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost));
    return h;
  }
};

// "min/median/max" of `v` with one decimal, "-" when empty.
inline std::string trace_spread(std::vector<double> v) {
  if (v.empty()) return "-";
  std::sort(v.begin(), v.end());
  char s[64];
  std::snprintf(s, sizeof s, "%.1f/%.1f/%.1f", v.front(), v[v.size() / 2], v.back());
  return s;
}

}  // namespace expertlink::kernels
