#include "comm/host_wait.hpp"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <thread>

#include "check.hpp"
#include "expertlink/options.hpp"

namespace expertlink {

RuntimeOptions::RuntimeOptions() : timeout_s(5.0) {
  if (const char* env = std::getenv("EXPERTLINK_TIMEOUT_S")) {
    char* end = nullptr;
    double v = std::strtod(env, &end);
    EL_CHECK(end != env && *end == '\0' && v > 0,
             "EXPERTLINK_TIMEOUT_S = '%s' is not a positive number of seconds", env);
    timeout_s = v;
  }
}

const char* wait_site_name(WaitSite site) {
  switch (site) {
    case WaitSite::kNone:
      return "none";
    case WaitSite::kBarrier:
      return "barrier";
    case WaitSite::kHtNotify:
      return "HT notify (count exchange)";
    case WaitSite::kHtDispatchReady:
      return "HT dispatch (receiver ready)";
    case WaitSite::kHtDispatchChunk:
      return "HT dispatch (chunk arrival)";
    case WaitSite::kHtCombineReady:
      return "HT combine (receiver ready)";
    case WaitSite::kHtCombineChunk:
      return "HT combine (chunk arrival)";
    case WaitSite::kHtCombineDone:
      return "HT dispatch (readers of the receive region done)";
    case WaitSite::kLlDispatchFree:
      return "LL dispatch (receiver's buffer free)";
    case WaitSite::kLlDispatchData:
      return "LL dispatch (data arrival)";
    case WaitSite::kLlCombineFree:
      return "LL combine (receiver's buffer free)";
    case WaitSite::kLlCombineWeights:
      return "LL combine (weights arrival)";
    case WaitSite::kLlCombineData:
      return "LL combine (data arrival)";
    case WaitSite::kBulkCopy:
      return "bulk copy (local, TMA)";
    case WaitSite::kHtSendSteps:
      return "HT dispatch (the block's sending warps, local)";
    case WaitSite::kMismatch:
      return "argument mismatch";
  }
  return "unknown site";
}

std::string describe(const WaitRecord& r) {
  if (r.site == static_cast<int32_t>(WaitSite::kMismatch)) {
    static const char* names[] = {
        "hidden", "topk", "num_experts",
        "recv_x placement (1: the view Buffer::ht_window_recv_x returned, 0: not)",
        "combine x placement (1: the view Buffer::ht_window_recv_x returned, 0: not)"};
    return detail::format("rank %d and rank %d called with different %s: %llu here, %llu there", r.rank,
                          r.peer, names[r.counter < 5 ? r.counter : 0],
                          static_cast<unsigned long long>(r.expected),
                          static_cast<unsigned long long>(r.seen));
  }
  return detail::format(
      "rank %d timed out after %.3f s in %s waiting for rank %d: counter %d expected >= %llu, saw %llu",
      r.rank, r.waited_ns * 1e-9, wait_site_name(static_cast<WaitSite>(r.site)), r.peer, r.counter,
      static_cast<unsigned long long>(r.expected), static_cast<unsigned long long>(r.seen));
}

void raise_if_recorded(WaitRecord* record) {
  std::atomic_thread_fence(std::memory_order_acquire);
  if (reinterpret_cast<const volatile int32_t*>(&record->flag)[0] != 2) return;
  const WaitRecord copy = *record;
  // A wait that ran out or ranks that disagree leave the window in an unknown state: it stays broken.
  EL_FAIL(copy.site >= 100 ? ErrorCode::kInvalidArgument : ErrorCode::kTimeout, "%s", describe(copy).c_str());
}

void wait_for_stream(cudaStream_t stream, double timeout_s, WaitRecord* record, int rank) {
  using Clock = std::chrono::steady_clock;
  // The host allows more than the device's own timeout so that a device wait that runs out is reported
  // with its record (whom it waited for) rather than as a bare host timeout.
  const auto deadline = Clock::now() + std::chrono::duration<double>(1.5 * timeout_s + 0.5);
  // Spin (yielding) for the first millisecond: a sleep costs ~50 us on Linux, far more than a typical
  // dispatch; then back off to sleeps so a long wait does not burn a core.
  const auto spin_until = Clock::now() + std::chrono::milliseconds(1);
  auto sleep = std::chrono::microseconds(20);
  for (;;) {
    cudaError_t st = cudaStreamQuery(stream);
    if (st == cudaSuccess) break;
    if (st != cudaErrorNotReady) EL_CUDA_CHECK(st);
    const auto now = Clock::now();
    if (now > deadline) {
      raise_if_recorded(record);
      EL_FAIL(ErrorCode::kTimeout, "rank %d: stream work did not finish within %.3f s", rank,
              1.5 * timeout_s + 0.5);
    }
    if (now < spin_until) {
      std::this_thread::yield();
      continue;
    }
    std::this_thread::sleep_for(sleep);
    if (sleep < std::chrono::microseconds(1000)) sleep *= 2;
  }
  raise_if_recorded(record);
}

}  // namespace expertlink
