// The states behind LlHandle (device arrays describing one LL dispatch, grown on demand) and LlRecvHook
// (the receive half of a split call, launched when the hook is called).
#pragma once

#include <cstdint>

#include "expertlink/buffer.hpp"
#include "kernels/ll_kernels.hpp"

namespace expertlink {

struct LlHandleState {
  const Buffer::State* owner = nullptr;  // the buffer that filled it
  int num_ranks = 0, capacity = 0, hidden = 0, topk = 0, num_experts = 0, num_tokens = 0;
  // The dispatch's receive half has been launched (split mode: its hook was called): combine may run.
  bool received = false;
  bool dispatch_pending = false;  // a split dispatch into this handle waits for its hook
  int pending_combines = 0;       // split combines along this handle waiting for their hooks

  int64_t alloc_slots = 0, alloc_tokens = 0;
  int alloc_ranks = 0;
  int32_t* tok_slots = nullptr;
  int32_t* src_tokens = nullptr;
  uint64_t* dst_mask = nullptr;

  LlHandleState() = default;
  ~LlHandleState();
  LlHandleState(const LlHandleState&) = delete;
  LlHandleState& operator=(const LlHandleState&) = delete;
  // Grows the arrays for R ranks, capacity N, top-k K (no-op when large enough: graph-capture safe).
  void reserve(int ranks, int capacity_tokens, int topk_slots);
  kernels::LlHandleView view() const;
};

struct LlHookState {
  enum class Kind { kDispatch, kCombine };
  Buffer::State* owner = nullptr;
  Kind kind = Kind::kDispatch;
  int parity = 0;
  int64_t call = 0;                 // the call number, for messages
  LlHandleState* handle = nullptr;  // dispatch: marked received when the hook runs
  kernels::LlDispatchParams dispatch{};
  kernels::LlCombineParams combine{};
};

// Launches the receive half of a split call (src/ll/ll_api.cpp).
void ll_receive(LlHookState& hook, cudaStream_t stream);

}  // namespace expertlink
