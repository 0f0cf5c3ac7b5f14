// How long at least one of a set of GPU activities was running: the length of the union of their
// [start, end) intervals (kernel time, kernel_clock.hpp: an operation's kernels may overlap, e.g. dependent
// launches). CUDA-free, tested on CI (bench/tests/bench_test.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace expertlink::bench {

// [start, end) in ns, end >= start.
using Intervals = std::vector<std::pair<uint64_t, uint64_t>>;

// Sorts `intervals` and returns the length of their union; 0 if empty.
inline uint64_t busy_ns(Intervals& intervals) {
  std::sort(intervals.begin(), intervals.end());
  uint64_t total = 0, open = 0, close = 0;
  bool any = false;
  for (const auto& [start, end] : intervals) {
    if (any && start <= close) {
      close = std::max(close, end);
      continue;
    }
    total += close - open;  // a gap (or the first interval): the open one is complete
    open = start;
    close = end;
    any = true;
  }
  return total + (close - open);
}

}  // namespace expertlink::bench
