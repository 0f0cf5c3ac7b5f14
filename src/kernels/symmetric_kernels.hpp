// Host entry points of the window's own kernels (src/kernels/symmetric_kernels.cu).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include "comm/symmetric_memory.hpp"

namespace expertlink::kernels {

// Fills peer_base[0..num_ranks) with ncclGetLsaPointer(window, 0, peer).
void launch_fill_peer_table(ncclWindow_t window, int num_ranks, char** peer_base, cudaStream_t stream);

// One block: signals every peer's barrier slot for this rank, then waits (bounded) for every peer's.
void launch_barrier(const SymmetricView& view, cudaStream_t stream);

}  // namespace expertlink::kernels
