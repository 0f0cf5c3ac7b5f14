// Machinery of the LL GPU tests; see ll_check.hpp.
#include "ll_check.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace expertlink::test::llt {
namespace {

__global__ void fill_expert_outputs_kernel(uint16_t* y, int64_t rows, int64_t hidden, uint64_t seed,
                                           int rank) {
  const int64_t n = rows * hidden;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = expert_output(seed, rank, i / hidden, i % hidden);
}

template <typename T>
void upload_async(DeviceArray<T>& dst, const std::vector<T>& src, cudaStream_t stream) {
  if (!src.empty())
    cudaMemcpyAsync(dst.get(), src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice, stream);
}

template <typename T>
void poison_async(DeviceArray<T>& a, cudaStream_t stream) {
  cudaMemsetAsync(a.get(), 0xFF, std::max<size_t>(a.size(), 1) * sizeof(T), stream);
}

int scale_cols_of(const LlCase& c) {
  return !c.fp8 ? 0 : c.ue8m0 ? (c.hidden + 511) / 512 : c.hidden / 128;
}

// Element offset of logical scale (row, col) of expert j in the device scale tensor.
int64_t scale_offset(const LlCase& c, int64_t slots, int j, int64_t slot, int col) {
  const int G = scale_cols_of(c);
  return c.row_major_scales ? (j * slots + slot) * G + col : (int64_t(j) * G + col) * slots + slot;
}

}  // namespace

LlRound make_round(const LlCase& c, int num_ranks, uint64_t seed, const std::vector<int>& tokens,
                   int dead_rank) {
  LlRound r;
  r.seed = seed;
  r.in.resize(num_ranks);
  r.weights.resize(num_ranks);
  for (int s = 0; s < num_ranks; ++s) {
    const int T = tokens[s];
    r.in[s].num_tokens = T;
    r.in[s].x = workload::make_bf16(size_t(T) * c.hidden, seed, s);
    r.in[s].topk_idx = workload::make_topk_idx(T, c.topk, c.experts, num_ranks, c.routing, seed + 1, s,
                                               std::min(c.masked_slots, T * c.topk));
    if (c.duplicates && c.topk >= 2)
      for (int t = 3; t < T; t += 7)
        if (r.in[s].topk_idx[size_t(t) * c.topk] >= 0)
          r.in[s].topk_idx[size_t(t) * c.topk + 1] = r.in[s].topk_idx[size_t(t) * c.topk];
    r.weights[s] = workload::make_topk_weights(r.in[s].topk_idx, c.topk, seed + 2, s);
  }
  if (dead_rank >= 0) {
    for (auto& in : r.in) {
      r.device_topk_idx.push_back(in.topk_idx);
      for (int64_t& e : in.topk_idx)
        if (e >= 0 && e / (c.experts / num_ranks) == dead_rank) e = -1;
    }
  }
  ref::LlDispatchParams p;
  p.num_experts = c.experts;
  p.hidden = c.hidden;
  p.topk = c.topk;
  p.num_max_dispatch_tokens_per_rank = c.capacity;
  p.use_fp8 = c.fp8;
  p.round_scale = c.round_scale;
  p.use_ue8m0 = c.ue8m0;
  r.want = ref::ll_dispatch(p, r.in);
  return r;
}

std::vector<int> full_tokens(const LlCase& c, int num_ranks) {
  return std::vector<int>(num_ranks, c.capacity);
}

