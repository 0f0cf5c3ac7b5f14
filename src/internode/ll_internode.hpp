// The internode low-latency (LL) path of Buffer: ll_dispatch / ll_combine (and their hook and StreamOrder
// forms) when the communicator spans several nodes. Flat: every rank exchanges a fixed-size pair with
// every other rank through one grouped ncclSend/ncclRecv per hop (NCCL takes P2P/NVLink within a host and
// its NET transport between hosts). Sizes follow from the call's arguments (ll_layout.hpp), so nothing
// waits on the host and every call is CUDA-graph capturable. Design and trade-offs: docs/internode.md.
//
// Argument validation, the handle, the double-buffer bookkeeping of split calls and the hooks are
// src/ll/ll_api.cpp's, shared with the intranode path; these functions take its parameter blocks.
#pragma once

#include <cstddef>
#include <memory>

#include <cuda_runtime.h>

#include "expertlink/communicator.hpp"
#include "internode/ll_layout.hpp"
#include "internode/topology.hpp"
#include "kernels/ll_kernels.hpp"

namespace expertlink::internode {

struct LlContext;  // per Buffer: staging (send and receive, ll_bytes each), scratch, error words, events

// Allocates the staging (2 * ll_bytes of device memory) at Buffer construction. Not collective.
std::shared_ptr<LlContext> make_ll_context(const Communicator& comm, const Topology& topo, size_t ll_bytes,
                                           int grid);
size_t ll_staging_bytes(const LlContext& ctx);
// Raises what an earlier call's kernels recorded (a rank that sent another hidden / topk / num_experts).
void ll_raise_errors(LlContext& ctx);

// The layout of a dispatch (or of the combine along its handle) and the bytes of an area it needs.
LlLayout ll_layout_of(const kernels::LlGeometry& g, bool fp8, bool ue8m0);
int64_t ll_staging_area_bytes(const LlContext& ctx);

// Send half: route + pack kernels, then the exchange. Receive half: the unpack kernel.
void ll_dispatch_send(LlContext& ctx, const kernels::LlDispatchParams& p, cudaStream_t stream);
void ll_dispatch_recv(LlContext& ctx, const kernels::LlDispatchParams& p, cudaStream_t stream);
// Send half: weights kernel, exchange, holder kernel, exchange. Receive half: the sum kernel.
void ll_combine_send(LlContext& ctx, const kernels::LlCombineParams& p, cudaStream_t stream);
void ll_combine_recv(LlContext& ctx, const kernels::LlCombineParams& p, cudaStream_t stream);

}  // namespace expertlink::internode
