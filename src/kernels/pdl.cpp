#include "kernels/pdl.hpp"

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace expertlink::kernels {

bool pdl_enabled() {
  static const bool allowed = [] {
    const char* v = std::getenv("EXPERTLINK_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  if (!allowed) return false;
  // Per device: 0 unknown, 1 no, 2 yes (a launch asks once per device, not once per call).
  static std::array<std::atomic<int>, 128> by_device{};
  int device = 0;
  EL_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= static_cast<int>(by_device.size())) return false;
  int known = by_device[device].load(std::memory_order_relaxed);
  if (known == 0) {
    int major = 0;
    EL_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    known = major >= 9 ? 2 : 1;
    by_device[device].store(known, std::memory_order_relaxed);
  }
  return known == 2;
}

}  // namespace expertlink::kernels
