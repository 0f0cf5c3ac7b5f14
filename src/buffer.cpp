#include "buffer_state.hpp"

#include <algorithm>

#include "check.hpp"
#include "internode/internode.hpp"

namespace expertlink {

Buffer::Buffer(const Communicator& comm, size_t ht_bytes, size_t ll_bytes, RuntimeOptions options)
    : s_(std::make_unique<State>(comm, options)) {
  EL_CHECK(ht_bytes + ll_bytes > 0, "ht_bytes + ll_bytes = 0: the buffer would hold nothing");
  EL_CHECK(comm.num_ranks() <= kHtMaxRanks, "num_ranks = %d exceeds the maximum of %d", comm.num_ranks(), kHtMaxRanks);
  s_->ht_bytes = (ht_bytes + 15) / 16 * 16;
  s_->ll_bytes = (ll_bytes + 15) / 16 * 16;
  // Collective: one node takes the NVLink (symmetric window) path; several take the internode path.
  s_->topology = internode::exchange_topology(comm, options.timeout_s);
  if (s_->topology.multi_node())
    s_->internode = internode::make_context(comm, s_->topology, options);
  else
    s_->window = std::make_unique<SymmetricMemory>(comm, s_->ht_bytes + s_->ll_bytes, options);
  EL_CUDA_CHECK(cudaDeviceGetAttribute(&s_->device_sms, cudaDevAttrMultiProcessorCount, comm.device()));
  EL_CUDA_CHECK(cudaMalloc(&s_->ht.rounds, 3 * sizeof(uint64_t)));
  EL_CUDA_CHECK(cudaMalloc(&s_->ht.done_blocks, 3 * sizeof(uint32_t)));
  EL_CUDA_CHECK(cudaMemset(s_->ht.rounds, 0, 3 * sizeof(uint64_t)));
  EL_CUDA_CHECK(cudaMemset(s_->ht.done_blocks, 0, 3 * sizeof(uint32_t)));
  EL_CUDA_CHECK(cudaDeviceSynchronize());
}

Buffer::~Buffer() {
  if (!s_) return;
  cudaFree(s_->ht.rounds);
  cudaFree(s_->ht.done_blocks);
}

int Buffer::rank() const { return s_->comm.rank(); }
int Buffer::num_ranks() const { return s_->comm.num_ranks(); }
size_t Buffer::ht_bytes() const { return s_->ht_bytes; }
size_t Buffer::ll_bytes() const { return s_->ll_bytes; }
size_t Buffer::window_bytes() const { return s_->window ? s_->window->window_bytes() : 0; }
size_t Buffer::ll_offset() const { return s_->ht_bytes; }
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
void Buffer::barrier(cudaStream_t stream) {
  if (s_->internode) return internode::barrier(*s_->internode, stream);
  s_->window->barrier(stream);
}

}  // namespace expertlink
