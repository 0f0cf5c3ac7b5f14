// Programmatic dependent launch (Hopper): a kernel launched with it may start while the kernel before it
// on the stream is still running, once every block of that one has started and allowed it (or ended), so
// its launch and its blocks' start-up overlap the tail of the previous kernel instead of following it.
//
// The rule every kernel launched this way keeps: it calls wait_prior_grids() before anything else, so it
// reads nothing (inputs, protocol state, counts) before the previous stream work has completed and its
// memory is visible; only the launch is moved earlier. A kernel that knows its successor will also wait
// first calls allow_dependent_launch() early (notify's scan and notify itself: the dispatch kernel is then
// resident before notify's last instruction). EXPERTLINK_PDL=0 launches them the ordinary way (an A/B knob).
#pragma once

#include <cuda_runtime.h>

#include "check.hpp"

namespace expertlink::kernels {

__device__ __forceinline__ void wait_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Host: whether launches on the current device use it (compute capability >= 9, EXPERTLINK_PDL not 0).
bool pdl_enabled();

// Launches kernel(p) as above (or the ordinary way where pdl_enabled() is false).
template <class Params>
void launch_dependent(void (*kernel)(Params), const Params& p, int blocks, int threads, size_t smem,
                      cudaStream_t stream) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  EL_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

}  // namespace expertlink::kernels