int expect_common_refusals(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& io,
                           const LlDispatchArgs& a, const LlDispatchOutputs& o) {
  auto dispatch = [&](LlDispatchArgs da, LlDispatchOutputs dout) {
    buffer.ll_dispatch(da, io.handle, dout, stream);
  };
  const int N = io.c.capacity, H = io.c.hidden, K = io.c.topk;
  char too_many[64];
  std::snprintf(too_many, sizeof(too_many), "num_max_dispatch_tokens_per_rank = %d", N);
  int rc = 0;
  {
    LlDispatchArgs bad = a;
    bad.x = TensorView(io.x.get(), DType::kBF16, {N + 1, H});
    bad.topk_idx = TensorView(io.idx64.get(), DType::kI64, {N + 1, K});
    rc |= expect_invalid(
        ctx, [&] { dispatch(bad, o); }, too_many, "T > N");
  }
  {
    LlDispatchArgs bad = a;
    bad.options.use_ue8m0 = true;
    rc |= expect_invalid(
        ctx, [&] { dispatch(bad, o); }, "round_scale", "ue8m0 without round_scale");
  }
  {
    LlDispatchOutputs bad = o;
    bad.recv_x.shape[1] -= 1;
    rc |= expect_invalid(
        ctx, [&] { dispatch(a, bad); }, "recv_x must be", "recv_x too small");
  }
  {
    LlHandle fresh;
    rc |= expect_invalid(
        ctx, [&] { buffer.ll_combine(io.combine_args(false), fresh, io.combine_outputs(), stream); },
        "handle was not filled", "combine with an empty handle");
  }
  return rc;
}

int expect_late_refusals(const RankContext& ctx, Communicator& comm, Buffer& buffer, cudaStream_t stream,
                         LlIo& io, const LlRound& r, const LlDispatchArgs& a, const LlDispatchOutputs& o) {
  int rc = 0;
  {
    Buffer small(comm, 0, 4096);  // collective construction, then a refused call on every rank
    rc |= expect_invalid(
        ctx, [&] { small.ll_dispatch(a, io.handle, o, stream); }, "ll_size_hint", "ll_bytes too small");
  }
  {
    std::vector<int64_t> ids = r.in[ctx.rank].topk_idx;
    ids[3] = 999;  // on every rank: each reports it at its next call, before enqueuing anything
    io.idx64.upload(ids);
    buffer.ll_dispatch(a, io.handle, o, stream);
    buffer.synchronize(stream);
    rc |= expect_invalid(
        ctx, [&] { buffer.ll_dispatch(a, io.handle, o, stream); }, "= 999", "an expert id out of range");
    io.idx64.upload(r.in[ctx.rank].topk_idx);
  }
  return rc;
}

size_t ll_bytes_for(std::initializer_list<LlCase> cases, int num_ranks) {
  size_t bytes = 0;
  for (const LlCase& c : cases)
    bytes = std::max(bytes, Buffer::ll_size_hint(num_ranks, c.capacity, c.hidden, c.experts));
  return bytes;
}

LlIo::LlIo(const LlCase& cs, int R, int me)
    : c(cs), num_ranks(R), rank(me), local_experts(cs.experts / R), slots(int64_t(R) * cs.capacity) {
  const int64_t N = c.capacity, H = c.hidden, K = c.topk, EL = local_experts;
  x.resize(N * H);
  idx64.resize(N * K);
  idx32.resize(N * K);
  weights.resize(N * K);
  recv_x.resize(EL * slots * H * (c.fp8 ? 1 : 2));
  recv_scales.resize(EL * slots * std::max(scale_cols_of(c), 1));
  recv_count.resize(EL);
  src_info.resize(EL * slots);
  range32.resize(EL * R * 2);
  range64.resize(EL * R);
  y.resize(EL * slots * H);
  out.resize(N * H);
}

void LlIo::load(const LlRound& r, cudaStream_t stream) {
  const ref::LlDispatchInput& in = r.in[rank];
  tokens = static_cast<int>(in.num_tokens);
  upload_async(x, in.x, stream);
  const std::vector<int64_t>& idx = r.device_topk_idx.empty() ? in.topk_idx : r.device_topk_idx[rank];
  upload_async(idx64, idx, stream);
  std::vector<int32_t> i32(idx.begin(), idx.end());
  upload_async(idx32, i32, stream);
  upload_async(weights, r.weights[rank], stream);
  poison_async(recv_x, stream);
  poison_async(recv_scales, stream);
  poison_async(recv_count, stream);
  poison_async(src_info, stream);
  poison_async(range32, stream);
  poison_async(range64, stream);
  poison_async(out, stream);
  cudaStreamSynchronize(stream);  // the host vectors of this call may go away
}

