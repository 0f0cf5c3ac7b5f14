// EXPERTLINK_LL_TRACE (ll_kernels.hpp): the LL kernels' phase stamps, kept per kernel kind, and their
// printout. Diagnostics only: reading the previous call's stamps synchronizes the device.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "check.hpp"
#include "kernels/ll_kernels.hpp"
#include "kernels/trace_common.hpp"

namespace expertlink::kernels {
namespace {

constexpr int kWarps = kLlThreads / 32;

const char* const kDispatchNames[kLlTracePoints] = {
    "send begin", "send loaded",   "send stored", "send fenced", "send flagged", "recv begin",
    "recv meta",  "recv expanded", "recv end",    "end",         "send cast",    "recv flag"};
const char* const kCombineNames[kLlTracePoints] = {"send begin", "send weights",
                                                   "send units", "send flushed",
                                                   "recv begin", "recv summed",
                                                   "end",        "send weights in",
                                                   "recv flag",  "",
                                                   "",           ""};

// Every `every`-th call: per point, the earliest, median and latest warp, in us after the call's first stamp.
void print(LlTraceKind kind, const TraceStamps& st) {
  const std::vector<uint64_t> h = st.read();
  uint64_t origin = ~0ull;
  for (uint64_t v : h)
    if (v != 0) origin = std::min(origin, v);
  if (origin == ~0ull) return;
  const bool dispatch = kind == LlTraceKind::kDispatch;
  std::string line = dispatch ? "ll dispatch trace" : "ll combine trace";
  line += ", call " + std::to_string(st.calls) + " (us after the first stamp; earliest/median/latest warp):";
  for (int i = 0; i < kLlTracePoints; ++i) {
    const char* name = dispatch ? kDispatchNames[i] : kCombineNames[i];
    if (*name == '\0') continue;
    std::vector<double> us;
    for (size_t e = i; e < h.size(); e += kLlTracePoints)
      if (h[e] != 0) us.push_back((h[e] - origin) / 1e3);
    if (!us.empty()) line += std::string(" ") + name + " " + trace_spread(us) + ";";
  }
  std::fprintf(stderr, "%s\n", line.c_str());
}

}  // namespace

uint64_t* ll_trace_arm(LlTraceKind kind, int grid, int phases, cudaStream_t stream) {
#ifdef EXPERTLINK_LL_TRACE_STAMPS
  constexpr bool kBuilt = true;
#else
  constexpr bool kBuilt = false;
#endif
  static const long every = trace_every("EXPERTLINK_LL_TRACE", kBuilt, "-DEXPERTLINK_LL_TRACE=ON");
  if (every == 0 || trace_capturing(stream)) return nullptr;
  static TraceStamps states[2];
  TraceStamps& st = states[kind == LlTraceKind::kDispatch ? 0 : 1];
  if ((phases & kLlSend) == 0) return st.device;  // the receive half of a split call: same stamps
  if (st.device != nullptr && st.calls % every == 0) print(kind, st);
  return st.start_call(static_cast<size_t>(grid) * kWarps * kLlTracePoints, stream);
}

}  // namespace expertlink::kernels
