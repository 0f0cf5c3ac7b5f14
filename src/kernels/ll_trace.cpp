// EXPERTLINK_LL_TRACE (ll_kernels.hpp): the LL kernels' phase stamps, kept per kernel kind, and their
// printout. Diagnostics only: reading the previous call's stamps synchronizes the device.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "check.hpp"
#include "kernels/ll_kernels.hpp"
#include "kernels/trace_common.hpp"

namespace expertlink::kernels {
namespace {

constexpr int kWarps = kLlThreads / 32;

struct TraceState {
  uint64_t* device = nullptr;
  size_t capacity = 0;  // entries allocated
  size_t entries = 0;   // grid * kWarps * kLlTracePoints of the last armed call
  long calls = 0;
};

const char* const kDispatchNames[kLlTracePoints] = {
    "send begin", "send loaded", "send stored",   "send fenced", "send flagged",
    "recv begin", "recv meta",   "recv expanded", "recv end",    "end"};
const char* const kCombineNames[kLlTracePoints] = {"send begin", "send weights",
                                                   "send units", "send flushed",
                                                   "recv begin", "recv summed",
                                                   "end",        "",
                                                   "",           ""};

// Every `every`-th call: per point, the earliest, median and latest warp, in us after the call's first stamp.
void print(LlTraceKind kind, const TraceState& st) {
  std::vector<uint64_t> h(st.entries);
  EL_CUDA_CHECK(cudaDeviceSynchronize());  // the halves of a split call may run on other streams
  EL_CUDA_CHECK(cudaMemcpy(h.data(), st.device, h.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost));
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
    if (us.empty()) continue;
    std::sort(us.begin(), us.end());
    char part[96];
    std::snprintf(part, sizeof part, " %s %.1f/%.1f/%.1f;", name, us.front(), us[us.size() / 2], us.back());
    line += part;
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
  static TraceState states[2];
  TraceState& st = states[kind == LlTraceKind::kDispatch ? 0 : 1];
  if ((phases & kLlSend) == 0) return st.device;  // the receive half of a split call: same stamps
  if (st.device != nullptr && st.calls % every == 0) print(kind, st);
  const size_t entries = static_cast<size_t>(grid) * kWarps * kLlTracePoints;
  if (entries > st.capacity) {
    if (st.device != nullptr) EL_CUDA_CHECK(cudaFree(st.device));
    EL_CUDA_CHECK(cudaMalloc(&st.device, entries * sizeof(uint64_t)));
    st.capacity = entries;
  }
  st.entries = entries;
  EL_CUDA_CHECK(cudaMemsetAsync(st.device, 0, entries * sizeof(uint64_t), stream));
  ++st.calls;
  return st.device;
}

}  // namespace expertlink::kernels
