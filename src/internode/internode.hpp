// The internode HT path of Buffer: the same API as intranode (ht_notify, ht_dispatch, ht_combine), taken
// when the communicator spans several nodes (topology.hpp). Hierarchical: a token crosses the network
// once per destination node, to the rank with the same local index there, which forwards it over the
// node's NVLink to the ranks holding its experts; combine reduces within the node first, then crosses the
// network once. Plan: plan.hpp; kernels: internode_kernels.cu; network hop: transport.hpp.
// Design, protocol and performance model: docs/internode.md.
//
// Host synchronisation: ht_notify always waits on the host (bounded by RuntimeOptions::timeout_s): the
// counts must be on the host to post NCCL's sends and receives. ht_dispatch and ht_combine do not: they
// are stream-ordered (grouped ncclSend/ncclRecv plus local kernels) and CUDA-graph capturable.
#pragma once

#include <cstdint>
#include <memory>

#include <cuda_runtime.h>

#include "expertlink/buffer.hpp"
#include "internode/topology.hpp"

namespace expertlink {
struct HtHandleState;
}

namespace expertlink::internode {

struct Context;      // per Buffer: transport, staging buffers, count scratch
struct HandleExtra;  // per HtHandle: the plan and the device lists of one notify

std::shared_ptr<Context> make_context(const Communicator& comm, const Topology& topo, RuntimeOptions options);

// Argument validation is Buffer's (src/ht/ht_api.cpp), done before these are called.
void ht_notify(Buffer::State& s, const HtDispatchArgs& args, std::unique_ptr<HtHandleState>& handle,
               Sizing sizing, int64_t capacity, cudaStream_t stream);
void ht_dispatch(Buffer::State& s, const HtDispatchArgs& args, HtHandleState& h, const HtDispatchOutputs& out,
                 cudaStream_t stream);
void ht_combine(Buffer::State& s, const HtCombineArgs& args, const HtHandleState& h,
                const HtCombineOutputs& out, cudaStream_t stream);

void synchronize(Context& ctx, cudaStream_t stream);
void barrier(Context& ctx, cudaStream_t stream);
// Device bytes of the staging buffers (grown by notify to what the largest call needed).
size_t staging_bytes(const Context& ctx);
const char* transport_name(const Context& ctx);

}  // namespace expertlink::internode
