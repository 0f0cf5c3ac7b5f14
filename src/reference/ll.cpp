// Low-latency dispatch and combine of the oracle, all ranks at once (semantics in reference.hpp).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "expertlink/reference.hpp"
#include "reference/checks.hpp"

namespace expertlink::reference {

using detail::ll;

namespace {

// Unused slots hold NaN patterns, so that a kernel or a test reading one sees garbage, never a plausible 0.
void fill_poison(TokenRows& rows) {
  std::fill(rows.bf16.begin(), rows.bf16.end(), uint16_t{0xFFFF});
  std::fill(rows.fp8.begin(), rows.fp8.end(), uint8_t{0xFF});
  std::fill(rows.scales.begin(), rows.scales.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(rows.packed_scales.begin(), rows.packed_scales.end(), int32_t{-1});
}

bool picks(const std::vector<int64_t>& topk_idx, int64_t token, int topk, int64_t expert) {
  for (int k = 0; k < topk; ++k)
    if (topk_idx[token * topk + k] == expert) return true;
  return false;
}

void check_ll_handle_tables(const LlHandle& h, const char* what) {
  const int64_t slots = h.slots_per_expert();
  const auto want = [&](size_t size, int64_t n, const char* field) {
    EL_CHECK(static_cast<int64_t>(size) == n, "%s.%s has %lld elements, expected %lld", what, field,
             ll(static_cast<int64_t>(size)), ll(n));
  };
  EL_CHECK(
      h.num_ranks >= 1 && h.num_local_experts >= 1 && h.capacity >= 1 && h.hidden >= 1,
      "%s is not a dispatch handle: num_ranks = %d, num_local_experts = %d, capacity = %lld, hidden = %lld",
      what, h.num_ranks, h.num_local_experts, ll(h.capacity), ll(h.hidden));
  want(h.recv_count.size(), h.num_local_experts, "recv_count");
  want(h.src_rank.size(), h.num_local_experts * slots, "src_rank");
  want(h.src_token.size(), h.num_local_experts * slots, "src_token");
  want(h.range_begin.size(), int64_t{h.num_local_experts} * h.num_ranks, "range_begin");
  want(h.range_count.size(), int64_t{h.num_local_experts} * h.num_ranks, "range_count");
}

}  // namespace

std::vector<LlDispatchOutput> ll_dispatch(const LlDispatchParams& params,
                                          const std::vector<LlDispatchInput>& inputs) {
  const int num_ranks = static_cast<int>(inputs.size());
  EL_CHECK(num_ranks >= 1, "inputs is empty: one LlDispatchInput per rank is required");
  detail::check_experts(params.num_experts, num_ranks);
  detail::check_topk(params.topk);
  const int64_t capacity = params.num_max_dispatch_tokens_per_rank;
  const int64_t hidden = params.hidden;
  const int topk = params.topk;
  EL_CHECK(capacity >= 1, "num_max_dispatch_tokens_per_rank = %lld is not positive", ll(capacity));
  EL_CHECK(hidden > 0, "hidden = %lld is not positive", ll(hidden));
  EL_CHECK(!params.use_fp8 || hidden % kFp8GroupSize == 0,
           "hidden = %lld is not a multiple of %d, as FP8 dispatch (per-128-channel scales) requires",
           ll(hidden), kFp8GroupSize);
  EL_CHECK(
      !params.use_ue8m0 || (params.use_fp8 && params.round_scale),
      "use_ue8m0 = true requires use_fp8 = true and round_scale = true (got use_fp8 = %d, round_scale = %d)",
      int{params.use_fp8}, int{params.round_scale});

  // What each source rank puts on the wire: its rows, cast once per token.
  std::vector<TokenRows> sent;
  sent.reserve(static_cast<size_t>(num_ranks));
  for (int s = 0; s < num_ranks; ++s) {
    const LlDispatchInput& in = inputs[s];
    EL_CHECK(in.num_tokens >= 0 && in.num_tokens <= capacity,
             "rank %d: num_tokens = %lld exceeds num_max_dispatch_tokens_per_rank = %lld (or is negative)", s,
             ll(in.num_tokens), ll(capacity));
    EL_CHECK(static_cast<int64_t>(in.x.size()) == in.num_tokens * hidden,
             "rank %d: x has %lld elements, expected num_tokens * hidden = %lld * %lld", s,
             ll(static_cast<int64_t>(in.x.size())), ll(in.num_tokens), ll(hidden));
    detail::check_topk_idx(in.topk_idx, in.num_tokens, topk, params.num_experts, s);
    if (params.use_fp8)
      sent.push_back(cast_to_fp8(in.x.data(), in.num_tokens, hidden, params.round_scale, params.use_ue8m0));
    else
      sent.push_back(bf16_rows(in.num_tokens, hidden, in.x));
  }

  const int local = params.num_experts / num_ranks;
  const int64_t slots = num_ranks * capacity;
  const RowFormat format = sent[0].format;
  std::vector<LlDispatchOutput> outputs(static_cast<size_t>(num_ranks));
  for (int d = 0; d < num_ranks; ++d) {
    LlDispatchOutput& out = outputs[d];
    LlHandle& h = out.handle;
    h.rank = d;
    h.num_ranks = num_ranks;
    h.num_experts = params.num_experts;
    h.num_local_experts = local;
    h.topk = topk;
    h.capacity = capacity;
    h.hidden = hidden;
    h.num_tokens = inputs[d].num_tokens;
    h.recv_count.assign(static_cast<size_t>(local), 0);
    h.src_rank.assign(static_cast<size_t>(local * slots), -1);
    h.src_token.assign(static_cast<size_t>(local * slots), -1);
    h.range_begin.assign(static_cast<size_t>(local * num_ranks), 0);
    h.range_count.assign(static_cast<size_t>(local * num_ranks), 0);
    out.x = make_token_rows(format, local * slots, hidden);
    fill_poison(out.x);

    for (int j = 0; j < local; ++j) {
      const int64_t expert = int64_t{d} * local + j;
      int32_t pos = 0;
      for (int s = 0; s < num_ranks; ++s) {
        h.range_begin[j * num_ranks + s] = pos;
        for (int64_t t = 0; t < inputs[s].num_tokens; ++t) {
          if (!picks(inputs[s].topk_idx, t, topk, expert)) continue;
          out.x.copy_row(sent[s], t, j * slots + pos);
          h.src_rank[j * slots + pos] = s;
          h.src_token[j * slots + pos] = static_cast<int32_t>(t);
          ++pos;
        }
        h.range_count[j * num_ranks + s] = pos - h.range_begin[j * num_ranks + s];
      }
      h.recv_count[j] = pos;
    }
  }
  return outputs;
}

void canonicalize_ll_recv(LlDispatchOutput& recv) {
  LlHandle& h = recv.handle;
  check_ll_handle_tables(h, "recv.handle");
  const int64_t slots = h.slots_per_expert();
  validate_rows(recv.x, "recv.x");
  EL_CHECK(
      recv.x.rows == h.num_local_experts * slots && recv.x.hidden == h.hidden,
      "recv.x is [%lld, %lld], expected [num_local_experts * num_ranks * capacity, hidden] = [%lld, %lld]",
      ll(recv.x.rows), ll(recv.x.hidden), ll(h.num_local_experts * slots), ll(h.hidden));

  TokenRows x = make_token_rows(recv.x.format, recv.x.rows, recv.x.hidden);
  fill_poison(x);
  std::vector<int32_t> src_rank(h.src_rank.size(), -1);
  std::vector<int32_t> src_token(h.src_token.size(), -1);
  std::vector<std::tuple<int32_t, int32_t, int64_t>> found;  // (source rank, source token, old slot)
  for (int j = 0; j < h.num_local_experts; ++j) {
    found.clear();
    std::vector<uint8_t> used(static_cast<size_t>(slots), 0);
    for (int s = 0; s < h.num_ranks; ++s) {
      const int64_t begin = h.range_begin[j * h.num_ranks + s];
      const int64_t count = h.range_count[j * h.num_ranks + s];
      EL_CHECK(begin >= 0 && count >= 0 && begin + count <= slots,
               "recv.handle range of expert %d, rank %d = (begin %lld, count %lld) is outside [0, %lld)", j,
               s, ll(begin), ll(count), ll(slots));
      for (int64_t i = begin; i < begin + count; ++i) {
        const int32_t t = h.src_token[j * slots + i];
        EL_CHECK(!used[i], "recv.handle slot %lld of expert %d lies in two source ranks' ranges", ll(i), j);
        EL_CHECK(t >= 0 && t < h.capacity,
                 "recv.handle.src_token[%d][%lld] = %d is not a token: capacity = %lld", j, ll(i), t,
                 ll(h.capacity));
        used[i] = 1;
        found.emplace_back(s, t, i);
      }
    }
    EL_CHECK(static_cast<int64_t>(found.size()) == h.recv_count[j],
             "recv.handle.recv_count[%d] = %d, but its ranges hold %lld slots", j, h.recv_count[j],
             ll(static_cast<int64_t>(found.size())));
    std::sort(found.begin(), found.end());
    for (int s = 0; s < h.num_ranks; ++s) h.range_count[j * h.num_ranks + s] = 0;
    for (size_t i = 0; i < found.size(); ++i) {
      const auto [s, t, old] = found[i];
      EL_CHECK(i == 0 || std::get<0>(found[i - 1]) != s || std::get<1>(found[i - 1]) != t,
               "recv.handle holds token %d of rank %d twice for expert %d", t, s, j);
      x.copy_row(recv.x, j * slots + old, j * slots + static_cast<int64_t>(i));
      src_rank[j * slots + i] = s;
      src_token[j * slots + i] = t;
      ++h.range_count[j * h.num_ranks + s];
    }
    int32_t pos = 0;
    for (int s = 0; s < h.num_ranks; ++s) {
      h.range_begin[j * h.num_ranks + s] = pos;
      pos += h.range_count[j * h.num_ranks + s];
    }
  }
  recv.x = std::move(x);
  h.src_rank = std::move(src_rank);
  h.src_token = std::move(src_token);
}

std::vector<std::vector<uint16_t>> ll_combine(const std::vector<LlHandle>& handles,
                                              const std::vector<LlCombineInput>& inputs) {
  const int num_ranks = static_cast<int>(handles.size());
  EL_CHECK(num_ranks >= 1, "handles is empty: one LlHandle per rank is required");
  EL_CHECK(static_cast<int>(inputs.size()) == num_ranks, "inputs has %lld ranks, expected num_ranks = %d",
           ll(static_cast<int64_t>(inputs.size())), num_ranks);
  const LlHandle& h0 = handles[0];
  for (int r = 0; r < num_ranks; ++r) {
    const LlHandle& h = handles[r];
    const std::string what = "handles[" + std::to_string(r) + "]";
    check_ll_handle_tables(h, what.c_str());
    EL_CHECK(
        h.rank == r && h.num_ranks == num_ranks && h.num_experts == h0.num_experts &&
            h.num_local_experts == h0.num_local_experts && h.topk == h0.topk && h.capacity == h0.capacity &&
            h.hidden == h0.hidden,
        "handles[%d] (rank %d of %d, %d experts, topk %d, capacity %lld, hidden %lld) does not belong with "
        "handles[0] (rank 0 of %d, %d experts, topk %d, capacity %lld, hidden %lld)",
        r, h.rank, h.num_ranks, h.num_experts, h.topk, ll(h.capacity), ll(h.hidden), num_ranks,
        h0.num_experts, h0.topk, ll(h0.capacity), ll(h0.hidden));
  }
  const int num_experts = h0.num_experts;
  const int local = h0.num_local_experts;
  const int topk = h0.topk;
  const int64_t hidden = h0.hidden;
  const int64_t slots = h0.slots_per_expert();

  // slot_of[s][t * E + e]: the slot of expert e (on its rank) that holds token t of rank s.
  std::vector<std::vector<int32_t>> slot_of(static_cast<size_t>(num_ranks));
  for (int s = 0; s < num_ranks; ++s) {
    const LlCombineInput& in = inputs[s];
    const int64_t tokens = handles[s].num_tokens;
    EL_CHECK(static_cast<int64_t>(in.x.size()) == local * slots * hidden,
             "rank %d: x has %lld elements, expected [num_local_experts, num_ranks * capacity, hidden] = "
             "[%d, %lld, %lld]",
             s, ll(static_cast<int64_t>(in.x.size())), local, ll(slots), ll(hidden));
    detail::check_topk_idx(in.topk_idx, tokens, topk, num_experts, s);
    EL_CHECK(static_cast<int64_t>(in.topk_weights.size()) == tokens * topk,
             "rank %d: topk_weights has %lld elements, expected num_tokens * topk = %lld * %d", s,
             ll(static_cast<int64_t>(in.topk_weights.size())), ll(tokens), topk);
    slot_of[s].assign(static_cast<size_t>(tokens * num_experts), -1);
  }
  for (int d = 0; d < num_ranks; ++d) {
    const LlHandle& h = handles[d];
    for (int j = 0; j < local; ++j) {
      for (int s = 0; s < num_ranks; ++s) {
        const int64_t begin = h.range_begin[j * num_ranks + s];
        const int64_t count = h.range_count[j * num_ranks + s];
        EL_CHECK(begin >= 0 && count >= 0 && begin + count <= slots,
                 "handles[%d] range of expert %d, rank %d = (begin %lld, count %lld) is outside [0, %lld)", d,
                 j, s, ll(begin), ll(count), ll(slots));
        for (int64_t i = begin; i < begin + count; ++i) {
          const int32_t t = h.src_token[j * slots + i];
          EL_CHECK(t >= 0 && t < handles[s].num_tokens,
                   "handles[%d].src_token[%d][%lld] = %d is not a token of rank %d: num_tokens = %lld", d, j,
                   ll(i), t, s, ll(handles[s].num_tokens));
          slot_of[s][t * num_experts + int64_t{d} * local + j] = static_cast<int32_t>(i);
        }
      }
    }
  }

  std::vector<std::vector<uint16_t>> outputs(static_cast<size_t>(num_ranks));
  std::vector<float> acc(static_cast<size_t>(hidden));
  for (int s = 0; s < num_ranks; ++s) {
    const LlCombineInput& in = inputs[s];
    const int64_t tokens = handles[s].num_tokens;
    outputs[s].resize(static_cast<size_t>(tokens * hidden));
    for (int64_t t = 0; t < tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int k = 0; k < topk; ++k) {
        const int64_t e = in.topk_idx[t * topk + k];
        if (e < 0) continue;
        const int32_t slot = slot_of[s][t * num_experts + e];
        EL_CHECK(slot >= 0,
                 "rank %d: topk_idx[%lld][%d] = %lld, but handles[%lld] holds no slot of that expert for "
                 "the token (was the dispatch run with this topk_idx?)",
                 s, ll(t), k, ll(e), ll(e / local));
        const uint16_t* y = &inputs[e / local].x[((e % local) * slots + slot) * hidden];
        const float w = in.topk_weights[t * topk + k];
        for (int64_t c = 0; c < hidden; ++c) acc[c] += w * bf16_to_float(y[c]);
      }
      for (int64_t c = 0; c < hidden; ++c) outputs[s][t * hidden + c] = float_to_bf16(acc[c]);
    }
  }
  return outputs;
}

}  // namespace expertlink::reference
