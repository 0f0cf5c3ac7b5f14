// What a bounded wait that ran out leaves for the host. Shared by host and device code (no CUDA here).
//
// Protocol: the record lives in host-mapped pinned memory. The first device thread whose wait times out
// claims it with atomicCAS(flag, 0, 1), fills the fields, then publishes with __threadfence_system() and
// flag = 2. Other waiters poll `flag` and leave early once it is non-zero, so the whole kernel drains.
// The host reads the record after the stream finishes (or its own deadline passes) and raises an
// expertlink::Error(kTimeout) with describe()'s text. A set record marks the window as broken for good.
#pragma once

#include <cstdint>
#include <string>

namespace expertlink {

enum class WaitSite : int32_t {
  kNone = 0,
  kBarrier = 1,          // counter = the peer's barrier signal slot
  kHtNotify = 3,         // counter = the peer's notify slot (its meta record for this round)
  kHtDispatchReady = 4,  // the peer has not started this dispatch round (its area may be in use)
  kHtDispatchChunk = 5,  // counter = chunk index of the peer's rows
  kHtCombineReady = 6,
  kHtCombineChunk = 7,
  kHtCombineDone = 8,  // the peer has not finished reading this rank's receive region (direct combine)
  // Low-latency path: counter = buffer parity (0 or 1).
  kLlDispatchFree = 20,    // the peer has not finished reading its dispatch area of the previous use
  kLlDispatchData = 21,    // the peer's dispatch messages of this use have not arrived
  kLlCombineFree = 22,     // the peer has not finished reading its combine area of the previous use
  kLlCombineWeights = 23,  // the peer's combine weights of this use have not arrived
  kLlCombineData = 24,     // the peer's combine partial sums of this use have not arrived
  kBulkCopy = 30,          // a local bulk (TMA) copy did not complete; peer = this rank
  kHtSendSteps = 31,       // a block's sending warps did not finish a step (publisher warp); peer = this rank
  // Not waits: errors found on the device, reported through the same record.
  // counter = which argument (0 hidden, 1 topk, 2 num_experts, 3 direct dispatch, 4 direct combine);
  // expected = ours, seen = peer's
  kMismatch = 101,
};

struct WaitRecord {
  int32_t flag;     // 0 none, 1 being written, 2 complete
  int32_t site;     // WaitSite
  int32_t rank;     // the rank that waited
  int32_t peer;     // the rank it waited for (-1: unknown / local)
  int32_t counter;  // which counter/slot (site specific)
  int32_t reserved;
  uint64_t expected;  // waited until value >= expected
  uint64_t seen;      // last value read
  uint64_t waited_ns;
};

const char* wait_site_name(WaitSite site);
std::string describe(const WaitRecord& record);

}  // namespace expertlink
