#include "kernel_clock.hpp"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>

#include "busy_time.hpp"
#include "check.hpp"

#ifdef EL_BENCH_CUPTI
#include <cupti.h>
#endif

namespace expertlink::bench {

#ifndef EL_BENCH_CUPTI

bool KernelClock::available() {
  return false;
}
KernelClock::KernelClock() {
  EL_FAIL(ErrorCode::kUnsupported, "el_bench was built without CUPTI");
}
KernelClock::~KernelClock() = default;
void KernelClock::begin_run(int) {}
void KernelClock::end_run() {}
std::vector<double> KernelClock::run_us(int) {
  return {};
}

#else

namespace {

#define EL_CUPTI_CHECK(call)                                            \
  do {                                                                  \
    CUptiResult el_cupti_status = (call);                               \
    if (el_cupti_status != CUPTI_SUCCESS) {                             \
      const char* el_cupti_text = "unknown";                            \
      cuptiGetResultString(el_cupti_status, &el_cupti_text);            \
      EL_FAIL(ErrorCode::kCuda, "%s failed: %s", #call, el_cupti_text); \
    }                                                                   \
  } while (0)

constexpr CUpti_ExternalCorrelationKind kRunKind = CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM0;
constexpr size_t kBufferBytes = size_t{8} << 20;

// What the callbacks collect (CUPTI calls them from its own thread).
struct Collected {
  std::mutex mutex;
  std::map<uint32_t, uint64_t> run_of;  // API correlation id -> run
  std::map<uint32_t, Intervals> work;   // correlation id -> [start, end) ns
  uint64_t dropped = 0;
};
Collected collected;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

// A kernel, memset or copy record (the three layouts share these fields' names): its interval, by
// correlation id.
template <class Record>
void add_work(const CUpti_Activity* activity) {
  const auto* r = reinterpret_cast<const Record*>(activity);
  collected.work[r->correlationId].emplace_back(r->start, r->end);
}

void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream_id, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> lock(collected.mutex);
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL:
        add_work<CUpti_ActivityKernel10>(record);
        break;
      case CUPTI_ACTIVITY_KIND_MEMSET:
        add_work<CUpti_ActivityMemset4>(record);
        break;
      case CUPTI_ACTIVITY_KIND_MEMCPY:
        add_work<CUpti_ActivityMemcpy6>(record);
        break;
      case CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION: {
        auto* e = reinterpret_cast<CUpti_ActivityExternalCorrelation*>(record);
        if (e->externalKind == kRunKind) collected.run_of[e->correlationId] = e->externalId;
        break;
      }
      default:
        break;
    }
  }
  size_t dropped = 0;
  if (cuptiActivityGetNumDroppedRecords(context, stream_id, &dropped) == CUPTI_SUCCESS)
    collected.dropped += dropped;
  std::free(buffer);
}

// The API kinds are on because CUPTI emits the external correlation records with the API records (without
// them no work was tied to its run: every kernel time read 0, 2x H200, 2026-11-28).
constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                         CUPTI_ACTIVITY_KIND_MEMSET,
                                         CUPTI_ACTIVITY_KIND_MEMCPY,
                                         CUPTI_ACTIVITY_KIND_RUNTIME,
                                         CUPTI_ACTIVITY_KIND_DRIVER,
                                         CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION};

}  // namespace

bool KernelClock::available() {
  return true;
}

KernelClock::KernelClock() {
  {
    std::lock_guard<std::mutex> lock(collected.mutex);
    collected.run_of.clear();
    collected.work.clear();
    collected.dropped = 0;
  }
  EL_CUPTI_CHECK(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed));
  for (CUpti_ActivityKind kind : kKinds) EL_CUPTI_CHECK(cuptiActivityEnable(kind));
}

KernelClock::~KernelClock() {
  for (CUpti_ActivityKind kind : kKinds) cuptiActivityDisable(kind);
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
}

void KernelClock::begin_run(int i) {
  EL_CUPTI_CHECK(cuptiActivityPushExternalCorrelationId(kRunKind, static_cast<uint64_t>(i)));
}

void KernelClock::end_run() {
  uint64_t last = 0;
  EL_CUPTI_CHECK(cuptiActivityPopExternalCorrelationId(kRunKind, &last));
}

std::vector<double> KernelClock::run_us(int runs) {
  EL_CUPTI_CHECK(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED));
  std::lock_guard<std::mutex> lock(collected.mutex);
  EL_CHECK(collected.dropped == 0, "CUPTI dropped %llu activity records",
           static_cast<unsigned long long>(collected.dropped));
  std::vector<Intervals> per_run(static_cast<size_t>(runs));
  for (const auto& [correlation, intervals] : collected.work) {
    auto it = collected.run_of.find(correlation);
    if (it == collected.run_of.end() || it->second >= static_cast<uint64_t>(runs)) continue;
    auto& mine = per_run[it->second];
    mine.insert(mine.end(), intervals.begin(), intervals.end());
  }
  size_t tied = 0;
  for (const auto& intervals : per_run) tied += intervals.size();
  if (tied == 0) {  // a diagnosis, not a failure of the run: the event times stand
    std::fprintf(stderr,
                 "kernel time: none of the %zu GPU activity records (%zu API calls tagged) belongs to a run; "
                 "no kernel time recorded\n",
                 collected.work.size(), collected.run_of.size());
    return {};
  }
  std::vector<double> us;
  for (auto& intervals : per_run) us.push_back(static_cast<double>(busy_ns(intervals)) / 1e3);
  return us;
}

#endif

}  // namespace expertlink::bench
