// One rank's data for one case (family, tokens per rank, routing): its inputs on its GPU, made from
// expertlink/workload.hpp's generators; every rank's routing on the host (layouts, bytes, expected rows);
// and every rank's inputs gathered onto this GPU with ncclAllGather, so that rows that arrive can be
// checked against their source on the device. The gather is the checker's, not part of any timed path.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_runtime.h>
#include <nccl.h>

#include "device_buffer.hpp"
#include "workloads.hpp"

namespace expertlink::bench {

// What an implementation reads: one rank's inputs on its GPU.
struct Inputs {
  Family family;
  int64_t tokens;
  int64_t hidden;
  int topk;
  int num_experts;
  int rank;
  int num_ranks;
  const uint16_t* x_bf16;     // [tokens, hidden] BF16
  const uint8_t* x_fp8;       // [tokens, hidden] e4m3, HT only (quantized from x_bf16 per 128 channels)
  const float* x_scales;      // [tokens, hidden / 128] dequantization scales, HT only
  const int64_t* topk_idx;    // [tokens, topk], -1 = no expert
  const float* topk_weights;  // [tokens, topk], 0 where topk_idx is -1
};

class CaseData {
 public:
  CaseData(Family family, int64_t tokens, workload::Routing routing, uint64_t seed, int rank, int num_ranks,
           ncclComm_t comm, cudaStream_t stream, double wait_timeout_s);

  const Inputs& inputs() const { return inputs_; }
  Family family() const { return inputs_.family; }
  workload::Routing routing() const { return routing_; }
  uint64_t seed() const { return seed_; }  // of the generators: any rank's weights can be made again
  const Routings& routings() const { return routings_; }
  const Traffic& traffic() const { return traffic_; }
  const std::vector<uint16_t>& x_host() const { return x_host_; }  // this rank's x
  const std::vector<float>& weights_host() const { return weights_host_; }

  // Every rank's inputs, [num_ranks, tokens, ...], on this GPU.
  const uint16_t* all_x_bf16() const { return all_x_bf16_.as<uint16_t>(); }
  const uint8_t* all_x_fp8() const { return all_x_fp8_.as<uint8_t>(); }
  const float* all_x_scales() const { return all_x_scales_.as<float>(); }

 private:
  Inputs inputs_{};
  workload::Routing routing_;
  uint64_t seed_;
  Routings routings_;
  Traffic traffic_;
  std::vector<uint16_t> x_host_;
  std::vector<float> weights_host_;
  DeviceBuffer x_bf16_, x_fp8_, x_scales_, topk_idx_, topk_weights_;
  DeviceBuffer all_x_bf16_, all_x_fp8_, all_x_scales_;
};

}  // namespace expertlink::bench
