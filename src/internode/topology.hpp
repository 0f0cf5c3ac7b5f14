// Where each rank of a communicator sits: which node (host, NVLink domain) and which local index there.
// Ranks must be numbered node-major (all ranks of node 0, then node 1, ...) with the same number of ranks
// on every node; 1, 2, 4, 8 (any count) local GPUs work. A host is identified the way NCCL does it:
// $NCCL_HOSTID when set (so one machine can emulate several nodes), else hostname + boot id.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace expertlink {
class Communicator;
}

namespace expertlink::internode {

struct Topology {
  int rank = 0, num_ranks = 1;
  int num_nodes = 1;
  int local_size = 1;  // ranks per node (L)
  int node = 0;        // rank / L
  int local_rank = 0;  // rank % L

  bool multi_node() const { return num_nodes > 1; }
  int rank_of(int node_id, int local) const { return node_id * local_size + local; }
};

// 64-bit FNV-1a: the same on every process and platform.
uint64_t host_hash(const std::string& host_id);
// This process's host id: $NCCL_HOSTID if set and non-empty, else "<hostname>:<boot id>".
std::string local_host_id();

// Pure: the topology from every rank's host hash (index = rank). Throws kUnsupported when the ranks of a
// host are not contiguous (not node-major) or hosts hold different numbers of ranks, naming the ranks.
Topology derive_topology(const std::vector<uint64_t>& host_hashes, int rank);

// Collective over the communicator (every rank, same order): all-gathers the host hashes with NCCL and
// derives the topology. Bounded: fails with kTimeout after `timeout_s` instead of hanging.
Topology exchange_topology(const Communicator& comm, double timeout_s);

}  // namespace expertlink::internode
