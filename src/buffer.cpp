#include "buffer_state.hpp"

#include <algorithm>
#include <vector>

#include "comm/control_layout.hpp"
#include "kernels/ll_kernels.hpp"

#include "check.hpp"
#include "internode/internode.hpp"
#include "internode/ll_internode.hpp"

namespace expertlink {

Buffer::Buffer(const Communicator& comm, size_t ht_bytes, size_t ll_bytes, RuntimeOptions options,
               size_t ht_recv_bytes)
    : s_(std::make_unique<State>(comm, options)) {
  EL_CHECK(ht_bytes + ll_bytes > 0, "ht_bytes + ll_bytes = 0: the buffer would hold nothing");
  EL_CHECK(comm.num_ranks() <= kHtMaxRanks, "num_ranks = %d exceeds the maximum of %d", comm.num_ranks(),
           kHtMaxRanks);
  s_->ht_bytes = (ht_bytes + 15) / 16 * 16;
  s_->ll_bytes = (ll_bytes + 15) / 16 * 16;
  s_->ht_recv_bytes = (ht_recv_bytes + 127) / 128 * 128;
  // Collective: one node takes the NVLink (symmetric window) path; several take the internode path.
  s_->topology = internode::exchange_topology(comm, options.timeout_s);
  if (s_->topology.multi_node()) s_->ht_recv_bytes = 0;  // no window: ht_window_recv_x says so
  EL_CUDA_CHECK(cudaDeviceGetAttribute(&s_->device_sms, cudaDevAttrMultiProcessorCount, comm.device()));
  if (s_->topology.multi_node()) {
    s_->internode = internode::make_context(comm, s_->topology, options);
    if (s_->ll_bytes > 0)
      s_->internode_ll = internode::make_ll_context(comm, s_->topology, s_->ll_bytes, s_->device_sms);
  } else {
    s_->window = std::make_unique<SymmetricMemory>(comm, ht_recv_offset() + s_->ht_recv_bytes, options);
  }
  EL_CUDA_CHECK(cudaMalloc(&s_->ht.rounds, 4 * sizeof(uint64_t)));
  EL_CUDA_CHECK(cudaMalloc(&s_->ht.done_blocks, 3 * sizeof(uint32_t)));
  EL_CUDA_CHECK(cudaMalloc(&s_->ht.tickets, kernels::kHtTicketWords * sizeof(uint32_t)));
  EL_CUDA_CHECK(cudaMemset(s_->ht.rounds, 0, 4 * sizeof(uint64_t)));
  EL_CUDA_CHECK(cudaMemset(s_->ht.done_blocks, 0, 3 * sizeof(uint32_t)));
  EL_CUDA_CHECK(cudaMemset(s_->ht.tickets, 0, kernels::kHtTicketWords * sizeof(uint32_t)));
  EL_CUDA_CHECK(cudaMalloc(&s_->ht.scan, kernels::kScanWords * sizeof(int32_t)));
  EL_CUDA_CHECK(cudaMemset(s_->ht.scan, 0, kernels::kScanWords * sizeof(int32_t)));
  EL_CUDA_CHECK(cudaDeviceSynchronize());
}

Buffer::~Buffer() {
  if (!s_) return;
  cudaFree(s_->ht.rounds);
  cudaFree(s_->ht.done_blocks);
  cudaFree(s_->ht.tickets);
  cudaFree(s_->ht.scan);
}

int Buffer::rank() const {
  return s_->comm.rank();
}
int Buffer::num_ranks() const {
  return s_->comm.num_ranks();
}
size_t Buffer::ht_bytes() const {
  return s_->ht_bytes;
}
size_t Buffer::ll_bytes() const {
  return s_->ll_bytes;
}
size_t Buffer::window_bytes() const {
  return s_->window ? s_->window->window_bytes() : 0;
}
size_t Buffer::ll_offset() const {
  return s_->ht_bytes;
}
size_t Buffer::ht_recv_offset() const {
  return (s_->ht_bytes + s_->ll_bytes + 127) / 128 * 128;
}
SymmetricMemory& Buffer::window() {
  EL_CHECK(s_->window != nullptr, "window(): this buffer spans %d nodes and has no symmetric window",
           s_->topology.num_nodes);
  return *s_->window;
}

int Buffer::default_ht_sms() const {
  // NVLink fills with ~8 SMs writing to peers (46 GB/s each, NV18 ~ 370 GB/s); the local share and the
  // copy-out of received rows scale with SMs too, so take as many again. Never more than the device has.
  return std::min(s_->device_sms, 24);
}

void Buffer::synchronize(cudaStream_t stream) {
  if (s_->internode) return internode::synchronize(*s_->internode, stream);
  s_->window->synchronize(stream);
}
void Buffer::mask_rank(int rank) {
  EL_CHECK(s_->window != nullptr, "mask_rank: the internode path has no rank masking yet");
  const int R = num_ranks();
  // Calls already issued end first (one waiting for the masked rank ends at the timeout, recorded).
  EL_CUDA_CHECK(cudaDeviceSynchronize());
  s_->window->mask_rank(rank);  // checks `rank`; clears the record; barrier epoch + 1
  // HT: every round one up (stale signals of an aborted round stay below the next one) and no kernel
  // half-finished. Equal on every live rank, as they all mask at the same point of their call sequence.
  // (rounds[3], the last combine that read the receive regions, stays: the peers' "done" words hold it.)
  uint64_t rounds[3];
  EL_CUDA_CHECK(cudaMemcpy(rounds, s_->ht.rounds, sizeof(rounds), cudaMemcpyDeviceToHost));
  for (uint64_t& r : rounds) ++r;
  EL_CUDA_CHECK(cudaMemcpy(s_->ht.rounds, rounds, sizeof(rounds), cudaMemcpyHostToDevice));
  EL_CUDA_CHECK(cudaMemset(s_->ht.done_blocks, 0, 3 * sizeof(uint32_t)));
  EL_CUDA_CHECK(
      cudaMemset(s_->ht.tickets, 0, kernels::kHtTicketWords * sizeof(uint32_t)));  // an aborted call's draws
  EL_CUDA_CHECK(cudaMemset(s_->ht.scan, 0, kernels::kScanWords * sizeof(int32_t)));  // an aborted notify's
  if (!s_->ll.ready()) return;
  // LL: per (kind, parity), send and receive counts move to one past the larger, and this rank records
  // that every peer has freed its areas up to that use (the device is idle: nothing reads them now).
  uint64_t seq[8];
  EL_CUDA_CHECK(cudaMemcpy(seq, s_->ll.seq, sizeof(seq), cudaMemcpyDeviceToHost));
  const size_t free_array[2] = {control::ll::kDispatchFree, control::ll::kCombineFree};
  const int send_index[2] = {kernels::kLlSeqDispatchSend, kernels::kLlSeqCombineSend};
  const int recv_index[2] = {kernels::kLlSeqDispatchRecv, kernels::kLlSeqCombineRecv};
  char* local = s_->window->view().local_base;
  for (int kind = 0; kind < 2; ++kind) {
    for (int parity = 0; parity < 2; ++parity) {
      uint64_t& send = seq[send_index[kind] + parity];
      uint64_t& recv = seq[recv_index[kind] + parity];
      send = recv = std::max(send, recv) + 1;
      std::vector<uint64_t> freed(R, send);
      EL_CUDA_CHECK(cudaMemcpy(local + free_array[kind] + sizeof(uint64_t) * parity * kMaxRanks, freed.data(),
                               sizeof(uint64_t) * R, cudaMemcpyHostToDevice));
    }
  }
  EL_CUDA_CHECK(cudaMemcpy(s_->ll.seq, seq, sizeof(seq), cudaMemcpyHostToDevice));
  EL_CUDA_CHECK(cudaMemset(s_->ll.done, 0, kernels::kLlDoneCount * sizeof(uint32_t)));
  for (int parity = 0; parity < 2; ++parity) {
    s_->ll.dispatch_pending[parity] = nullptr;
    s_->ll.combine_pending[parity] = nullptr;
  }
}

bool Buffer::is_rank_masked(int rank) const {
  EL_CHECK(rank >= 0 && rank < num_ranks(), "is_rank_masked(rank = %d): rank must be in [0, %d)", rank,
           num_ranks());
  return s_->window != nullptr && !rank_live(s_->window->view(), rank);
}

void Buffer::barrier(cudaStream_t stream) {
  if (s_->internode) return internode::barrier(*s_->internode, stream);
  s_->window->barrier(stream);
}

}  // namespace expertlink
