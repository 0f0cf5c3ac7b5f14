// RAII device arrays for the GPU tests: upload host vectors, download, poison.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <cuda_runtime.h>
#include <nccl.h>

#include "expertlink/error.hpp"

namespace expertlink::test {

template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) { resize(n); }
  explicit DeviceArray(const std::vector<T>& host) {
    resize(host.size());
    upload(host);
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  void resize(size_t n) {
    cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = n;
    if (cudaMalloc(&ptr_, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess)
      throw Error(ErrorCode::kCuda, "test allocation of " + std::to_string(n * sizeof(T)) + " bytes failed");
  }
  // Both complete before returning. A plain cudaMemcpy from pageable memory may return before its DMA
  // lands, and cudaMemset runs on the legacy stream, which the tests' non-blocking streams do not wait
  // for: a poison could land after the kernel wrote the array (the likely cause of one unwritten
  // per-expert count in a 300-round stress run on 2x H200, 2026-11-28). So both end with a device
  // synchronization.
  void upload(const std::vector<T>& host) {
    if (!host.empty()) cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
  }
  std::vector<T> download(size_t n) const {
    std::vector<T> out(n);
    if (n) cudaMemcpy(out.data(), ptr_, n * sizeof(T), cudaMemcpyDeviceToHost);
    return out;
  }
  std::vector<T> download() const { return download(size_); }
  // Fills every byte with `byte` (0xFF: BF16/F32 NaN, FP8 NaN, -1 for integers).
  void poison(unsigned char byte = 0xFF) {
    cudaMemset(ptr_, byte, std::max<size_t>(size_, 1) * sizeof(T));
    cudaDeviceSynchronize();
  }
  T* get() const { return ptr_; }
  size_t size() const { return size_; }

 private:
  T* ptr_ = nullptr;
  size_t size_ = 0;
};

// The same seed on every rank of a run, different for every run: from the run's NCCL unique id.
inline uint64_t run_seed(const ncclUniqueId& id) {
  uint64_t seed = 1469598103934665603ull;
  for (char c : id.internal) seed = (seed ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return seed;
}

}  // namespace expertlink::test
