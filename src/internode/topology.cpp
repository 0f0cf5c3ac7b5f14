#include "internode/topology.hpp"

#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "check.hpp"
#include "comm/host_wait.hpp"
#include "expertlink/communicator.hpp"

namespace expertlink::internode {

uint64_t host_hash(const std::string& host_id) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : host_id) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string local_host_id() {
  if (const char* env = std::getenv("NCCL_HOSTID"); env != nullptr && env[0] != '\0') return env;
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  std::string id = name;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string boot_id;
  if (boot && std::getline(boot, boot_id)) id += ":" + boot_id;
  return id;
}

Topology derive_topology(const std::vector<uint64_t>& host_hashes, int rank) {
  const int R = static_cast<int>(host_hashes.size());
  EL_CHECK(R >= 1 && rank >= 0 && rank < R, "derive_topology: rank %d of %d ranks", rank, R);
  // Nodes in order of first appearance; a host seen again after another host began is not node-major.
  std::vector<int> node_of(R, -1);
  std::vector<uint64_t> nodes;
  for (int r = 0; r < R; ++r) {
    if (r > 0 && host_hashes[r] == host_hashes[r - 1]) {
      node_of[r] = node_of[r - 1];
      continue;
    }
    for (size_t n = 0; n < nodes.size(); ++n) {
      if (nodes[n] == host_hashes[r])
        EL_FAIL(
            ErrorCode::kUnsupported,
            "rank %d is on the same host as ranks of node %zu but not next to them: ranks must be numbered "
            "node-major (all ranks of a host contiguous)",
            r, n);
    }
    node_of[r] = static_cast<int>(nodes.size());
    nodes.push_back(host_hashes[r]);
  }
  Topology t;
  t.rank = rank;
  t.num_ranks = R;
  t.num_nodes = static_cast<int>(nodes.size());
  t.local_size = R / t.num_nodes;
  for (int r = 0; r < R; ++r) {
    if (node_of[r] != r / t.local_size)
      EL_FAIL(
          ErrorCode::kUnsupported,
          "the %d ranks span %d hosts of unequal sizes (rank %d is on host %d, expected %d with %d ranks per "
          "host): every node must hold the same number of ranks",
          R, t.num_nodes, r, node_of[r], r / t.local_size, t.local_size);
  }
  t.node = rank / t.local_size;
  t.local_rank = rank % t.local_size;
  return t;
}

Topology exchange_topology(const Communicator& comm, double timeout_s) {
  const int R = comm.num_ranks();
  const uint64_t mine = host_hash(local_host_id());
  if (R == 1) return derive_topology({mine}, 0);
  uint64_t* dev = nullptr;
  cudaStream_t stream = nullptr;
  EL_CUDA_CHECK(cudaMalloc(&dev, sizeof(uint64_t) * R));
  std::vector<uint64_t> all(R);
  try {
    EL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    EL_CUDA_CHECK(cudaMemcpyAsync(dev + comm.rank(), &mine, sizeof(mine), cudaMemcpyHostToDevice, stream));
    EL_NCCL_CHECK(ncclAllGather(dev + comm.rank(), dev, 1, ncclUint64, comm.nccl(), stream));
    EL_CUDA_CHECK(cudaMemcpyAsync(all.data(), dev, sizeof(uint64_t) * R, cudaMemcpyDeviceToHost, stream));
    WaitRecord none{};
    wait_for_stream(stream, timeout_s, &none, comm.rank());
  } catch (...) {
    cudaFree(dev);
    if (stream != nullptr) cudaStreamDestroy(stream);
    throw;
  }
  cudaFree(dev);
  cudaStreamDestroy(stream);
  return derive_topology(all, comm.rank());
}

}  // namespace expertlink::internode
