// Transport (a): grouped ncclSend/ncclRecv of byte buffers. NCCL enqueues one kernel on the stream for
// the whole group; its waits are NCCL's own (unbounded on the device): the library bounds them on the
// host, where every host wait on the stream (Buffer::synchronize, notify) has a deadline.
#include "check.hpp"
#include "internode/transport.hpp"

namespace expertlink::internode {
namespace {

class NcclP2pTransport final : public Transport {
 public:
  explicit NcclP2pTransport(ncclComm_t comm) : comm_(comm) {}
  const char* name() const override { return "nccl-p2p"; }

  void exchange(const std::vector<Message>& sends, const std::vector<Message>& recvs,
                cudaStream_t stream) override {
    if (sends.empty() && recvs.empty()) return;
    EL_NCCL_CHECK(ncclGroupStart());
    ncclResult_t res = ncclSuccess;
    for (const Message& m : recvs)
      if (res == ncclSuccess) res = ncclRecv(m.data, m.bytes, ncclUint8, m.peer, comm_, stream);
    for (const Message& m : sends)
      if (res == ncclSuccess) res = ncclSend(m.data, m.bytes, ncclUint8, m.peer, comm_, stream);
    // The group must be closed whatever happened inside it.
    const ncclResult_t end = ncclGroupEnd();
    EL_NCCL_CHECK(res);
    EL_NCCL_CHECK(end);
  }

 private:
  ncclComm_t comm_;
};

}  // namespace

std::unique_ptr<Transport> make_nccl_p2p_transport(ncclComm_t comm) {
  return std::make_unique<NcclP2pTransport>(comm);
}

}  // namespace expertlink::internode
