// Device-local state of the low-latency path, owned by Buffer::State: use counters and finished-block
// counters of the LL kernels (device), the host-mapped flag of invalid expert ids, the host's view of
// which buffer halves have a split call in flight, and the zero-copy combine buffers. Allocated on the
// first LL call (ll_init in src/ll/ll_api.cpp), freed here.
#pragma once

#include <cstddef>
#include <cstdint>

namespace expertlink {

struct LlHookState;

struct LlState {
  uint64_t* seq = nullptr;        // device, kernels::LlSeq
  uint32_t* done = nullptr;       // device, kernels::LlDone
  int32_t* host_flags = nullptr;  // pinned + mapped [4]
  int32_t* host_flags_dev = nullptr;
  int grid = 0;  // blocks of every LL kernel
  // Calls so far; the next call of a kind uses parity calls % 2.
  int64_t dispatch_calls = 0, combine_calls = 0;
  // Per parity: the split call whose hook has not been called yet (nullptr: none), and its call number.
  const LlHookState* dispatch_pending[2] = {nullptr, nullptr};
  const LlHookState* combine_pending[2] = {nullptr, nullptr};
  int64_t dispatch_pending_call[2] = {0, 0}, combine_pending_call[2] = {0, 0};
  void* combine_buffer[2] = {nullptr, nullptr};  // get_next_ll_combine_buffer, per parity
  size_t combine_buffer_bytes[2] = {0, 0};

  LlState() = default;
  ~LlState();
  LlState(const LlState&) = delete;
  LlState& operator=(const LlState&) = delete;
  bool ready() const { return seq != nullptr; }
};

}  // namespace expertlink