void LlIo::fill_expert_outputs(uint64_t seed, cudaStream_t stream, uint16_t* dst) {
  fill_expert_outputs_kernel<<<264, 512, 0, stream>>>(dst ? dst : y.get(), local_experts * slots, c.hidden,
                                                      seed, rank);
}

LlDispatchArgs LlIo::dispatch_args(bool hook) const {
  LlDispatchArgs a;
  a.x = TensorView(x.get(), DType::kBF16, {tokens, c.hidden});
  a.topk_idx = c.idx_i32 ? TensorView(idx32.get(), DType::kI32, {tokens, c.topk})
                         : TensorView(idx64.get(), DType::kI64, {tokens, c.topk});
  a.num_max_dispatch_tokens_per_rank = c.capacity;
  a.num_experts = c.experts;
  a.options.use_fp8 = c.fp8;
  a.options.round_scale = c.round_scale;
  a.options.use_ue8m0 = c.ue8m0;
  a.options.return_recv_hook = hook;
  return a;
}

LlDispatchOutputs LlIo::dispatch_outputs() const {
  LlDispatchOutputs o;
  const int64_t EL = local_experts, H = c.hidden, G = scale_cols_of(c);
  o.recv_x = TensorView(recv_x.get(), c.fp8 ? DType::kFP8E4M3 : DType::kBF16, {EL, slots, H});
  if (c.fp8) {
    const DType st = c.ue8m0 ? DType::kI32 : DType::kF32;
    o.recv_scales = c.row_major_scales
                        ? TensorView(recv_scales.get(), st, {EL, slots, G})
                        : TensorView(recv_scales.get(), st, {EL, slots, G}, {G * slots, 1, slots});
  }
  o.recv_count = TensorView(recv_count.get(), DType::kI32, {EL});
  o.src_info = TensorView(src_info.get(), DType::kI32, {EL, slots});
  o.layout_range = c.range_i32 ? TensorView(range32.get(), DType::kI32, {EL, num_ranks, 2})
                               : TensorView(range64.get(), DType::kI64, {EL, num_ranks});
  return o;
}

LlCombineArgs LlIo::combine_args(bool hook, bool zero_copy) const {
  LlCombineArgs a;
  if (!zero_copy) a.x = TensorView(y.get(), DType::kBF16, {local_experts, slots, c.hidden});
  a.topk_idx = c.idx_i32 ? TensorView(idx32.get(), DType::kI32, {tokens, c.topk})
                         : TensorView(idx64.get(), DType::kI64, {tokens, c.topk});
  a.topk_weights = TensorView(weights.get(), DType::kF32, {tokens, c.topk});
  a.zero_copy = zero_copy;
  a.return_recv_hook = hook;
  return a;
}

LlCombineOutputs LlIo::combine_outputs() const {
  LlCombineOutputs o;
  o.out = TensorView(out.get(), DType::kBF16, {tokens, c.hidden});
  return o;
}

