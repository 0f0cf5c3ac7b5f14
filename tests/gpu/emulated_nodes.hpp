// One host as several nodes (issue 7): each rank claims its node's NCCL_HOSTID before NCCL starts, so NCCL
// (and ExpertLink's topology) sees several hosts and carries traffic between them over its NET transport.
// P2P and SHM (which need one host) and IB are turned off unless already set, so the "network" is NCCL's
// socket transport over loopback.
#pragma once

#include <cstdlib>
#include <string>

namespace expertlink::test {

// Node = rank / local (ranks node-major, `local` per node).
inline void emulate_nodes(int rank, int local) {
  const std::string id = "expertlink-emulated-node-" + std::to_string(rank / local);
  setenv("NCCL_HOSTID", id.c_str(), 1);
  setenv("NCCL_P2P_DISABLE", "1", 0);
  setenv("NCCL_SHM_DISABLE", "1", 0);
  setenv("NCCL_IB_DISABLE", "1", 0);  // the socket NET transport, whatever NICs the host has
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  setenv("NCCL_SOCKET_IFNAME", "lo", 0);  // one host: loopback reaches every "node"
}

}  // namespace expertlink::test
