// The internode path's pure host parts: topology derivation from host hashes, and the per-node packing
// plan, checked by simulating the whole two-hop dispatch on the host (lists as the device builds them,
// messages as NCCL moves them) for every rank of several topologies and comparing the received order with
// the oracle's (source rank, then token).
#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

#include "expertlink/error.hpp"
#include "internode/plan.hpp"
#include "internode/topology.hpp"

namespace expertlink::internode {
namespace {

std::vector<uint64_t> hosts(std::initializer_list<int> ids) {
  std::vector<uint64_t> h;
  for (int i : ids) h.push_back(host_hash("host" + std::to_string(i)));
  return h;
}

TEST(InternodeTopology, NodeMajorHostsGiveNodesAndLocalIndices) {
  const auto h = hosts({0, 0, 1, 1});
  for (int r = 0; r < 4; ++r) {
    const Topology t = derive_topology(h, r);
    EXPECT_EQ(t.num_nodes, 2);
    EXPECT_EQ(t.local_size, 2);
    EXPECT_EQ(t.node, r / 2);
    EXPECT_EQ(t.local_rank, r % 2);
    EXPECT_TRUE(t.multi_node());
  }
}

TEST(InternodeTopology, LocalSizes1248AndSingleNode) {
  for (int L : {1, 2, 4, 8}) {
    std::vector<uint64_t> h;
    for (int n = 0; n < 3; ++n)
      for (int l = 0; l < L; ++l) h.push_back(host_hash("node" + std::to_string(n)));
    const Topology t = derive_topology(h, 2 * L - 1);
    EXPECT_EQ(t.num_nodes, 3) << "L = " << L;
    EXPECT_EQ(t.local_size, L);
    EXPECT_EQ(t.node, 1);
    EXPECT_EQ(t.local_rank, L - 1);
  }
  const Topology one = derive_topology(hosts({5, 5, 5, 5, 5, 5, 5, 5}), 3);
  EXPECT_EQ(one.num_nodes, 1);
  EXPECT_EQ(one.local_size, 8);
  EXPECT_FALSE(one.multi_node());
}

TEST(InternodeTopology, RejectsInterleavedAndUnequalHosts) {
  try {
    derive_topology(hosts({0, 1, 0, 1}), 0);
    FAIL() << "interleaved hosts accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_NE(std::string(e.what()).find("node-major"), std::string::npos) << e.what();
  }
  try {
    derive_topology(hosts({0, 0, 1}), 0);
    FAIL() << "unequal hosts accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_NE(std::string(e.what()).find("same number of ranks"), std::string::npos) << e.what();
  }
}

TEST(InternodeTopology, NcclHostIdIsHonoured) {
  ::setenv("NCCL_HOSTID", "emulated-node-3", 1);
  EXPECT_EQ(local_host_id(), "emulated-node-3");
  ::unsetenv("NCCL_HOSTID");
  EXPECT_NE(local_host_id(), "emulated-node-3");
  EXPECT_EQ(host_hash("a"), host_hash("a"));
  EXPECT_NE(host_hash("a"), host_hash("b"));
}

// ---- the plan, by simulation ----

struct Token {
  int src, t;
  bool operator==(const Token& o) const { return src == o.src && t == o.t; }
};

struct World {
  int N, L, R, E, K;
  std::vector<std::vector<std::vector<int>>> topk;  // [rank][token][k], -1 = none
  std::vector<std::vector<uint64_t>> masks;         // [rank][token]
};

World make_world(int N, int L, int E, int K, uint64_t seed, int empty_rank) {
  World w{N, L, N * L, E, K, {}, {}};
  std::mt19937_64 rng(seed);
  const int local = E / w.R;
  for (int s = 0; s < w.R; ++s) {
    const int T = s == empty_rank ? 0 : 20 + static_cast<int>(rng() % 40);
    w.topk.emplace_back();
    w.masks.emplace_back();
    for (int t = 0; t < T; ++t) {
      std::vector<int> ids;
      uint64_t m = 0;
      for (int k = 0; k < K; ++k) {
        int e = static_cast<int>(rng() % (E + 3)) - 1;  // some -1 slots
        if (e >= E) e = -1;
        ids.push_back(e);
        if (e >= 0) m |= 1ull << (e / local);
      }
      w.topk[s].push_back(ids);
      w.masks[s].push_back(m);
    }
  }
  return w;
}

// What rank s's count kernel writes.
std::vector<int32_t> count_block(const World& w, const CountLayout& layout, int s) {
  std::vector<int32_t> b(layout.ints(), 0);
  b[0] = static_cast<int32_t>(w.masks[s].size());
  b[1] = 7168;
  b[2] = w.K;
  b[3] = w.E;
  const int local = w.E / w.R;
  for (size_t t = 0; t < w.masks[s].size(); ++t) {
    const uint64_t m = w.masks[s][t];
    for (int d = 0; d < w.R; ++d) b[layout.per_rank() + d] += (m >> d) & 1;
    for (int n = 0; n < w.N; ++n) b[layout.per_node() + n] += ((m >> (n * w.L)) & ((1ull << w.L) - 1)) != 0;
    for (int k = 0; k < w.K; ++k) {
      const int e = w.topk[s][t][k];
      bool first = e >= 0;
      for (int j = 0; j < k && first; ++j) first = w.topk[s][t][j] != e;
      if (first) ++b[layout.per_expert() + e];
    }
    (void)local;
  }
  return b;
}

void check_world(const World& w) {
  CountLayout layout;
  layout.num_ranks = w.R;
  layout.num_nodes = w.N;
  layout.max_experts = 1024;
  std::vector<int32_t> gathered;
  for (int s = 0; s < w.R; ++s) {
    auto b = count_block(w, layout, s);
    gathered.insert(gathered.end(), b.begin(), b.end());
  }
  std::vector<uint64_t> h;
  for (int r = 0; r < w.R; ++r) h.push_back(host_hash("n" + std::to_string(r / w.L)));
  std::vector<Topology> topo;
  std::vector<Plan> plan;
  for (int r = 0; r < w.R; ++r) {
    topo.push_back(derive_topology(h, r));
    plan.push_back(make_plan(topo[r], layout, gathered));
  }
  // Stage 1: per-node lists in token order; each buffer goes to (n, local_rank).
  std::vector<std::vector<Token>> send1(w.R), recv1(w.R);
  for (int s = 0; s < w.R; ++s) {
    const Topology& t = topo[s];
    for (int n = 0; n < w.N; ++n) {
      const uint64_t node_bits = ((1ull << w.L) - 1) << (n * w.L);
      for (size_t k = 0; k < w.masks[s].size(); ++k)
        if (w.masks[s][k] & node_bits) send1[s].push_back({s, static_cast<int>(k)});
      ASSERT_EQ(static_cast<int64_t>(send1[s].size()), plan[s].send1_off[n + 1])
          << "rank " << s << " node " << n;
    }
    (void)t;
  }
  for (int f = 0; f < w.R; ++f) {  // forwarder (b, i) receives from (a, i), a ascending
    const Topology& t = topo[f];
    for (int a = 0; a < w.N; ++a) {
      const int src = t.rank_of(a, t.local_rank);
      const Plan& ps = plan[src];
      const int64_t count = ps.send1_off[t.node + 1] - ps.send1_off[t.node];
      ASSERT_EQ(count, plan[f].recv1_off[a + 1] - plan[f].recv1_off[a])
          << "forwarder " << f << " from " << src;
      recv1[f].insert(recv1[f].end(), send1[src].begin() + ps.send1_off[t.node],
                      send1[src].begin() + ps.send1_off[t.node + 1]);
    }
  }
  // Stage 2: per-local-rank lists over the received records, in order.
  std::vector<std::vector<Token>> send2(w.R), recv2(w.R);
  for (int f = 0; f < w.R; ++f) {
    const Topology& t = topo[f];
    for (int j = 0; j < w.L; ++j) {
      const int dst = t.rank_of(t.node, j);
      for (const Token& tok : recv1[f])
        if ((w.masks[tok.src][tok.t] >> dst) & 1) send2[f].push_back(tok);
      ASSERT_EQ(static_cast<int64_t>(send2[f].size()), plan[f].send2_off[j + 1])
          << "forwarder " << f << " to " << j;
    }
  }
  for (int d = 0; d < w.R; ++d) {
    const Topology& t = topo[d];
    for (int i = 0; i < w.L; ++i) {
      const int f = t.rank_of(t.node, i);
      const int64_t lo = plan[f].send2_off[t.local_rank], hi = plan[f].send2_off[t.local_rank + 1];
      ASSERT_EQ(hi - lo, plan[d].recv2_off[i + 1] - plan[d].recv2_off[i])
          << "receiver " << d << " from " << f;
      recv2[d].insert(recv2[d].end(), send2[f].begin() + lo, send2[f].begin() + hi);
    }
    // Output rows through rank_prefix / src_record must be the oracle's order.
    std::vector<Token> want;
    for (int s = 0; s < w.R; ++s)
      for (size_t k = 0; k < w.masks[s].size(); ++k)
        if ((w.masks[s][k] >> d) & 1) want.push_back({s, static_cast<int>(k)});
    const Plan& p = plan[d];
    ASSERT_EQ(p.num_recv(), static_cast<int64_t>(want.size()));
    for (int64_t o = 0; o < p.num_recv(); ++o) {
      int s = 0;
      while (s + 1 < w.R && o >= p.rank_prefix[s + 1]) ++s;
      const Token got = recv2[d][p.src_record[s] + (o - p.rank_prefix[s])];
      ASSERT_TRUE(got == want[o]) << "rank " << d << " row " << o << ": expected (" << want[o].src << ", "
                                  << want[o].t << "), got (" << got.src << ", " << got.t << ")";
    }
    // Per-local-expert counts: rows naming the expert, once per row.
    const int local = w.E / w.R;
    for (int j = 0; j < local; ++j) {
      int32_t c = 0;
      for (const Token& tok : want) {
        bool named = false;
        for (int e : w.topk[tok.src][tok.t]) named = named || e == d * local + j;
        c += named;
      }
      ASSERT_EQ(p.expert_count[j], c) << "rank " << d << " expert " << j;
    }
  }
}

TEST(InternodePlan, TwoHopSimulationMatchesOracleOrder) {
  struct Shape {
    int N, L;
  };
  uint64_t seed = 11;
  for (Shape sh :
       {Shape{2, 1}, Shape{2, 2}, Shape{3, 2}, Shape{2, 4}, Shape{2, 8}, Shape{4, 1}, Shape{1, 4}}) {
    SCOPED_TRACE("nodes " + std::to_string(sh.N) + " x local " + std::to_string(sh.L));
    const int R = sh.N * sh.L;
    check_world(make_world(sh.N, sh.L, 4 * R, 4, seed++, -1));
    check_world(make_world(sh.N, sh.L, 4 * R, 8, seed++, R - 1));  // an empty rank
  }
}

TEST(InternodePlan, RanksDisagreeingOnHiddenAreNamed) {
  const World w = make_world(2, 1, 8, 2, 3, -1);
  CountLayout layout;
  layout.num_ranks = 2;
  layout.num_nodes = 2;
  layout.max_experts = 1024;
  auto b0 = count_block(w, layout, 0), b1 = count_block(w, layout, 1);
  b1[1] = 4096;
  std::vector<int32_t> gathered(b0);
  gathered.insert(gathered.end(), b1.begin(), b1.end());
  const Topology t = derive_topology({host_hash("x"), host_hash("y")}, 0);
  try {
    make_plan(t, layout, gathered);
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("different hidden"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace expertlink::internode