int check_dispatch(const RankContext& ctx, const LlIo& io, const LlRound& r) {
  const LlCase& c = io.c;
  const int R = io.num_ranks, me = io.rank, EL = io.local_experts, H = c.hidden, G = scale_cols_of(c);
  const int64_t slots = io.slots;
  const ref::LlDispatchOutput& want = r.want[me];
  const ref::LlHandle& wh = want.handle;
  const size_t row_bytes = size_t(H) * (c.fp8 ? 1 : 2);

  // Counts and ranges: exact (the order is deterministic).
  auto count = io.recv_count.download();
  auto src = io.src_info.download();
  std::vector<int32_t> begin(size_t(EL) * R), cnt(size_t(EL) * R);
  if (c.range_i32) {
    auto lr = io.range32.download();
    for (int i = 0; i < EL * R; ++i) begin[i] = lr[2 * i], cnt[i] = lr[2 * i + 1];
  } else {
    auto lr = io.range64.download();
    for (int i = 0; i < EL * R; ++i)
      cnt[i] = static_cast<int32_t>(lr[i] & 0xFFFFFFFF), begin[i] = static_cast<int32_t>(lr[i] >> 32);
  }
  for (int j = 0; j < EL; ++j) {
    GPU_EXPECT(count[j] == wh.recv_count[j], "[%s] recv_count[%d]: expected %d, got %d", c.name, j,
               wh.recv_count[j], count[j]);
    for (int s = 0; s < R; ++s)
      GPU_EXPECT(begin[j * R + s] == wh.range_begin[j * R + s] && cnt[j * R + s] == wh.range_count[j * R + s],
                 "[%s] layout_range[%d][%d]: expected (begin %d, count %d), got (begin %d, count %d)", c.name,
                 j, s, wh.range_begin[j * R + s], wh.range_count[j * R + s], begin[j * R + s],
                 cnt[j * R + s]);
    for (int32_t i = 0; i < count[j]; ++i)
      GPU_EXPECT(src[j * slots + i] == wh.src_token[j * slots + i],
                 "[%s] src_info[%d][%d] (deterministic order: source rank %d): expected token %d, got %d",
                 c.name, j, i, wh.src_rank[j * slots + i], wh.src_token[j * slots + i], src[j * slots + i]);
  }

  // The GPU result as an oracle output, canonicalized, then compared per (source rank, token) bitwise.
  ref::LlDispatchOutput got;
  ref::LlHandle& gh = got.handle;
  gh = wh;  // shape fields; the tables are replaced below
  gh.recv_count = count;
  gh.range_begin = begin;
  gh.range_count = cnt;
  gh.src_rank.assign(size_t(EL) * slots, -1);
  gh.src_token.assign(size_t(EL) * slots, -1);
  for (int j = 0; j < EL; ++j)
    for (int s = 0; s < R; ++s)
      for (int32_t i = begin[j * R + s]; i < begin[j * R + s] + cnt[j * R + s]; ++i) {
        gh.src_rank[j * slots + i] = s;
        gh.src_token[j * slots + i] = src[j * slots + i];
      }
  const ref::RowFormat fmt = !c.fp8    ? ref::RowFormat::kBf16
                             : c.ue8m0 ? ref::RowFormat::kFp8Ue8m0
                                       : ref::RowFormat::kFp8;
  got.x = ref::make_token_rows(fmt, EL * slots, H);
  auto raw = io.recv_x.download(size_t(EL) * slots * row_bytes);
  if (c.fp8)
    got.x.fp8 = std::move(raw);
  else
    std::memcpy(got.x.bf16.data(), raw.data(), raw.size());
  if (c.fp8) {
    auto sc = io.recv_scales.download();
    for (int j = 0; j < EL; ++j)
      for (int64_t i = 0; i < slots; ++i)
        for (int g = 0; g < G; ++g) {
          const int32_t v = sc[scale_offset(c, slots, j, i, g)];
          if (c.ue8m0)
            got.x.packed_scales[(j * slots + i) * G + g] = v;
          else
            std::memcpy(&got.x.scales[(j * slots + i) * G + g], &v, 4);
        }
  }
  try {
    ref::canonicalize_ll_recv(got);
  } catch (const Error& e) {
    GPU_EXPECT(false, "[%s] the dispatch's source info is inconsistent: %s", c.name, e.what());
  }
  for (int j = 0; j < EL; ++j) {
    for (int32_t i = 0; i < wh.recv_count[j]; ++i) {
      const int64_t row = j * slots + i;
      const int s = wh.src_rank[row], t = wh.src_token[row];
      GPU_EXPECT(gh.src_rank[row] == s && gh.src_token[row] == t,
                 "[%s] expert %d slot %d: expected (rank %d, token %d), got (rank %d, token %d)", c.name, j,
                 i, s, t, gh.src_rank[row], gh.src_token[row]);
      const uint8_t* a =
          c.fp8 ? &got.x.fp8[row * row_bytes] : reinterpret_cast<const uint8_t*>(&got.x.bf16[row * H]);
      const uint8_t* b =
          c.fp8 ? &want.x.fp8[row * row_bytes] : reinterpret_cast<const uint8_t*>(&want.x.bf16[row * H]);
      if (std::memcmp(a, b, row_bytes) != 0) {
        size_t k = 0;
        while (a[k] == b[k]) ++k;
        const size_t col = c.fp8 ? k : k / 2;
        GPU_EXPECT(
            false,
            "[%s] recv_x expert %d slot %d (source rank %d token %d) column %zu: expected 0x%x, got 0x%x",
            c.name, j, i, s, t, col, c.fp8 ? b[k] : want.x.bf16[row * H + col],
            c.fp8 ? a[k] : got.x.bf16[row * H + col]);
      }
      for (int g = 0; g < G; ++g) {
        int32_t ga, wa;
        if (c.ue8m0) {
          ga = got.x.packed_scales[row * G + g], wa = want.x.packed_scales[row * G + g];
        } else {
          std::memcpy(&ga, &got.x.scales[row * G + g], 4);
          std::memcpy(&wa, &want.x.scales[row * G + g], 4);
        }
        GPU_EXPECT(ga == wa,
                   "[%s] recv_scales expert %d slot %d (source rank %d token %d) column %d: expected 0x%08x, "
                   "got 0x%08x",
                   c.name, j, i, s, t, g, wa, ga);
      }
    }
  }
  return 0;
}

