#include "kernels/symmetric_kernels.hpp"

#include <nccl_device.h>

#include "check.hpp"
#include "kernels/barrier.cuh"

namespace expertlink::kernels {
namespace {

__global__ void fill_peer_table_kernel(ncclWindow_t window, int num_ranks, char** peer_base) {
  for (int p = threadIdx.x; p < num_ranks; p += blockDim.x) {
    peer_base[p] = static_cast<char*>(ncclGetLsaPointer(window, 0, p));
  }
}

__global__ void barrier_kernel(SymmetricView view) {
  barrier_block(view);
}

}  // namespace

void launch_fill_peer_table(ncclWindow_t window, int num_ranks, char** peer_base, cudaStream_t stream) {
  fill_peer_table_kernel<<<1, 64, 0, stream>>>(window, num_ranks, peer_base);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_barrier(const SymmetricView& view, cudaStream_t stream) {
  barrier_kernel<<<1, 64, 0, stream>>>(view);
  EL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace expertlink::kernels
