// The state behind an HtHandle: device arrays that describe one HT dispatch, grown on demand.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "expertlink/buffer.hpp"
#include "kernels/ht_kernels.hpp"

namespace expertlink {

namespace internode {
struct HandleExtra;
}

struct HtHandleState {
  const Buffer::State* owner = nullptr;  // the buffer that filled it
  int num_ranks = 0, num_tokens = 0, topk = 0, num_experts = 0, hidden = 0;
  int64_t capacity = 0;
  bool exact = false;
  int64_t num_recv = -1;  // host copy (exact sizing)

  // Allocated sizes.
  int alloc_ranks = 0, alloc_experts = 0;
  int64_t alloc_send = 0, alloc_recv = 0, alloc_mask = 0;
  int32_t* send_pos = nullptr;
  uint64_t* token_mask = nullptr;
  int32_t* rank_prefix = nullptr;
  int32_t* dest_row0 = nullptr;
  int32_t* chunk_prefix = nullptr;
  int32_t* src_tokens = nullptr;
  int32_t* expert_count = nullptr;
  int32_t* recv_src_token = nullptr;
  int32_t* host_counts = nullptr;                     // pinned, mapped
  int32_t* host_counts_dev = nullptr;                 // its device address
  std::shared_ptr<internode::HandleExtra> internode;  // the plan and lists of an internode notify

  ~HtHandleState();
  // Grows the arrays to hold T tokens, R ranks, E_local experts (notify side).
  void reserve(int tokens, int ranks, int local_experts);
  void reserve_recv(int64_t rows);
  kernels::HtHandleView view() const;
  // Raises what notify flagged on the host-mapped words (bad expert id, over capacity).
  void raise_flags() const;
};

}  // namespace expertlink
