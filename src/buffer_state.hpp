// Buffer's private state, shared by the HT (src/ht/) and LL (src/ll/) implementations.
#pragma once

#include <memory>

#include "comm/symmetric_memory.hpp"
#include "expertlink/buffer.hpp"
#include "internode/topology.hpp"
#include "kernels/ht_kernels.hpp"
#include "ll/ll_state.hpp"

namespace expertlink {

namespace internode {
struct Context;
struct LlContext;
}  // namespace internode

struct Buffer::State {
  const Communicator& comm;
  RuntimeOptions options;
  size_t ht_bytes = 0, ll_bytes = 0;
  size_t ht_recv_bytes = 0;  // the direct-dispatch receive region, after the LL region (128-byte aligned)
  std::unique_ptr<SymmetricMemory> window;             // null on the internode path
  internode::Topology topology;                        // nodes of the communicator
  std::shared_ptr<internode::Context> internode;       // set when topology spans several nodes
  std::shared_ptr<internode::LlContext> internode_ll;  // and ll_bytes > 0: the LL staging
  int device_sms = 0;
  kernels::HtState ht{};  // device-local round counters of the HT kernels
  LlState ll;
  // StreamOrder::use_comm_stream's stream, and the event that hands work between it and the caller's
  // stream (re-recorded per call: a wait takes the record current when it is enqueued). Both made on
  // first use (src/stream_order.cpp).
  struct CommStream {
    cudaStream_t stream = nullptr;
    cudaEvent_t handoff = nullptr;
    CommStream() = default;
    CommStream(const CommStream&) = delete;
    CommStream& operator=(const CommStream&) = delete;
    ~CommStream() {
      if (handoff) cudaEventDestroy(handoff);
      if (stream) cudaStreamDestroy(stream);
    }
  } comm_stream;

  State(const Communicator& c, RuntimeOptions o) : comm(c), options(o) {}
};

}  // namespace expertlink
