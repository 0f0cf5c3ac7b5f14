// How every figure is timed (WORKLOADS.md): CUDA events around one run of the operation, warm-up first,
// the L2 flushed by writing a 256 MiB buffer before each run (outside the events), ranks lined up by a
// one-element allreduce before each run (outside the events, so no rank's time includes waiting for a
// late peer to start), median of the timed runs on each rank, and the slowest rank's median as the figure.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <nccl.h>

#include "device_buffer.hpp"

namespace expertlink::bench {

// Waits for all work enqueued on `stream` so far, at most `timeout_s` seconds; throws kTimeout naming
// `what` otherwise. Spins on an event (as cudaStreamSynchronize's default does) so that host-synced
// operations such as the NCCL baseline are not charged a sleep.
void wait_stream(cudaStream_t stream, double timeout_s, const char* what);
// The same with the caller's event (made with cudaEventDisableTiming), for waits on a timed path.
void wait_stream(cudaStream_t stream, cudaEvent_t event, double timeout_s, const char* what);

struct Timed {
  double us = 0;                // slowest rank's median
  std::vector<double> rank_us;  // every rank's median, by rank
  // Kernel time (kernel_clock.hpp), timed in runs of their own after the event-timed ones: the slowest
  // rank's median, and every rank's. Empty unless the Timer was made with kernel_time.
  std::optional<double> kernel_us;
  std::vector<double> rank_kernel_us;
};

class Timer {
 public:
  // l2_flush: "write", "read" or "off" (Options::l2_flush). kernel_time: also time every operation in
  // kernel time (needs KernelClock::available()).
  Timer(ncclComm_t comm, cudaStream_t stream, int warmup, int iters, double wait_timeout_s,
        const std::string& l2_flush = "write", bool kernel_time = false);

  // Collective: every rank calls it for the same operation. `run` enqueues one operation on the stream.
  // `before` (before the L2 flush and the line-up) and `after` (after the end event) enqueue untimed work
  // around every run, warm-up included; either may be empty.
  Timed time(const std::function<void()>& run, const std::function<void()>& before = {},
             const std::function<void()>& after = {});

  // Collective helpers on the same stream.
  void barrier();
  std::vector<double> allgather(double value);
  int64_t allreduce_sum(int64_t value);

 private:
  void flush_l2();
  // iters_ more runs, each in kernel time; Timed::kernel_us and rank_kernel_us.
  void time_kernels(Timed& t, const std::function<void()>& run, const std::function<void()>& before,
                    const std::function<void()>& after);

  ncclComm_t comm_;
  cudaStream_t stream_;
  int warmup_, iters_;
  double wait_timeout_s_;
  std::string l2_flush_;
  int num_ranks_ = 1;
  DeviceBuffer flush_;    // 256 MiB written before every run
  DeviceBuffer scratch_;  // barrier word and the gathered doubles
  PinnedBuffer host_;
  unsigned flush_value_ = 0;
  bool kernel_time_ = false;
};

}  // namespace expertlink::bench
