#include "ll/ll_handle.hpp"

#include <algorithm>

#include "check.hpp"

namespace expertlink {

LlHandleState::~LlHandleState() {
  cudaFree(tok_slots);
  cudaFree(src_tokens);
  cudaFree(dst_mask);
}

void LlHandleState::reserve(int ranks, int capacity_tokens, int topk_slots) {
  const int64_t slots = int64_t(ranks) * capacity_tokens * topk_slots;
  if (tok_slots == nullptr || slots > alloc_slots) {
    cudaFree(tok_slots);
    tok_slots = nullptr;
    alloc_slots = std::max<int64_t>(slots, 1);
    EL_CUDA_CHECK(cudaMalloc(&tok_slots, sizeof(int32_t) * alloc_slots));
  }
  if (src_tokens == nullptr || ranks > alloc_ranks) {
    cudaFree(src_tokens);
    src_tokens = nullptr;
    alloc_ranks = std::max(ranks, 1);
    EL_CUDA_CHECK(cudaMalloc(&src_tokens, sizeof(int32_t) * alloc_ranks));
  }
  if (dst_mask == nullptr || capacity_tokens > alloc_tokens) {
    cudaFree(dst_mask);
    dst_mask = nullptr;
    alloc_tokens = std::max(capacity_tokens, 1);
    EL_CUDA_CHECK(cudaMalloc(&dst_mask, sizeof(uint64_t) * alloc_tokens));
  }
}

kernels::LlHandleView LlHandleState::view() const {
  return {tok_slots, src_tokens, dst_mask};
}

LlHandle::LlHandle() = default;
LlHandle::~LlHandle() = default;
LlHandle::LlHandle(LlHandle&&) noexcept = default;
LlHandle& LlHandle::operator=(LlHandle&&) noexcept = default;

bool LlHandle::valid() const {
  return state_ && state_->owner != nullptr;
}
int LlHandle::num_tokens() const {
  return state_ ? state_->num_tokens : 0;
}
int LlHandle::num_max_dispatch_tokens_per_rank() const {
  return state_ ? state_->capacity : 0;
}
int LlHandle::hidden() const {
  return state_ ? state_->hidden : 0;
}
int LlHandle::topk() const {
  return state_ ? state_->topk : 0;
}
int LlHandle::num_experts() const {
  return state_ ? state_->num_experts : 0;
}
int LlHandle::num_ranks() const {
  return state_ ? state_->num_ranks : 0;
}

LlRecvHook::LlRecvHook() = default;
LlRecvHook::~LlRecvHook() = default;
LlRecvHook::LlRecvHook(LlRecvHook&&) noexcept = default;
LlRecvHook& LlRecvHook::operator=(LlRecvHook&&) noexcept = default;

bool LlRecvHook::valid() const {
  return state_ != nullptr;
}

void LlRecvHook::receive(cudaStream_t stream) {
  EL_CHECK(state_ != nullptr,
           "LlRecvHook: this hook holds no receive half (not a split call, or already called)");
  std::unique_ptr<LlHookState> hook = std::move(state_);
  ll_receive(*hook, stream);
}

}  // namespace expertlink
