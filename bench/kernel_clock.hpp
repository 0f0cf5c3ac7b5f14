// Kernel time: how long the GPU ran what one operation enqueued (kernels, memsets, copies), from CUPTI's
// activity records. Issue 4 states LL figures as kernel time, as DeepEP's bench_kineto does; the event
// time of WORKLOADS.md also holds the launch (~4.3 us for any kernel between two events after the
// bench's line-up) and stays the main figure. Built without CUPTI, available() is false and nothing else
// may be called.
#pragma once

#include <cstdint>
#include <vector>

namespace expertlink::bench {

class KernelClock {
 public:
  static bool available();

  // Records every kernel, memset and copy the process enqueues until the destructor.
  KernelClock();
  ~KernelClock();
  KernelClock(const KernelClock&) = delete;
  KernelClock& operator=(const KernelClock&) = delete;

  // Work the calling thread enqueues between begin_run(i) and end_run() belongs to run i (0 <= i < runs).
  void begin_run(int i);
  void end_run();

  // After the stream has finished: per run, the time at least one of its records was running (the union
  // of their intervals: dependent launches overlap), in us; a run that enqueued nothing gives 0. Empty
  // (with a note on stderr) when no record could be tied to any run.
  std::vector<double> run_us(int runs);
};

}  // namespace expertlink::bench
