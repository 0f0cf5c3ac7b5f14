#include "internode/plan.hpp"

#include "check.hpp"

namespace expertlink::internode {

Plan make_plan(const Topology& topo, const CountLayout& layout, const std::vector<int32_t>& gathered) {
  const int R = topo.num_ranks, N = topo.num_nodes, L = topo.local_size, me = topo.rank;
  const int b = topo.node, i_me = topo.local_rank;
  EL_CHECK(layout.num_ranks == R && layout.num_nodes == N,
           "make_plan: layout of %d ranks / %d nodes, topology %d / %d", layout.num_ranks, layout.num_nodes,
           R, N);
  EL_CHECK(static_cast<int64_t>(gathered.size()) == int64_t(R) * layout.ints(),
           "make_plan: %zu gathered ints, expected %d ranks x %d", gathered.size(), R, layout.ints());
  auto block = [&](int s) { return gathered.data() + size_t(s) * layout.ints(); };
  static const char* names[] = {"num_tokens", "hidden", "topk", "num_experts"};
  for (int s = 0; s < R; ++s) {
    for (int f = 1; f < CountLayout::kHeader; ++f)
      EL_CHECK(block(s)[f] == block(0)[f],
               "rank %d and rank %d called with different %s: %d there, %d at rank 0", s, 0, names[f],
               block(s)[f], block(0)[f]);
  }
  auto per_rank = [&](int s, int d) { return int64_t(block(s)[layout.per_rank() + d]); };
  auto per_node = [&](int s, int n) { return int64_t(block(s)[layout.per_node() + n]); };

  Plan p;
  p.send1_off.assign(N + 1, 0);
  p.recv1_off.assign(N + 1, 0);
  for (int n = 0; n < N; ++n) {
    p.send1_off[n + 1] = p.send1_off[n] + per_node(me, n);
    p.recv1_off[n + 1] = p.recv1_off[n] + per_node(topo.rank_of(n, i_me), b);
  }
  // Stage 2: the forwarder (b, i) sends to (b, j) every token of the sources (a, i) that goes to (b, j).
  p.send2_off.assign(L + 1, 0);
  p.recv2_off.assign(L + 1, 0);
  for (int j = 0; j < L; ++j) {
    int64_t to_j = 0, from_j = 0;
    for (int a = 0; a < N; ++a) {
      to_j += per_rank(topo.rank_of(a, i_me), topo.rank_of(b, j));
      from_j += per_rank(topo.rank_of(a, j), me);
    }
    p.send2_off[j + 1] = p.send2_off[j] + to_j;
    p.recv2_off[j + 1] = p.recv2_off[j] + from_j;
  }
  p.rank_prefix.assign(R + 1, 0);
  p.src_record.assign(R, 0);
  for (int s = 0; s < R; ++s) {
    const int64_t next = p.rank_prefix[s] + per_rank(s, me);
    EL_CHECK(next <= INT32_MAX, "rank %d would receive more than 2^31 rows", me);
    p.rank_prefix[s + 1] = static_cast<int32_t>(next);
  }
  for (int i = 0; i < L; ++i) {
    int64_t rec = p.recv2_off[i];
    for (int a = 0; a < N; ++a) {
      const int s = topo.rank_of(a, i);
      p.src_record[s] = rec;
      rec += per_rank(s, me);
    }
  }
  const int E = block(0)[3], topk = block(0)[2];
  if (topk > 0 && E > 0) {
    EL_CHECK(E % R == 0 && E <= layout.max_experts, "num_experts = %d with %d ranks", E, R);
    const int local = E / R;
    p.expert_count.assign(local, 0);
    for (int s = 0; s < R; ++s)
      for (int j = 0; j < local; ++j) p.expert_count[j] += block(s)[layout.per_expert() + me * local + j];
  }
  return p;
}

}  // namespace expertlink::internode
