// The network hop of the internode path behind a small interface, so that the host-issued NCCL
// send/receive implementation (a) and a device-initiated NCCL GIN implementation (b) are interchangeable.
//
// One exchange is a set of point-to-point messages whose sizes both sides already know (the counts were
// exchanged first, src/internode/plan.hpp): every send has a matching receive on its peer with the same
// byte count. Stream-ordered: the data of `sends` must be ready on `stream`, the receive buffers are
// written in stream order, and later work on `stream` sees them.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include <cuda_runtime.h>
#include <nccl.h>

namespace expertlink::internode {

struct Message {
  int peer;      // rank in the communicator (may be this rank)
  void* data;    // device memory
  size_t bytes;  // > 0 (empty messages are not posted; both sides skip them alike)
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  virtual void exchange(const std::vector<Message>& sends, const std::vector<Message>& recvs,
                        cudaStream_t stream) = 0;
};

// (a) ncclSend/ncclRecv in one ncclGroupStart/End: works on every network NCCL supports (IB, RoCE, EFA
// through its plugin, sockets) and over NVLink / shared memory within a node.
std::unique_ptr<Transport> make_nccl_p2p_transport(ncclComm_t comm);

// (b) NCCL GIN device-initiated puts with signals (docs/internode.md). Compiled only with NCCL >= 2.29.7;
// returns null where it is compiled out or the communicator reports no GIN support. Never run yet.
std::unique_ptr<Transport> make_gin_transport(ncclComm_t comm);

}  // namespace expertlink::internode
