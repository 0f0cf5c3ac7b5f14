#include "ll/ll_state.hpp"

#include <cuda_runtime.h>

namespace expertlink {

LlState::~LlState() {
  cudaFree(seq);
  cudaFree(done);
  if (host_flags != nullptr) cudaFreeHost(host_flags);
  for (void* b : combine_buffer) cudaFree(b);
}

}  // namespace expertlink
