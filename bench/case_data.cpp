#include "case_data.hpp"

#include "bench_kernels.hpp"
#include "check.hpp"
#include "timing.hpp"

namespace expertlink::bench {

CaseData::CaseData(Family family, int64_t tokens, workload::Routing routing, uint64_t seed, int rank,
                   int num_ranks, ncclComm_t comm, cudaStream_t stream, double wait_timeout_s)
    : routing_(routing), seed_(seed) {
  const workload::Shape shape = family_shape(family, tokens);
  EL_CHECK(num_ranks >= 1 && num_ranks <= 32, "num_ranks = %d: the bench handles 1 to 32 ranks", num_ranks);
  EL_CHECK(shape.num_experts % num_ranks == 0,
           "num_experts = %d of the %s shape is not divisible by %d ranks: pick --gpus among its divisors",
           shape.num_experts, shape.name, num_ranks);
  EL_CHECK(shape.hidden % 512 == 0, "hidden = %lld: the bench's row copies need a multiple of 512",
           static_cast<long long>(shape.hidden));

  routings_.num_ranks = num_ranks;
  routings_.tokens = tokens;
  routings_.topk = shape.topk;
  routings_.num_experts = shape.num_experts;
  for (int r = 0; r < num_ranks; ++r)
    routings_.topk_all.push_back(workload::make_topk_idx(tokens, shape.topk, shape.num_experts, num_ranks,
                                                         routing, seed, r, shape.masked_slots));
  for (const auto& idx : routings_.topk_all)
    EL_CHECK(static_cast<int64_t>(idx.size()) == tokens * shape.topk,
             "make_topk_idx returned %zu entries, expected tokens * topk = %lld", idx.size(),
             static_cast<long long>(tokens * shape.topk));
  traffic_ = count_traffic(family, routings_);
  const std::vector<int64_t>& own_idx = routings_.topk_all[static_cast<size_t>(rank)];
  x_host_ = workload::make_bf16(static_cast<size_t>(tokens * shape.hidden), seed, rank);
  weights_host_ = workload::make_topk_weights(own_idx, shape.topk, seed, rank);
  EL_CHECK(
      x_host_.size() == static_cast<size_t>(tokens * shape.hidden) && weights_host_.size() == own_idx.size(),
      "workload generators returned %zu values and %zu weights", x_host_.size(), weights_host_.size());

  const size_t x_bytes = x_host_.size() * sizeof(uint16_t);
  x_bf16_ = DeviceBuffer(x_bytes);
  topk_idx_ = DeviceBuffer(own_idx.size() * sizeof(int64_t));
  topk_weights_ = DeviceBuffer(weights_host_.size() * sizeof(float));
  EL_CUDA_CHECK(cudaMemcpyAsync(x_bf16_.as(), x_host_.data(), x_bytes, cudaMemcpyHostToDevice, stream));
  EL_CUDA_CHECK(
      cudaMemcpyAsync(topk_idx_.as(), own_idx.data(), topk_idx_.bytes(), cudaMemcpyHostToDevice, stream));
  EL_CUDA_CHECK(cudaMemcpyAsync(topk_weights_.as(), weights_host_.data(), topk_weights_.bytes(),
                                cudaMemcpyHostToDevice, stream));

  all_x_bf16_ = DeviceBuffer(x_bytes * num_ranks);
  EL_NCCL_CHECK(ncclAllGather(x_bf16_.as(), all_x_bf16_.as(), x_bytes, ncclInt8, comm, stream));
  if (family == Family::kHt) {
    const size_t fp8_bytes = static_cast<size_t>(tokens * shape.hidden);
    const size_t scale_bytes = static_cast<size_t>(tokens * (shape.hidden / 128)) * sizeof(float);
    x_fp8_ = DeviceBuffer(fp8_bytes);
    x_scales_ = DeviceBuffer(scale_bytes);
    launch_quantize_fp8(x_bf16_.as<uint16_t>(), tokens, shape.hidden, x_fp8_.as<uint8_t>(),
                        x_scales_.as<float>(), stream);
    all_x_fp8_ = DeviceBuffer(fp8_bytes * num_ranks);
    all_x_scales_ = DeviceBuffer(scale_bytes * num_ranks);
    EL_NCCL_CHECK(ncclGroupStart());
    EL_NCCL_CHECK(ncclAllGather(x_fp8_.as(), all_x_fp8_.as(), fp8_bytes, ncclInt8, comm, stream));
    EL_NCCL_CHECK(ncclAllGather(x_scales_.as(), all_x_scales_.as(), scale_bytes, ncclInt8, comm, stream));
    EL_NCCL_CHECK(ncclGroupEnd());
  }
  wait_stream(stream, wait_timeout_s, "the inputs' upload and gather");

  inputs_ = Inputs{family,
                   tokens,
                   shape.hidden,
                   shape.topk,
                   shape.num_experts,
                   rank,
                   num_ranks,
                   x_bf16_.as<uint16_t>(),
                   x_fp8_.as<uint8_t>(),
                   x_scales_.as<float>(),
                   topk_idx_.as<int64_t>(),
                   topk_weights_.as<float>()};
}

}  // namespace expertlink::bench