int check_combine(const RankContext& ctx, const LlIo& io, const LlRound& r, uint64_t y_seed) {
  const LlCase& c = io.c;
  const int R = io.num_ranks, me = io.rank, EL = io.local_experts, H = c.hidden, K = c.topk;
  const int64_t slots = io.slots;
  // Oracle inputs: every rank's expert outputs at its valid slots (the others are never read).
  std::vector<ref::LlCombineInput> cin(R);
  std::vector<ref::LlHandle> handles;
  for (int d = 0; d < R; ++d) {
    const ref::LlHandle& h = r.want[d].handle;
    handles.push_back(h);
    cin[d].x.assign(size_t(EL) * slots * H, 0);
    for (int j = 0; j < EL; ++j)
      for (int32_t i = 0; i < h.recv_count[j]; ++i)
        for (int64_t col = 0; col < H; ++col)
          cin[d].x[(j * slots + i) * H + col] = expert_output(y_seed, d, j * slots + i, col);
    cin[d].topk_idx = r.in[d].topk_idx;
    cin[d].topk_weights = r.weights[d];
  }
  const auto want = ref::ll_combine(handles, cin);
  const auto got = io.out.download(size_t(io.tokens) * H);
  const auto& idx = r.in[me].topk_idx;
  const auto& w = r.weights[me];
  std::vector<float> bound(H);
  for (int t = 0; t < io.tokens; ++t) {
    // Tolerance scale: sum over the picks of |weight * expert output|.
    std::fill(bound.begin(), bound.end(), 0.f);
    for (int k = 0; k < K; ++k) {
      const int64_t e = idx[size_t(t) * K + k];
      if (e < 0) continue;
      const int d = static_cast<int>(e / EL), j = static_cast<int>(e % EL);
      const ref::LlHandle& h = r.want[d].handle;
      int64_t slot = -1;
      for (int32_t i = h.range_begin[j * R + me]; i < h.range_begin[j * R + me] + h.range_count[j * R + me];
           ++i)
        if (h.src_token[j * slots + i] == t) slot = i;
      GPU_EXPECT(slot >= 0, "[%s] test bug: no slot for token %d expert %lld", c.name, t, (long long)e);
      for (int col = 0; col < H; ++col)
        bound[col] += std::fabs(w[size_t(t) * K + k] *
                                ref::bf16_to_float(expert_output(y_seed, d, j * slots + slot, col)));
    }
    for (int col = 0; col < H; ++col) {
      const float g = ref::bf16_to_float(got[size_t(t) * H + col]);
      const float e = ref::bf16_to_float(want[me][size_t(t) * H + col]);
      GPU_EXPECT(std::fabs(g - e) <= 1e-2f * bound[col] + 1e-6f,
                 "[%s] combine out[%d][%d]: expected %.6g, got %.6g (tolerance scale sum|w*y| = %.4g)",
                 c.name, t, col, e, g, bound[col]);
    }
  }
  return 0;
}

