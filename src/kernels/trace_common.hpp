// The host side the diagnostics traces share (ht_trace.cpp, ll_trace.cpp).
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>

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

}  // namespace expertlink::kernels
