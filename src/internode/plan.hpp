// The per-node packing plan of one internode HT dispatch, computed on the host from the counts every rank
// contributes (pure: unit-tested on the CPU). Combine runs the same plan backwards.
//
// Stages, for a token of source rank s = (node a, local i) going to ranks of node b:
//   1. network: s packs, per destination node b, the tokens with any destination rank on b (token order)
//      and sends that buffer once to the forwarder (b, i), the rank with the same local index there.
//   2. NVLink:  the forwarder (b, i) packs, per local rank j of its node, the records it received (source
//      node ascending, then token order) whose destinations include (b, j), and sends them to (b, j).
//   Output rows of (b, j) are ordered by source rank s = a * L + i, then token: the oracle's order. They
//   lie in the stage-2 receive buffer, segment of forwarder i, sub-segment of source node a.
#pragma once

#include <cstdint>
#include <vector>

#include "internode/topology.hpp"

namespace expertlink::internode {

// What every rank contributes to the count exchange (one fixed-size int32 block per rank).
struct CountLayout {
  static constexpr int kHeader = 4;  // [0] num_tokens, [1] hidden, [2] topk, [3] num_experts
  int num_ranks = 0, num_nodes = 0, max_experts = 0;
  int per_rank() const { return kHeader; }                            // [R]: tokens going to each rank
  int per_node() const { return kHeader + num_ranks; }                // [N]: tokens going to each node
  int per_expert() const { return kHeader + num_ranks + num_nodes; }  // [max_experts]: tokens per expert
  int ints() const { return kHeader + num_ranks + num_nodes + max_experts; }
};

struct Plan {
  // Stage 1 as a source: records for node b at [send1_off[b], send1_off[b + 1]) of the stage-1 send buffer.
  std::vector<int64_t> send1_off;  // [N + 1]
  // Stage 1 as a forwarder: records from source node a (rank (a, i)) at [recv1_off[a], recv1_off[a + 1]).
  std::vector<int64_t> recv1_off;  // [N + 1]
  // Stage 2 as a forwarder: records for local rank j at [send2_off[j], send2_off[j + 1]).
  std::vector<int64_t> send2_off;  // [L + 1]
  // Stage 2 as a receiver: records from forwarder i at [recv2_off[i], recv2_off[i + 1]).
  std::vector<int64_t> recv2_off;  // [L + 1]
  // Output rows from source rank s are [rank_prefix[s], rank_prefix[s + 1]); the first of them is record
  // src_record[s] of the stage-2 receive buffer (the rest follow it).
  std::vector<int32_t> rank_prefix;   // [R + 1]
  std::vector<int64_t> src_record;    // [R]
  std::vector<int32_t> expert_count;  // [E / R] rows per local expert, not yet aligned (empty without topk)

  int64_t num_recv() const { return rank_prefix.back(); }
  int64_t send1_total() const { return send1_off.back(); }
  int64_t recv1_total() const { return recv1_off.back(); }
  int64_t send2_total() const { return send2_off.back(); }
};

// `gathered` holds every rank's CountLayout block, rank-major. Checks that the ranks agree on hidden, topk
// and num_experts (kInvalidArgument naming both ranks otherwise).
Plan make_plan(const Topology& topo, const CountLayout& layout, const std::vector<int32_t>& gathered);

}  // namespace expertlink::internode
