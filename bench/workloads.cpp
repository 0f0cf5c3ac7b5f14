#include "workloads.hpp"

#include <algorithm>
#include <cstring>

namespace expertlink::bench {

const char* op_name(Op op) {
  switch (op) {
    case Op::kHtDispatchFp8:
      return "ht_dispatch_fp8";
    case Op::kHtDispatchBf16:
      return "ht_dispatch_bf16";
    case Op::kHtCombineBf16:
      return "ht_combine_bf16";
    case Op::kLlDispatchFp8:
      return "ll_dispatch_fp8";
    case Op::kLlCombineBf16:
      return "ll_combine_bf16";
    case Op::kLlRoundtrip:
      return "ll_roundtrip";
  }
  return "unknown";
}

std::optional<Op> op_from_name(const std::string& name) {
  for (Op op : kAllOps)
    if (name == op_name(op)) return op;
  return std::nullopt;
}

Family op_family(Op op) {
  switch (op) {
    case Op::kHtDispatchFp8:
    case Op::kHtDispatchBf16:
    case Op::kHtCombineBf16:
      return Family::kHt;
    default:
      return Family::kLl;
  }
}

bool op_has_dispatch(Op op) {
  return op == Op::kHtDispatchFp8 || op == Op::kHtDispatchBf16 || op == Op::kLlDispatchFp8 ||
         op == Op::kLlRoundtrip;
}

bool op_has_combine(Op op) {
  return op == Op::kHtCombineBf16 || op == Op::kLlCombineBf16 || op == Op::kLlRoundtrip;
}

const char* routing_label(workload::Routing routing) {
  return routing == workload::Routing::kUniform ? "uniform" : "skewed";
}

workload::Shape family_shape(Family family, int64_t tokens) {
  workload::Shape shape = family == Family::kHt ? workload::kHighThroughput : workload::kLowLatency;
  if (tokens != shape.tokens) {
    // Keep the masked share of LL's top-k slots (~10 per 128 tokens) as the token count changes.
    shape.masked_slots = static_cast<int>((shape.masked_slots * tokens + shape.tokens / 2) / shape.tokens);
    shape.tokens = tokens;
  }
  return shape;
}

int64_t nominal_tokens(Family family) {
  return family == Family::kHt ? workload::kHighThroughput.tokens : workload::kLowLatency.tokens;
}

std::vector<int64_t> sweep_tokens(Family family) {
  std::vector<int64_t> tokens;
  int64_t lo = family == Family::kHt ? 256 : 1, hi = family == Family::kHt ? 8192 : 256;
  for (int64_t t = lo; t <= hi; t *= 2) tokens.push_back(t);
  return tokens;
}

int64_t Traffic::received(int dst) const {
  int64_t n = 0;
  for (int s = 0; s < num_ranks; ++s) n += at(s, dst);
  return n;
}

int64_t Traffic::sent(int src) const {
  int64_t n = 0;
  for (int d = 0; d < num_ranks; ++d) n += at(src, d);
  return n;
}

int64_t Traffic::received_remote(int dst) const {
  return received(dst) - at(dst, dst);
}
int64_t Traffic::sent_remote(int src) const {
  return sent(src) - at(src, src);
}

namespace {

// Calls visit(token, slot, expert, dst_rank) for every row rank `src` sends, in source order.
template <typename Visit>
void for_each_row(Family family, const Routings& rt, int src, Visit&& visit) {
  const std::vector<int64_t>& idx = rt.topk_all[static_cast<size_t>(src)];
  const int per_rank = rt.experts_per_rank();
  for (int64_t t = 0; t < rt.tokens; ++t) {
    const int64_t* row = idx.data() + t * rt.topk;
    if (family == Family::kLl) {
      for (int k = 0; k < rt.topk; ++k)
        if (row[k] >= 0) visit(t, k, static_cast<int>(row[k]), static_cast<int>(row[k] / per_rank));
    } else {
      uint64_t seen = 0;
      for (int k = 0; k < rt.topk; ++k) {
        if (row[k] < 0) continue;
        int dst = static_cast<int>(row[k] / per_rank);
        if (seen >> dst & 1u) continue;
        seen |= uint64_t{1} << dst;
      }
      for (int dst = 0; dst < rt.num_ranks; ++dst)
        if (seen >> dst & 1u) visit(t, -1, -1, dst);
    }
  }
}

}  // namespace

Traffic count_traffic(Family family, const Routings& rt) {
  Traffic tr;
  tr.num_ranks = rt.num_ranks;
  tr.rows.assign(static_cast<size_t>(rt.num_ranks) * rt.num_ranks, 0);
  for (int s = 0; s < rt.num_ranks; ++s)
    for_each_row(family, rt, s,
                 [&](int64_t, int, int, int dst) { ++tr.rows[static_cast<size_t>(s) * rt.num_ranks + dst]; });
  return tr;
}

std::vector<RowId> received_rows(Family family, const Routings& rt, int dst) {
  std::vector<RowId> rows;
  for (int s = 0; s < rt.num_ranks; ++s)
    for_each_row(family, rt, s, [&](int64_t t, int k, int e, int d) {
      if (d == dst) rows.push_back(RowId{s, static_cast<int32_t>(t), k, e});
    });
  return rows;
}

LlLayout ll_layout(const Routings& rt, int dst, int64_t capacity) {
  const int R = rt.num_ranks, per_rank = rt.experts_per_rank();
  LlLayout lay;
  lay.slots_per_expert = R * capacity;
  lay.recv_count.assign(static_cast<size_t>(per_rank), 0);
  lay.range_begin.assign(static_cast<size_t>(per_rank) * R, 0);
  lay.range_count.assign(static_cast<size_t>(per_rank) * R, 0);
  for (int j = 0; j < per_rank; ++j) {
    const int64_t expert = int64_t{dst} * per_rank + j;
    for (int s = 0; s < R; ++s) {
      const std::vector<int64_t>& idx = rt.topk_all[static_cast<size_t>(s)];
      const size_t range = static_cast<size_t>(j) * R + s;
      lay.range_begin[range] = lay.recv_count[static_cast<size_t>(j)];
      for (int64_t t = 0; t < rt.tokens; ++t) {
        for (int k = 0; k < rt.topk; ++k) {
          if (idx[static_cast<size_t>(t * rt.topk + k)] != expert) continue;
          int32_t& slot = lay.recv_count[static_cast<size_t>(j)];
          lay.ids.push_back(RowId{s, static_cast<int32_t>(t), k, static_cast<int32_t>(expert)});
          lay.positions.push_back(j * lay.slots_per_expert + slot);
          ++slot;
          ++lay.range_count[range];
          break;  // one row per (token, expert)
        }
      }
    }
  }
  return lay;
}

int64_t ll_capacity(int64_t tokens) {
  return std::max(tokens, nominal_tokens(Family::kLl));
}

namespace {

struct PhaseBytes {
  std::vector<int64_t> per_rank;
  int64_t remote = 0;
};

// One phase moving `row_bytes` per dispatched row. `count_received`: the logical bytes of a rank are the
// rows it receives in dispatch (HT), else the rows it sends in dispatch (LL selections).
PhaseBytes phase_bytes(const Traffic& tr, int64_t row_bytes, bool count_received) {
  PhaseBytes pb;
  for (int r = 0; r < tr.num_ranks; ++r) {
    pb.per_rank.push_back((count_received ? tr.received(r) : tr.sent(r)) * row_bytes);
    pb.remote = std::max(pb.remote, std::max(tr.received_remote(r), tr.sent_remote(r)) * row_bytes);
  }
  return pb;
}

}  // namespace

OpBytes op_bytes(Op op, const Traffic& tr, int64_t hidden) {
  std::vector<PhaseBytes> phases;
  switch (op) {
    case Op::kHtDispatchFp8:
      phases.push_back(phase_bytes(tr, fp8_row_bytes(hidden), true));
      break;
    case Op::kHtDispatchBf16:
    case Op::kHtCombineBf16:
      phases.push_back(phase_bytes(tr, bf16_row_bytes(hidden), true));
      break;
    case Op::kLlDispatchFp8:
      phases.push_back(phase_bytes(tr, ll_dispatch_row_bytes(hidden), false));
      break;
    case Op::kLlCombineBf16:
      phases.push_back(phase_bytes(tr, bf16_row_bytes(hidden), false));
      break;
    case Op::kLlRoundtrip:
      phases.push_back(phase_bytes(tr, ll_dispatch_row_bytes(hidden), false));
      phases.push_back(phase_bytes(tr, bf16_row_bytes(hidden), false));
      break;
  }
  OpBytes ob;
  ob.per_rank.assign(static_cast<size_t>(tr.num_ranks), 0);
  for (const PhaseBytes& pb : phases) {
    for (int r = 0; r < tr.num_ranks; ++r)
      ob.per_rank[static_cast<size_t>(r)] += pb.per_rank[static_cast<size_t>(r)];
    ob.remote_bytes += pb.remote;
  }
  for (int64_t b : ob.per_rank) ob.bytes = std::max(ob.bytes, b);
  return ob;
}

double gbps(int64_t bytes, double us) {
  return us > 0 ? static_cast<double>(bytes) / (us * 1e3) : 0.0;
}

std::optional<double> floor_us(int64_t remote_bytes, std::optional<double> peer_gbps) {
  if (!peer_gbps || *peer_gbps <= 0) return std::nullopt;
  return static_cast<double>(remote_bytes) / (*peer_gbps * 1e3);
}

double median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  size_t mid = values.size() / 2;
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(mid), values.end());
  double hi = values[mid];
  if (values.size() % 2 == 1) return hi;
  double lo = *std::max_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(mid));
  return 0.5 * (lo + hi);
}

float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t float_to_bf16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0)
    return static_cast<uint16_t>(u >> 16 | 0x40);
  u += 0x7fffu + (u >> 16 & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace expertlink::bench
