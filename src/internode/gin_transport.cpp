// Transport (b): NCCL GIN (GPU-initiated networking), device-initiated one-sided puts with signals.
// Design: docs/internode.md. Compiled only where NCCL >= 2.29.7 (the version whose GIN API the design
// follows); with NCCL 2.28 (what the lent machines have) this file compiles to a function returning null,
// and the internode path uses transport (a). Not done: it has never run (no machine with a GIN-capable
// NIC has been available).
#include "internode/transport.hpp"

#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 29, 7)
#include "check.hpp"
#endif

namespace expertlink::internode {

#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 29, 7)
namespace {

// Placeholder of the GIN transport: the interface is the same, the implementation (a window registered
// for GIN, ncclGin::put of each packed per-node buffer with a remote signal, the receiver waiting on the
// signal with a bounded wait) is described in docs/internode.md and must be written and run on a machine
// with a GIN-capable NIC before it is offered. Until then it refuses loudly instead of moving data.
class GinTransport final : public Transport {
 public:
  const char* name() const override { return "nccl-gin"; }
  void exchange(const std::vector<Message>&, const std::vector<Message>&, cudaStream_t) override {
    EL_FAIL(ErrorCode::kUnsupported,
            "the NCCL GIN transport is designed (docs/internode.md) but not implemented");
  }
};

}  // namespace

std::unique_ptr<Transport> make_gin_transport(ncclComm_t) {
  // Not offered until it has run: the caller falls back to transport (a).
  return nullptr;
}
#else
std::unique_ptr<Transport> make_gin_transport(ncclComm_t) {
  return nullptr;
}
#endif

}  // namespace expertlink::internode
