// The floor of WORKLOADS.md, measured in the same run: one-way peer copy bandwidth GPU0 -> GPU1
// (cudaMemcpyPeerAsync of 1 GiB, peer access enabled, bytes counted once) and device-to-device copy
// bandwidth on GPU0 (cudaMemcpyAsync of 1 GiB; GB/s counts the bytes copied, each of which is read once
// and written once, so the memory traffic is twice that). Multi-process peer copies would need CUDA IPC,
// so this runs in one forked process that owns all GPUs; the caller's process never touches CUDA (a
// process that initialised CUDA cannot fork children that use it).
#pragma once

#include <optional>
#include <string>

namespace expertlink::bench {

struct FloorResult {
  int gpus = 0;
  std::string card;  // cudaDeviceProp::name of GPU 0
  int sm_count = 0;
  std::optional<double> peer_gbps;  // nullopt: fewer than 2 GPUs, no peer access, or it failed
  std::optional<double> d2d_gbps;
  std::string note;  // why a figure is missing; empty when both were measured
};

// Forks, measures, reports back through a pipe. Bounded: the child is killed after `timeout_s`.
FloorResult measure_floor(double timeout_s);

}  // namespace expertlink::bench
