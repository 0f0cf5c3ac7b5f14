// Small host helpers shared by the ExpertLink implementations of the bench (HT and LL).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "check.hpp"
#include "device_buffer.hpp"

namespace expertlink::bench {

template <typename... Args>
std::string text(const char* fmt, Args... args) {
  char buf[512];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

template <typename T>
std::vector<T> download(const void* device_ptr, int64_t count) {
  std::vector<T> v(static_cast<size_t>(std::max<int64_t>(count, 0)));
  if (!v.empty())
    EL_CUDA_CHECK(cudaMemcpy(v.data(), device_ptr, v.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

// 0xff bytes: NaN in BF16, e4m3 and float, -1 in integers; whatever a run does not write is then seen.
inline void poison(const DeviceBuffer& b, cudaStream_t stream) {
  if (b.bytes() > 0) EL_CUDA_CHECK(cudaMemsetAsync(b.as(), 0xff, b.bytes(), stream));
}

}  // namespace expertlink::bench