int run_fused(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& io, const LlRound& r,
              uint64_t y_seed) {
  io.load(r, stream);
  buffer.ll_dispatch(io.dispatch_args(false), io.handle, io.dispatch_outputs(), stream);
  buffer.synchronize(stream);
  if (check_dispatch(ctx, io, r) != 0) return 1;
  io.fill_expert_outputs(y_seed, stream);
  buffer.ll_combine(io.combine_args(false), io.handle, io.combine_outputs(), stream);
  buffer.synchronize(stream);
  return check_combine(ctx, io, r, y_seed);
}

int run_split(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& io, const LlRound& r,
              uint64_t y_seed) {
  io.load(r, stream);
  LlRecvHook h = buffer.ll_dispatch(io.dispatch_args(true), io.handle, io.dispatch_outputs(), stream);
  h(stream);
  io.fill_expert_outputs(y_seed, stream);
  LlRecvHook hc = buffer.ll_combine(io.combine_args(true), io.handle, io.combine_outputs(), stream);
  hc(stream);
  buffer.synchronize(stream);
  return check_dispatch(ctx, io, r) != 0 || check_combine(ctx, io, r, y_seed) != 0;
}

int run_two_split(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& a, const LlRound& ra,
                  uint64_t y_seed_a, LlIo& b, const LlRound& rb, uint64_t y_seed_b) {
  a.load(ra, stream);
  b.load(rb, stream);
  LlRecvHook ha = buffer.ll_dispatch(a.dispatch_args(true), a.handle, a.dispatch_outputs(), stream);
  LlRecvHook hb = buffer.ll_dispatch(b.dispatch_args(true), b.handle, b.dispatch_outputs(), stream);
  ha(stream);
  hb(stream);
  a.fill_expert_outputs(y_seed_a, stream);
  b.fill_expert_outputs(y_seed_b, stream);
  LlRecvHook ca = buffer.ll_combine(a.combine_args(true), a.handle, a.combine_outputs(), stream);
  LlRecvHook cb = buffer.ll_combine(b.combine_args(true), b.handle, b.combine_outputs(), stream);
  cb(stream);
  ca(stream);
  buffer.synchronize(stream);
  return check_dispatch(ctx, a, ra) != 0 || check_dispatch(ctx, b, rb) != 0 ||
         check_combine(ctx, a, ra, y_seed_a) != 0 || check_combine(ctx, b, rb, y_seed_b) != 0;
}

int run_mixed_rounds(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, LlIo& a1, LlIo& a2,
                     LlIo& b1, uint64_t seed0, int min_calls, const std::function<int(uint64_t)>& between) {
  const int R = ctx.num_ranks;
  auto tokens = [&](const LlCase& c, uint64_t s) {
    std::vector<int> t(R);
    for (int i = 0; i < R; ++i)
      t[i] = static_cast<int>(((s >> 7) * 2654435761ull + 97ull * i) % (c.capacity + 1));
    return t;
  };
  const LlCase &a = a1.c, &b = b1.c;
  int calls = 0;
  for (int round = 0; calls < min_calls; ++round) {
    const uint64_t seed = seed0 + 7919ull * round;
    if (round % 25 == 24 && between(seed) != 0) return -1;
    switch (round % 3) {
      case 0: {  // fused
        if (run_fused(ctx, buffer, stream, a1, make_round(a, R, seed, tokens(a, seed)), seed + 3) != 0)
          return -1;
        calls += 1;
        break;
      }
      case 1: {  // split, one in flight
        if (run_split(ctx, buffer, stream, b1, make_round(b, R, seed, tokens(b, seed)), seed + 3) != 0)
          return -1;
        calls += 1;
        break;
      }
      default: {  // split, two in flight
        LlRound r1 = make_round(a, R, seed, tokens(a, seed));
        LlRound r2 = make_round(a, R, seed + 1, tokens(a, seed + 977));
        if (run_two_split(ctx, buffer, stream, a1, r1, seed + 3, a2, r2, seed + 4) != 0) return -1;
        calls += 2;
        break;
      }
    }
  }
  return calls;
}

