#include "timing.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "bench_kernels.hpp"
#include "check.hpp"
#include "kernel_clock.hpp"
#include "workloads.hpp"

namespace expertlink::bench {
namespace {

constexpr size_t kFlushBytes = size_t{256} << 20;
constexpr int kMaxRanks = 64;

}  // namespace

void wait_stream(cudaStream_t stream, cudaEvent_t event, double timeout_s, const char* what) {
  EL_CUDA_CHECK(cudaEventRecord(event, stream));
  auto t0 = std::chrono::steady_clock::now();
  for (unsigned spin = 1;; ++spin) {
    cudaError_t err = cudaEventQuery(event);
    if (err == cudaSuccess) return;
    if (err != cudaErrorNotReady) EL_CUDA_CHECK(err);
    if ((spin & 1023u) == 0 &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > timeout_s)
      EL_FAIL(ErrorCode::kTimeout, "%s did not finish within %.0f s (a peer rank may have failed or hung)",
              what, timeout_s);
  }
}

void wait_stream(cudaStream_t stream, double timeout_s, const char* what) {
  cudaEvent_t ev;
  EL_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  struct Destroy {
    cudaEvent_t e;
    ~Destroy() { cudaEventDestroy(e); }
  } destroy{ev};
  wait_stream(stream, ev, timeout_s, what);
}

Timer::Timer(ncclComm_t comm, cudaStream_t stream, int warmup, int iters, double wait_timeout_s,
             const std::string& l2_flush, bool kernel_time)
    : comm_(comm),
      stream_(stream),
      warmup_(warmup),
      iters_(iters),
      wait_timeout_s_(wait_timeout_s),
      l2_flush_(l2_flush),
      flush_(kFlushBytes),
      scratch_(sizeof(double) * (kMaxRanks + 2)),
      host_(sizeof(double) * (kMaxRanks + 2)),
      kernel_time_(kernel_time) {
  EL_NCCL_CHECK(ncclCommCount(comm_, &num_ranks_));
  EL_CHECK(num_ranks_ <= kMaxRanks, "num_ranks = %d: the bench supports at most %d", num_ranks_, kMaxRanks);
  EL_CHECK(!kernel_time_ || KernelClock::available(), "kernel time needs el_bench built with CUPTI");
}

void Timer::flush_l2() {
  if (l2_flush_ == "off") return;
  if (l2_flush_ == "read") {  // the L2 left full of clean lines (diagnosis: what dirty lines cost)
    launch_read_buffer(flush_.as<uint4>(), flush_.bytes() / sizeof(uint4), scratch_.as<unsigned>(), stream_);
    return;
  }
  // A different value each time: every byte of the 256 MiB is really written, evicting the L2 (50-60 MB).
  EL_CUDA_CHECK(
      cudaMemsetAsync(flush_.as(), static_cast<int>(++flush_value_ & 0xff), flush_.bytes(), stream_));
}

void Timer::barrier() {
  EL_NCCL_CHECK(ncclAllReduce(scratch_.as<int>(), scratch_.as<int>(), 1, ncclInt32, ncclMax, comm_, stream_));
}

std::vector<double> Timer::allgather(double value) {
  auto* dev = scratch_.as<double>();
  EL_CUDA_CHECK(cudaMemcpyAsync(dev + 1 + num_ranks_, &value, sizeof value, cudaMemcpyHostToDevice, stream_));
  EL_NCCL_CHECK(ncclAllGather(dev + 1 + num_ranks_, dev + 1, 1, ncclFloat64, comm_, stream_));
  EL_CUDA_CHECK(cudaMemcpyAsync(host_.as<double>(), dev + 1, sizeof(double) * num_ranks_,
                                cudaMemcpyDeviceToHost, stream_));
  wait_stream(stream_, wait_timeout_s_, "allgather of the timings");
  return std::vector<double>(host_.as<double>(), host_.as<double>() + num_ranks_);
}

int64_t Timer::allreduce_sum(int64_t value) {
  auto* dev = reinterpret_cast<int64_t*>(scratch_.as<double>() + 1);
  EL_CUDA_CHECK(cudaMemcpyAsync(dev, &value, sizeof value, cudaMemcpyHostToDevice, stream_));
  EL_NCCL_CHECK(ncclAllReduce(dev, dev, 1, ncclInt64, ncclSum, comm_, stream_));
  EL_CUDA_CHECK(cudaMemcpyAsync(host_.as<int64_t>(), dev, sizeof value, cudaMemcpyDeviceToHost, stream_));
  wait_stream(stream_, wait_timeout_s_, "allreduce");
  return *host_.as<int64_t>();
}

Timed Timer::time(const std::function<void()>& run, const std::function<void()>& before,
                  const std::function<void()>& after) {
  for (int i = 0; i < warmup_; ++i) {
    if (before) before();
    flush_l2();
    barrier();
    run();
    if (after) after();
  }
  std::vector<cudaEvent_t> events(2 * static_cast<size_t>(iters_), nullptr);
  for (auto& e : events) EL_CUDA_CHECK(cudaEventCreate(&e));
  struct Destroy {
    std::vector<cudaEvent_t>& ev;
    ~Destroy() {
      for (auto e : ev)
        if (e != nullptr) cudaEventDestroy(e);
    }
  } destroy{events};
  for (int i = 0; i < iters_; ++i) {
    if (before) before();
    flush_l2();
    barrier();
    EL_CUDA_CHECK(cudaEventRecord(events[2 * i], stream_));
    run();
    EL_CUDA_CHECK(cudaEventRecord(events[2 * i + 1], stream_));
    if (after) after();
  }
  wait_stream(stream_, wait_timeout_s_, "the timed runs");
  std::vector<double> us;
  for (int i = 0; i < iters_; ++i) {
    float ms = 0;
    EL_CUDA_CHECK(cudaEventElapsedTime(&ms, events[2 * i], events[2 * i + 1]));
    us.push_back(static_cast<double>(ms) * 1e3);
  }
  Timed t;
  t.rank_us = allgather(median(us));
  for (double v : t.rank_us) t.us = std::max(t.us, v);
  if (kernel_time_) time_kernels(t, run, before, after);
  return t;
}

void Timer::time_kernels(Timed& t, const std::function<void()>& run, const std::function<void()>& before,
                         const std::function<void()>& after) {
  std::vector<double> us;
  {
    KernelClock clock;
    for (int i = 0; i < iters_; ++i) {
      if (before) before();
      flush_l2();
      barrier();
      clock.begin_run(i);
      run();
      clock.end_run();
      if (after) after();
    }
    wait_stream(stream_, wait_timeout_s_, "the runs timed in kernel time");
    us = clock.run_us(iters_);
  }
  // Collective: a rank without kernel times sends NaN, and then no figure is made.
  t.rank_kernel_us = allgather(us.empty() ? std::nan("") : median(us));
  if (std::none_of(t.rank_kernel_us.begin(), t.rank_kernel_us.end(), [](double v) { return std::isnan(v); }))
    t.kernel_us = *std::max_element(t.rank_kernel_us.begin(), t.rank_kernel_us.end());
  else
    t.rank_kernel_us.clear();
}

}  // namespace expertlink::bench
