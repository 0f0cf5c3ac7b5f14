// EXPERTLINK_HT_TRACE (ht_kernels.hpp): the HT dispatch and combine kernels' phase stamps, per block and
// chunk, and the printout of where a call's time went. Diagnostics only: reading the previous call's
// stamps synchronizes the device.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "check.hpp"
#include "comm/control_layout.hpp"
#include "kernels/ht_kernels.hpp"
#include "kernels/trace_common.hpp"

namespace expertlink::kernels {
namespace {

constexpr size_t kPerBlock = size_t(kMaxChunks) * kHtTracePoints;  // stamps of one block

// Per block: time its sending half spent on rows (start -> issued) and on fences (issued -> published),
// when it published its last chunk; time its receiving half spent waiting (wait -> arrived) and working
// (arrived -> done), when it finished; all in us, times of day after the call's first stamp.
void print(HtTraceKind kind, const TraceStamps& st) {
  const std::vector<uint64_t> h = st.read();
  const int grid = static_cast<int>(h.size() / kPerBlock);
  uint64_t origin = ~0ull, last = 0;
  for (uint64_t v : h)
    if (v != 0) {
      origin = std::min(origin, v);
      last = std::max(last, v);
    }
  if (origin == ~0ull) return;
  std::vector<double> rows, fences, send_end, waits, work, recv_end;
  int chunks = 0;
  for (int b = 0; b < grid; ++b) {
    double r = 0, f = 0, w = 0, x = 0;
    uint64_t se = 0, re = 0;
    for (int k = 0; k < kMaxChunks; ++k) {
      const uint64_t* t = &h[b * kPerBlock + size_t(k) * kHtTracePoints];
      if (t[kHtSendStart] != 0 && t[kHtSendIssued] >= t[kHtSendStart]) {
        r += (t[kHtSendIssued] - t[kHtSendStart]) / 1e3;
        ++chunks;
      }
      if (t[kHtSendIssued] != 0 && t[kHtSendPublished] >= t[kHtSendIssued])
        f += (t[kHtSendPublished] - t[kHtSendIssued]) / 1e3;
      se = std::max(se, t[kHtSendPublished]);
      if (t[kHtRecvWait] != 0 && t[kHtRecvArrived] >= t[kHtRecvWait])
        w += (t[kHtRecvArrived] - t[kHtRecvWait]) / 1e3;
      if (t[kHtRecvArrived] != 0 && t[kHtRecvDone] >= t[kHtRecvArrived])
        x += (t[kHtRecvDone] - t[kHtRecvArrived]) / 1e3;
      re = std::max(re, t[kHtRecvDone]);
    }
    rows.push_back(r);
    fences.push_back(f);
    waits.push_back(w);
    work.push_back(x);
    if (se != 0) send_end.push_back((se - origin) / 1e3);
    if (re != 0) recv_end.push_back((re - origin) / 1e3);
  }
  const bool dispatch = kind == HtTraceKind::kDispatch;
  std::fprintf(
      stderr,
      "ht %s trace, call %ld, %d blocks, %d chunks sent (us, min/median/max over blocks): span %.1f; "
      "sending: rows %s, fences %s, last flag at %s; receiving: waits %s, %s %s, done at %s\n",
      dispatch ? "dispatch" : "combine", st.calls, grid, chunks, (last - origin) / 1e3,
      trace_spread(rows).c_str(), trace_spread(fences).c_str(), trace_spread(send_end).c_str(),
      trace_spread(waits).c_str(), dispatch ? "copy-out" : "sums", trace_spread(work).c_str(),
      trace_spread(recv_end).c_str());
}

}  // namespace

uint64_t* ht_trace_arm(HtTraceKind kind, int grid, cudaStream_t stream) {
#ifdef EXPERTLINK_HT_TRACE_STAMPS
  constexpr bool kBuilt = true;
#else
  constexpr bool kBuilt = false;
#endif
  static const long every = trace_every("EXPERTLINK_HT_TRACE", kBuilt, "-DEXPERTLINK_HT_TRACE=ON");
  if (every == 0 || trace_capturing(stream)) return nullptr;
  static TraceStamps states[2];
  TraceStamps& st = states[kind == HtTraceKind::kDispatch ? 0 : 1];
  if (st.device != nullptr && st.calls % every == 0) print(kind, st);
  return st.start_call(size_t(grid) * kPerBlock, stream);
}

}  // namespace expertlink::kernels
