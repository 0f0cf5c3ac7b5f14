// High-throughput dispatch and combine of the oracle, all ranks at once (semantics in reference.hpp).
#include <string>

#include "expertlink/reference.hpp"
#include "reference/checks.hpp"

namespace expertlink::reference {

using detail::ll;

namespace {

std::string rank_name(int rank, const char* what) {
  return "rank " + std::to_string(rank) + ": " + what;
}

// The handles must form one group: handles[r] is rank r's, all agree on R, and their tables are sized.
void check_ht_handles(const std::vector<HtHandle>& handles) {
  const int num_ranks = static_cast<int>(handles.size());
  EL_CHECK(num_ranks >= 1, "handles is empty: one HtHandle per rank is required");
  for (int r = 0; r < num_ranks; ++r) {
    const HtHandle& h = handles[r];
    EL_CHECK(h.rank == r && h.num_ranks == num_ranks,
             "handles[%d] has rank = %d, num_ranks = %d: expected rank %d of %d", r, h.rank, h.num_ranks, r,
             num_ranks);
    EL_CHECK(static_cast<int>(h.rank_prefix.size()) == num_ranks + 1,
             "handles[%d].rank_prefix has %lld elements, expected num_ranks + 1 = %d", r,
             ll(static_cast<int64_t>(h.rank_prefix.size())), num_ranks + 1);
    const int64_t n = h.num_recv();
    EL_CHECK(static_cast<int64_t>(h.recv_src_rank.size()) == n &&
                 static_cast<int64_t>(h.recv_src_token.size()) == n,
             "handles[%d].recv_src_rank / recv_src_token have %lld / %lld elements, expected %lld", r,
             ll(static_cast<int64_t>(h.recv_src_rank.size())),
             ll(static_cast<int64_t>(h.recv_src_token.size())), ll(n));
    EL_CHECK(static_cast<int64_t>(h.send_row.size()) == h.num_tokens * num_ranks,
             "handles[%d].send_row has %lld elements, expected num_tokens * num_ranks = %lld * %d", r,
             ll(static_cast<int64_t>(h.send_row.size())), ll(h.num_tokens), num_ranks);
  }
  for (int d = 0; d < num_ranks; ++d) {
    const HtHandle& h = handles[d];
    for (int64_t i = 0; i < h.num_recv(); ++i) {
      const int s = h.recv_src_rank[i];
      EL_CHECK(s >= 0 && s < num_ranks, "handles[%d].recv_src_rank[%lld] = %d is not a rank: num_ranks = %d",
               d, ll(i), s, num_ranks);
      const int32_t t = h.recv_src_token[i];
      EL_CHECK(t >= 0 && t < handles[s].num_tokens,
               "handles[%d].recv_src_token[%lld] = %d is not a token of rank %d: num_tokens = %lld", d, ll(i),
               t, s, ll(handles[s].num_tokens));
    }
  }
}

int32_t align_up(int32_t count, int alignment) {
  return (count + alignment - 1) / alignment * alignment;
}

}  // namespace

std::vector<HtDispatchOutput> ht_dispatch(const HtDispatchParams& params,
                                          const std::vector<HtDispatchInput>& inputs) {
  const int num_ranks = static_cast<int>(inputs.size());
  EL_CHECK(num_ranks >= 1, "inputs is empty: one HtDispatchInput per rank is required");
  detail::check_experts(params.num_experts, num_ranks);
  EL_CHECK(params.expert_alignment >= 1, "expert_alignment = %d is not >= 1", params.expert_alignment);
  const int topk = params.topk;
  const bool has_topk = topk != 0;
  if (has_topk) detail::check_topk(topk);
  bool has_weights = false;
  for (const HtDispatchInput& in : inputs) has_weights = has_weights || !in.topk_weights.empty();
  const int local = params.num_experts / num_ranks;
  const RowFormat format = inputs[0].x.format;
  const int64_t hidden = inputs[0].x.hidden;

  // Validate every rank's arguments and settle its routing (is_token_in_rank [T, R]).
  std::vector<std::vector<uint8_t>> in_rank(static_cast<size_t>(num_ranks));
  for (int s = 0; s < num_ranks; ++s) {
    const HtDispatchInput& in = inputs[s];
    validate_rows(in.x, rank_name(s, "x").c_str());
    EL_CHECK(
        in.x.format == format && in.x.hidden == hidden,
        "rank %d: x is %s with hidden = %lld, but rank 0's is %s with hidden = %lld (all ranks must agree)",
        s, row_format_name(in.x.format), ll(in.x.hidden), row_format_name(format), ll(hidden));
    const int64_t tokens = in.x.rows;
    if (has_topk) {
      detail::check_topk_idx(in.topk_idx, tokens, topk, params.num_experts, s);
      in_rank[s] = detail::token_in_rank(in.topk_idx, tokens, topk, params.num_experts, num_ranks);
    } else {
      EL_CHECK(in.topk_idx.empty(), "rank %d: topk_idx has %lld elements but params.topk = 0", s,
               ll(static_cast<int64_t>(in.topk_idx.size())));
    }
    if (has_weights) {
      EL_CHECK(has_topk, "rank %d: topk_weights without topk_idx (params.topk = 0)", s);
      EL_CHECK(static_cast<int64_t>(in.topk_weights.size()) == tokens * topk,
               "rank %d: topk_weights has %lld elements, expected num_tokens * topk = %lld * %d", s,
               ll(static_cast<int64_t>(in.topk_weights.size())), ll(tokens), topk);
    }
    if (!has_topk || !in.is_token_in_rank.empty()) {
      EL_CHECK(static_cast<int64_t>(in.is_token_in_rank.size()) == tokens * num_ranks,
               "rank %d: is_token_in_rank has %lld elements, expected num_tokens * num_ranks = %lld * %d%s",
               s, ll(static_cast<int64_t>(in.is_token_in_rank.size())), ll(tokens), num_ranks,
               has_topk ? "" : " (required without topk_idx)");
      for (int64_t i = 0; i < tokens * num_ranks; ++i) {
        const uint8_t v = in.is_token_in_rank[i];
        EL_CHECK(v <= 1, "rank %d: is_token_in_rank[%lld][%lld] = %d is not 0 or 1", s, ll(i / num_ranks),
                 ll(i % num_ranks), v);
        EL_CHECK(!has_topk || v == in_rank[s][i],
                 "rank %d: is_token_in_rank[%lld][%lld] = %d contradicts topk_idx, which gives %d", s,
                 ll(i / num_ranks), ll(i % num_ranks), v, in_rank[s][i]);
      }
      if (!has_topk) in_rank[s] = in.is_token_in_rank;
    }
  }

  std::vector<HtDispatchOutput> outputs(static_cast<size_t>(num_ranks));
  for (int r = 0; r < num_ranks; ++r) {
    HtHandle& h = outputs[r].handle;
    h.rank = r;
    h.num_ranks = num_ranks;
    h.topk = topk;
    h.num_tokens = inputs[r].x.rows;
    h.is_token_in_rank = in_rank[r];
    h.send_row.assign(static_cast<size_t>(h.num_tokens * num_ranks), -1);
  }

  for (int d = 0; d < num_ranks; ++d) {
    HtDispatchOutput& out = outputs[d];
    HtHandle& h = out.handle;
    h.rank_prefix.assign(static_cast<size_t>(num_ranks + 1), 0);
    for (int s = 0; s < num_ranks; ++s) {
      int32_t count = 0;
      for (int64_t t = 0; t < inputs[s].x.rows; ++t) count += in_rank[s][t * num_ranks + d];
      h.rank_prefix[s + 1] = h.rank_prefix[s] + count;
    }
    const int64_t n = h.num_recv();
    out.x = make_token_rows(format, n, hidden);
    h.recv_src_rank.resize(static_cast<size_t>(n));
    h.recv_src_token.resize(static_cast<size_t>(n));
    if (has_topk) {
      out.topk_idx.assign(static_cast<size_t>(n * topk), -1);
      out.num_recv_tokens_per_expert.assign(static_cast<size_t>(local), 0);
    }
    if (has_weights) out.topk_weights.assign(static_cast<size_t>(n * topk), 0.0f);

    int64_t row = 0;
    for (int s = 0; s < num_ranks; ++s) {
      const HtDispatchInput& in = inputs[s];
      for (int64_t t = 0; t < in.x.rows; ++t) {
        if (!in_rank[s][t * num_ranks + d]) continue;
        out.x.copy_row(in.x, t, row);
        h.recv_src_rank[row] = s;
        h.recv_src_token[row] = static_cast<int32_t>(t);
        outputs[s].handle.send_row[t * num_ranks + d] = static_cast<int32_t>(row);
        for (int k = 0; k < topk; ++k) {
          const int64_t e = in.topk_idx[t * topk + k];
          if (e < 0 || e / local != d) continue;
          out.topk_idx[row * topk + k] = e - int64_t{d} * local;
          if (has_weights) out.topk_weights[row * topk + k] = in.topk_weights[t * topk + k];
          bool first = true;  // a row counts once per distinct local expert
          for (int j = 0; j < k && first; ++j) first = in.topk_idx[t * topk + j] != e;
          if (first) ++out.num_recv_tokens_per_expert[e - int64_t{d} * local];
        }
        ++row;
      }
    }
    for (int32_t& c : out.num_recv_tokens_per_expert) c = align_up(c, params.expert_alignment);
  }
  return outputs;
}

std::vector<TokenRows> ht_dispatch_cached(const std::vector<HtHandle>& handles,
                                          const std::vector<TokenRows>& x) {
  check_ht_handles(handles);
  const int num_ranks = static_cast<int>(handles.size());
  EL_CHECK(static_cast<int>(x.size()) == num_ranks, "x has %lld ranks' rows, expected num_ranks = %d",
           ll(static_cast<int64_t>(x.size())), num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    validate_rows(x[r], rank_name(r, "x").c_str());
    EL_CHECK(x[r].rows == handles[r].num_tokens,
             "rank %d: x.rows = %lld, but the handle has num_tokens = %lld", r, ll(x[r].rows),
             ll(handles[r].num_tokens));
    EL_CHECK(
        x[r].format == x[0].format && x[r].hidden == x[0].hidden,
        "rank %d: x is %s with hidden = %lld, but rank 0's is %s with hidden = %lld (all ranks must agree)",
        r, row_format_name(x[r].format), ll(x[r].hidden), row_format_name(x[0].format), ll(x[0].hidden));
  }
  std::vector<TokenRows> out;
  out.reserve(static_cast<size_t>(num_ranks));
  for (int d = 0; d < num_ranks; ++d) {
    const HtHandle& h = handles[d];
    out.push_back(make_token_rows(x[0].format, h.num_recv(), x[0].hidden));
    for (int64_t i = 0; i < h.num_recv(); ++i)
      out.back().copy_row(x[h.recv_src_rank[i]], h.recv_src_token[i], i);
  }
  return out;
}

std::vector<HtCombineOutput> ht_combine_explicit(const std::vector<HtHandle>& handles,
                                                 const std::vector<HtCombineInput>& inputs, int64_t hidden,
                                                 bool sum_topk_weights) {
  check_ht_handles(handles);
  const int num_ranks = static_cast<int>(handles.size());
  EL_CHECK(static_cast<int>(inputs.size()) == num_ranks, "inputs has %lld ranks, expected num_ranks = %d",
           ll(static_cast<int64_t>(inputs.size())), num_ranks);
  EL_CHECK(hidden > 0, "hidden = %lld is not positive", ll(hidden));
  const int topk = handles[0].topk;
  EL_CHECK(!sum_topk_weights || topk > 0,
           "topk_weights to sum (sum_topk_weights), but the dispatch had no topk_idx (handle topk = 0)");
  for (int r = 0; r < num_ranks; ++r) {
    const HtCombineInput& in = inputs[r];
    const HtHandle& h = handles[r];
    EL_CHECK(h.topk == topk, "handles[%d].topk = %d, but handles[0].topk = %d", r, h.topk, topk);
    EL_CHECK(static_cast<int64_t>(in.x.size()) == h.num_recv() * hidden,
             "rank %d: x has %lld elements, expected num_recv * hidden = %lld * %lld", r,
             ll(static_cast<int64_t>(in.x.size())), ll(h.num_recv()), ll(hidden));
    if (sum_topk_weights) {
      EL_CHECK(static_cast<int64_t>(in.topk_weights.size()) == h.num_recv() * topk,
               "rank %d: topk_weights has %lld elements, expected num_recv * topk = %lld * %d", r,
               ll(static_cast<int64_t>(in.topk_weights.size())), ll(h.num_recv()), topk);
    } else {
      EL_CHECK(in.topk_weights.empty(),
               "rank %d: topk_weights has %lld elements, but sum_topk_weights is off", r,
               ll(static_cast<int64_t>(in.topk_weights.size())));
    }
    for (const auto* bias : {&in.bias0, &in.bias1}) {
      EL_CHECK(bias->empty() || static_cast<int64_t>(bias->size()) == h.num_tokens * hidden,
               "rank %d: %s has %lld elements, expected num_tokens * hidden = %lld * %lld", r,
               bias == &in.bias0 ? "bias0" : "bias1", ll(static_cast<int64_t>(bias->size())),
               ll(h.num_tokens), ll(hidden));
    }
  }

  std::vector<std::vector<float>> acc(static_cast<size_t>(num_ranks));
  std::vector<HtCombineOutput> outputs(static_cast<size_t>(num_ranks));
  for (int s = 0; s < num_ranks; ++s) {
    acc[s].assign(static_cast<size_t>(handles[s].num_tokens * hidden), 0.0f);
    if (sum_topk_weights)
      outputs[s].topk_weights.assign(static_cast<size_t>(handles[s].num_tokens * topk), 0.0f);
  }
  // Receiving rank ascending: each token meets its rows in that order (at most one row per rank).
  for (int d = 0; d < num_ranks; ++d) {
    const HtHandle& h = handles[d];
    for (int64_t i = 0; i < h.num_recv(); ++i) {
      const int s = h.recv_src_rank[i];
      const int64_t t = h.recv_src_token[i];
      float* dst = &acc[s][t * hidden];
      const uint16_t* y = &inputs[d].x[i * hidden];
      for (int64_t c = 0; c < hidden; ++c) dst[c] += bf16_to_float(y[c]);
      if (sum_topk_weights)
        for (int k = 0; k < topk; ++k)
          outputs[s].topk_weights[t * topk + k] += inputs[d].topk_weights[i * topk + k];
    }
  }
  for (int s = 0; s < num_ranks; ++s) {
    const HtCombineInput& in = inputs[s];
    for (const auto* bias : {&in.bias0, &in.bias1})
      if (!bias->empty())
        for (size_t i = 0; i < acc[s].size(); ++i) acc[s][i] += bf16_to_float((*bias)[i]);
    outputs[s].x.resize(acc[s].size());
    for (size_t i = 0; i < acc[s].size(); ++i) outputs[s].x[i] = float_to_bf16(acc[s][i]);
  }
  return outputs;
}

std::vector<HtCombineOutput> ht_combine(const std::vector<HtHandle>& handles,
                                        const std::vector<HtCombineInput>& inputs, int64_t hidden) {
  bool some_weights = false;
  for (const HtCombineInput& in : inputs) some_weights = some_weights || !in.topk_weights.empty();
  return ht_combine_explicit(handles, inputs, hidden, some_weights);
}

}  // namespace expertlink::reference
