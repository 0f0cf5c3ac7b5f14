// Buffer's topology queries (declared in expertlink/buffer.hpp).
#include "buffer_state.hpp"
#include "internode/internode.hpp"
#include "internode/ll_internode.hpp"

namespace expertlink {

int Buffer::num_nodes() const {
  return s_->topology.num_nodes;
}
int Buffer::num_local_ranks() const {
  return s_->topology.local_size;
}
size_t Buffer::internode_staging_bytes() const {
  return (s_->internode ? internode::staging_bytes(*s_->internode) : 0) +
         (s_->internode_ll ? internode::ll_staging_bytes(*s_->internode_ll) : 0);
}

}  // namespace expertlink