int run_hook_rounds(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, const LlCase& c,
                    uint64_t seed0, int rounds) {
  const int R = ctx.num_ranks;
  LlIo a(c, R, ctx.rank), b(c, R, ctx.rank), third(c, R, ctx.rank);
  for (int round = 0; round < rounds; ++round) {
    const uint64_t seed = seed0 + 100 * round;
    LlRound ra = make_round(c, R, seed, full_tokens(c, R));
    LlRound rb = make_round(c, R, seed + 50, std::vector<int>(R, 7 + round));
    a.load(ra, stream);
    b.load(rb, stream);
    third.load(ra, stream);
    LlRecvHook ha = buffer.ll_dispatch(a.dispatch_args(true), a.handle, a.dispatch_outputs(), stream);
    LlRecvHook hb = buffer.ll_dispatch(b.dispatch_args(true), b.handle, b.dispatch_outputs(), stream);
    GPU_EXPECT(ha.valid() && hb.valid(), "split dispatches return hooks");
    if (expect_invalid(
            ctx,
            [&] {
              buffer.ll_dispatch(third.dispatch_args(false), third.handle, third.dispatch_outputs(), stream);
            },
            "third call in flight", "a third dispatch while two wait for their hooks") != 0)
      return 1;
    if (expect_invalid(
            ctx, [&] { buffer.ll_combine(a.combine_args(false), a.handle, a.combine_outputs(), stream); },
            "receive hook has not been called",
            "a combine along a handle whose dispatch hook is pending") != 0)
      return 1;
    ha(stream);
    hb.receive(stream);
    if (expect_invalid(
            ctx, [&] { hb(stream); }, "holds no receive half", "a hook called twice") != 0)
      return 1;
    buffer.synchronize(stream);
    if (check_dispatch(ctx, a, ra) != 0 || check_dispatch(ctx, b, rb) != 0) return 1;
    a.fill_expert_outputs(seed + 1, stream);
    b.fill_expert_outputs(seed + 2, stream);
    LlRecvHook ca = buffer.ll_combine(a.combine_args(true), a.handle, a.combine_outputs(), stream);
    LlRecvHook cb = buffer.ll_combine(b.combine_args(true), b.handle, b.combine_outputs(), stream);
    if (expect_invalid(
            ctx, [&] { buffer.ll_combine(a.combine_args(false), a.handle, a.combine_outputs(), stream); },
            "third call in flight", "a third combine while two wait for their hooks") != 0)
      return 1;
    cb(stream);  // hooks in the other order
    ca(stream);
    buffer.synchronize(stream);
    if (check_combine(ctx, a, ra, seed + 1) != 0 || check_combine(ctx, b, rb, seed + 2) != 0) return 1;
    // A split dispatch beside a fused one, then the fused combine of the split one.
    LlRecvHook h2 = buffer.ll_dispatch(a.dispatch_args(true), a.handle, a.dispatch_outputs(), stream);
    buffer.ll_dispatch(b.dispatch_args(false), b.handle, b.dispatch_outputs(), stream);
    h2(stream);
    buffer.ll_combine(a.combine_args(false), a.handle, a.combine_outputs(), stream);
    buffer.synchronize(stream);
    if (check_dispatch(ctx, a, ra) != 0 || check_dispatch(ctx, b, rb) != 0 ||
        check_combine(ctx, a, ra, seed + 1) != 0)
      return 1;
    buffer.ll_clean(stream);
    if (ctx.rank == 0) std::printf("ok: round %d\n", round);
  }
  return 0;
}

