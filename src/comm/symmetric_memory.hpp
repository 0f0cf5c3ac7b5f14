// A window of NVLink-visible memory that every rank of a Communicator holds at the same offsets, with a
// device-side table of every peer's base address, a cross-rank barrier and bounded-wait error reporting.
//
// Setup (collective, same order on every rank): ncclDevCommCreate (fails where symmetric memory is not
// available) -> ncclMemAlloc (cuMem-backed) -> ncclCommWindowRegister(NCCL_WIN_COLL_SYMMETRIC) -> a
// one-off kernel reads ncclGetLsaPointer(win, 0, peer) for every peer into `peer_base`.
//
// Window layout (every rank identical): [0, kControlBytes) control region (signals and small metadata,
// see control_layout.hpp), [kControlBytes, window_bytes()) data region for the dispatch/combine kernels.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include "comm/control_layout.hpp"
#include "comm/wait_record.hpp"
#include "expertlink/communicator.hpp"
#include "expertlink/options.hpp"

namespace expertlink {

// What a kernel needs to reach the window: by value as a kernel argument.
struct SymmetricView {
  char* const* peer_base;   // device array [num_ranks]: peer_base[r] = rank r's window, as mapped here
  char* local_base;         // == peer_base[rank]
  uint64_t* barrier_epoch;  // device-local counter of barriers this rank has entered
  WaitRecord* record;       // host-mapped
  uint64_t timeout_ns;
  int rank;
  int num_ranks;
  // Bit r: rank r is masked (dead). Kernels neither write to, wait for nor read from a masked rank, and
  // treat top-k picks of its experts as -1. Taken by value at each launch.
  uint64_t masked;
};

// Rank r is live (not masked) in view v. Host and device.
__host__ __device__ inline bool rank_live(const SymmetricView& v, int r) {
  return ((v.masked >> r) & 1u) == 0;
}

class SymmetricMemory {
 public:
  // Collective. `data_bytes` is the data region; the window adds the control region and rounds up.
  SymmetricMemory(const Communicator& comm, size_t data_bytes, RuntimeOptions options = {});
  ~SymmetricMemory();
  SymmetricMemory(const SymmetricMemory&) = delete;
  SymmetricMemory& operator=(const SymmetricMemory&) = delete;

  const SymmetricView& view() const { return view_; }
  char* data() const { return view_.local_base + kControlBytes; }
  size_t data_bytes() const { return window_bytes_ - kControlBytes; }
  size_t window_bytes() const { return window_bytes_; }
  const std::vector<char*>& peer_bases() const { return peer_bases_host_; }
  int rank() const { return view_.rank; }
  int num_ranks() const { return view_.num_ranks; }
  double timeout_s() const { return options_.timeout_s; }

  // Stream-ordered barrier across all ranks: every rank's prior work on `stream` (including its writes
  // into peers' windows) is visible to every rank's later work on its stream.
  void barrier(cudaStream_t stream);

  // Host wait on `stream`, bounded by the timeout; raises the device's wait record if a kernel timed out.
  void synchronize(cudaStream_t stream);
  // Raises expertlink::Error(kTimeout) if a device wait of this window has timed out.
  void raise_if_device_error() const;

  // Rank masking: `rank` is dead for every later launch on this window (see SymmetricView::masked). Also
  // clears a recorded timeout (the usual reason to mask), so that calls can go on.
  void mask_rank(int rank);
  void unmask_all() { view_.masked = 0; }

 private:
  const Communicator& comm_;
  RuntimeOptions options_;
  ncclDevComm dev_comm_{};
  bool dev_comm_created_ = false;
  void* window_ptr_ = nullptr;
  ncclWindow_t window_ = nullptr;
  size_t window_bytes_ = 0;
  char** peer_base_dev_ = nullptr;
  uint64_t* epoch_dev_ = nullptr;
  WaitRecord* record_host_ = nullptr;
  std::vector<char*> peer_bases_host_;
  SymmetricView view_{};
};

}  // namespace expertlink
