#include "ht/handle.hpp"

#include <algorithm>
#include <cstring>

#include "check.hpp"
#include "comm/control_layout.hpp"

namespace expertlink {

HtHandleState::~HtHandleState() {
  cudaFree(send_pos);
  cudaFree(token_mask);
  cudaFree(rank_prefix);
  cudaFree(dest_row0);
  cudaFree(chunk_prefix);
  cudaFree(src_tokens);
  cudaFree(expert_count);
  cudaFree(recv_src_token);
  if (host_counts != nullptr) cudaFreeHost(host_counts);
}

void HtHandleState::reserve(int tokens, int ranks, int local_experts) {
  if (send_pos == nullptr || int64_t(tokens) * ranks > alloc_send) {
    cudaFree(send_pos);
    alloc_send = std::max<int64_t>(1, int64_t(tokens) * ranks);
    EL_CUDA_CHECK(cudaMalloc(&send_pos, sizeof(int32_t) * alloc_send));
  }
  if (token_mask == nullptr || tokens > alloc_mask) {
    cudaFree(token_mask);
    alloc_mask = std::max(1, tokens);
    EL_CUDA_CHECK(cudaMalloc(&token_mask, sizeof(uint64_t) * alloc_mask));
  }
  if (ranks > alloc_ranks) {
    cudaFree(rank_prefix);
    cudaFree(dest_row0);
    cudaFree(chunk_prefix);
    cudaFree(src_tokens);
    EL_CUDA_CHECK(cudaMalloc(&rank_prefix, sizeof(int32_t) * (ranks + 1)));
    EL_CUDA_CHECK(cudaMalloc(&dest_row0, sizeof(int32_t) * ranks));
    EL_CUDA_CHECK(cudaMalloc(&chunk_prefix, sizeof(int32_t) * ranks * (kMaxChunks + 1)));
    EL_CUDA_CHECK(cudaMalloc(&src_tokens, sizeof(int32_t) * ranks));
    alloc_ranks = ranks;
  }
  if (host_counts == nullptr || local_experts > alloc_experts) {
    cudaFree(expert_count);
    if (host_counts != nullptr) cudaFreeHost(host_counts);
    const int n = std::max(local_experts, 1);
    EL_CUDA_CHECK(cudaMalloc(&expert_count, sizeof(int32_t) * n));
    EL_CUDA_CHECK(
        cudaHostAlloc(&host_counts, sizeof(int32_t) * (kernels::kHostHeader + n), cudaHostAllocMapped));
    std::memset(host_counts, 0, sizeof(int32_t) * (kernels::kHostHeader + n));
    EL_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_counts_dev), host_counts, 0));
    alloc_experts = n;
  }
}

void HtHandleState::reserve_recv(int64_t rows) {
  if (rows <= alloc_recv && recv_src_token != nullptr) return;
  cudaFree(recv_src_token);
  EL_CUDA_CHECK(cudaMalloc(&recv_src_token, sizeof(int32_t) * std::max<int64_t>(rows, 1)));
  alloc_recv = rows;
}

kernels::HtHandleView HtHandleState::view() const {
  kernels::HtHandleView v{};
  v.send_pos = send_pos;
  v.token_mask = token_mask;
  v.rank_prefix = rank_prefix;
  v.dest_row0 = dest_row0;
  v.chunk_prefix = chunk_prefix;
  v.src_tokens = src_tokens;
  v.expert_count = expert_count;
  v.recv_src_token = recv_src_token;
  v.host_counts = host_counts_dev;
  v.capacity = capacity;
  return v;
}

void HtHandleState::raise_flags() const {
  const volatile int32_t* h = host_counts;
  if (h[kernels::kHostBadExpert] != 0)
    EL_FAIL(ErrorCode::kInvalidArgument,
            "topk_idx[%d][%d] = %d is not an expert: num_experts = %d (the token was "
            "treated as not routed there)",
            h[3], h[4], h[5], num_experts);
  if (h[kernels::kHostOverCapacity] != 0)
    EL_FAIL(ErrorCode::kInvalidArgument,
            "%d rows arrived but the dispatch outputs hold %lld (capacity): rows past "
            "the capacity were not written; pass a larger capacity",
            h[kernels::kHostTotal], static_cast<long long>(capacity));
}

HtHandle::HtHandle() = default;
HtHandle::~HtHandle() = default;
HtHandle::HtHandle(HtHandle&&) noexcept = default;
HtHandle& HtHandle::operator=(HtHandle&&) noexcept = default;

bool HtHandle::valid() const {
  return state_ && state_->owner != nullptr;
}
int HtHandle::num_tokens() const {
  return state_ ? state_->num_tokens : 0;
}
int64_t HtHandle::capacity() const {
  return state_ ? state_->capacity : 0;
}

int64_t HtHandle::num_recv_tokens() const {
  if (!state_) return -1;
  if (state_->exact) return state_->num_recv;
  return static_cast<const volatile int32_t*>(state_->host_counts)[kernels::kHostTotal];
}

std::vector<int> HtHandle::num_recv_tokens_per_expert() const {
  std::vector<int> out;
  if (!state_ || state_->num_experts == 0) return out;
  const int local = state_->num_experts / state_->num_ranks;
  for (int j = 0; j < local; ++j)
    out.push_back(int{static_cast<const volatile int32_t*>(state_->host_counts)[kernels::kHostHeader + j]});
  return out;
}

const int32_t* HtHandle::rank_prefix() const {
  return state_ ? state_->rank_prefix : nullptr;
}
const int32_t* HtHandle::recv_src_token() const {
  return state_ ? state_->recv_src_token : nullptr;
}
const int32_t* HtHandle::send_pos() const {
  return state_ ? state_->send_pos : nullptr;
}

void HtHandle::check_capacity() const {
  EL_CHECK(valid(), "handle: not filled by Buffer::ht_notify");
  state_->raise_flags();
}

}  // namespace expertlink