int run_zero_copy_rounds(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, const LlCase& c,
                         uint64_t seed0) {
  const int R = ctx.num_ranks;
  LlIo io(c, R, ctx.rank);
  for (int round = 0; round < 4; ++round) {  // both parities, fused and split
    const bool hook = round >= 2;
    const uint64_t seed = seed0 + 10 * round;
    LlRound r = make_round(c, R, seed, full_tokens(c, R));
    io.load(r, stream);
    buffer.ll_dispatch(io.dispatch_args(false), io.handle, io.dispatch_outputs(), stream);
    TensorView zc = buffer.get_next_ll_combine_buffer(io.handle);
    GPU_EXPECT(
        zc.ndim == 3 && zc.shape[0] == io.local_experts && zc.shape[1] == io.slots && zc.shape[2] == c.hidden,
        "combine buffer shape %s", zc.describe().c_str());
    io.fill_expert_outputs(seed + 1, stream, zc.ptr<uint16_t>());
    LlRecvHook h = buffer.ll_combine(io.combine_args(hook, true), io.handle, io.combine_outputs(), stream);
    if (hook) h(stream);
    buffer.synchronize(stream);
    if (check_dispatch(ctx, io, r) != 0 || check_combine(ctx, io, r, seed + 1) != 0) return 1;
  }
  if (ctx.rank == 0) std::printf("ok: %s, zero-copy, fused and split\n", c.name);
  return 0;
}

int run_graph_capture_rounds(const RankContext& ctx, Buffer& buffer, cudaStream_t stream, const LlCase& c,
                             uint64_t seed0) {
  const int R = ctx.num_ranks;
  LlIo io(c, R, ctx.rank);
  const uint64_t y_seed = seed0 + 99;
  // First use outside capture: initialises the LL state and sizes the handle.
  if (run_fused(ctx, buffer, stream, io, make_round(c, R, seed0, full_tokens(c, R)), y_seed) != 0) return 1;
  for (int split = 0; split < 2; ++split) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    GPU_EXPECT(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess,
               "begin capture");
    LlRecvHook hd = buffer.ll_dispatch(io.dispatch_args(split), io.handle, io.dispatch_outputs(), stream);
    if (split) hd(stream);
    io.fill_expert_outputs(y_seed, stream);
    LlRecvHook hc = buffer.ll_combine(io.combine_args(split), io.handle, io.combine_outputs(), stream);
    if (split) hc(stream);
    cudaError_t err = cudaStreamEndCapture(stream, &graph);
    GPU_EXPECT(err == cudaSuccess, "end capture: %s", cudaGetErrorString(err));
    err = cudaGraphInstantiate(&exec, graph, 0);
    GPU_EXPECT(err == cudaSuccess, "instantiate: %s", cudaGetErrorString(err));
    for (int rep = 0; rep < 5; ++rep) {
      LlRound r = make_round(c, R, seed0 + 1000 * split + 7 * rep + 1, full_tokens(c, R));
      io.load(r, stream);  // new inputs in the captured tensors, outputs poisoned
      err = cudaGraphLaunch(exec, stream);
      GPU_EXPECT(err == cudaSuccess, "graph launch: %s", cudaGetErrorString(err));
      buffer.synchronize(stream);
      if (check_dispatch(ctx, io, r) != 0 || check_combine(ctx, io, r, y_seed) != 0) return 1;
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    if (ctx.rank == 0)
      std::printf("ok: %s graph, 5 replays with fresh inputs\n", split ? "split (hooks)" : "fused");
  }
  // Plain calls still agree with the replays' use counts.
  return run_fused(ctx, buffer, stream, io, make_round(c, R, seed0 + 5, full_tokens(c, R)), y_seed + 1);
}

}  // namespace expertlink::test::llt
