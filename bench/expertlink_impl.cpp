#include "expertlink_impl.hpp"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "check.hpp"
#include "expertlink/error.hpp"
#include "expertlink/workload.hpp"
#include "impl_util.hpp"

namespace expertlink::bench {
namespace {

// Variant ids: 4 * (index into the SM list) + (1 for exact sizing) + (2 for direct dispatch).
constexpr int kExactBit = 1, kDirectBit = 2;

}  // namespace

ExpertLinkImpl::ExpertLinkImpl(std::vector<int> sms) : sms_list_(std::move(sms)) {
  EL_CHECK(!sms_list_.empty(), "expertlink: no SM count to measure (--sms)");
  sms_ = sms_list_.front();
}

ExpertLinkImpl::~ExpertLinkImpl() = default;

std::optional<int64_t> ExpertLinkImpl::buffer_bytes(Op) const {
  if (!buffer_) return std::nullopt;
  // Intranode: the symmetric window; internode: the staging buffers (no window). The direct-dispatch
  // receive region counts only for the variants that use it.
  return static_cast<int64_t>(buffer_->window_bytes() + buffer_->internode_staging_bytes() -
                              (direct_ ? 0 : recv_region_));
}

void ExpertLinkImpl::setup(const CaseData& data, ncclComm_t comm, cudaStream_t stream) {
  data_ = &data;
  stream_ = stream;
  if (data.family() != Family::kHt) return;
  const Inputs& in = data.inputs();
  if (!comm_) comm_ = std::make_unique<Communicator>(comm, Communicator::Adopt::kSplit);
  if (buffer_tokens_ != in.tokens) {
    // One buffer per shape (collective); the routings of a shape share it.
    handle_ = HtHandle();
    buffer_.reset();
    const size_t hint = Buffer::ht_size_hint(in.num_ranks, in.tokens, in.hidden, in.topk);
    recv_region_ = Buffer::ht_recv_size_hint(in.num_ranks, in.tokens, in.hidden);
    buffer_ = std::make_unique<Buffer>(*comm_, std::max<size_t>(hint, 16), 0, RuntimeOptions{},
                                       recv_region_);  // one rank: hint is 0
    if (buffer_->num_nodes() > 1) recv_region_ = 0;    // no window across nodes: no direct variants
    buffer_tokens_ = in.tokens;
  }
  int device_sms = 0, device = 0;
  EL_CUDA_CHECK(cudaGetDevice(&device));
  EL_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, device));
  for (int s : sms_list_) EL_CHECK(s >= 1 && s <= device_sms, "--sms %d: the GPU has %d SMs", s, device_sms);

  capacity_ = in.num_ranks * in.tokens;  // worst case: every token of every rank comes here
  const size_t cap = static_cast<size_t>(capacity_), h = static_cast<size_t>(in.hidden);
  const size_t k = static_cast<size_t>(in.topk), t = static_cast<size_t>(in.tokens);
  recv_x_ = DeviceBuffer(cap * h * 2);
  recv_scales_ = DeviceBuffer(cap * (h / 128) * sizeof(float));
  recv_topk_idx_ = DeviceBuffer(cap * k * sizeof(int64_t));
  recv_topk_weights_ = DeviceBuffer(cap * k * sizeof(float));
  recv_expert_count_ = DeviceBuffer(static_cast<size_t>(in.num_experts / in.num_ranks) * sizeof(int32_t));
  combined_x_ = DeviceBuffer(t * h * 2);
  combined_weights_ = DeviceBuffer(t * k * sizeof(float));
  combine_rows_ = 0;
}

std::vector<Variant> ExpertLinkImpl::variants(Op op) const {
  std::vector<Variant> v;
  for (int i = 0; i < static_cast<int>(sms_list_.size()); ++i) {
    // Internode records say so in their name: "_internode2n" for 2 nodes.
    const std::string inter =
        buffer_ && buffer_->num_nodes() > 1 ? "_internode" + std::to_string(buffer_->num_nodes()) + "n" : "";
    v.push_back(Variant{4 * i, inter});
    if (op_has_dispatch(op)) v.push_back(Variant{4 * i + kExactBit, inter + "_exact"});
    // Direct: dispatch into the Buffer's receive region; combine reading the rows from there.
    if (recv_region_ > 0) v.push_back(Variant{4 * i + kDirectBit, "_direct"});
  }
  return v;
}

void ExpertLinkImpl::select(Op, const Variant& variant) {
  const size_t i = static_cast<size_t>(variant.id / 4);
  EL_CHECK(i < sms_list_.size(), "expertlink: variant %d is not one of mine", variant.id);
  sms_ = sms_list_[i];
  exact_ = (variant.id & kExactBit) != 0;
  direct_ = (variant.id & kDirectBit) != 0;
}

HtDispatchArgs ExpertLinkImpl::dispatch_args(bool fp8) const {
  const Inputs& in = data_->inputs();
  HtDispatchArgs a;
  if (fp8) {
    a.x = TensorView(const_cast<uint8_t*>(in.x_fp8), DType::kFP8E4M3, {in.tokens, in.hidden});
    a.x_scales = TensorView(const_cast<float*>(in.x_scales), DType::kF32, {in.tokens, in.hidden / 128});
  } else {
    a.x = TensorView(const_cast<uint16_t*>(in.x_bf16), DType::kBF16, {in.tokens, in.hidden});
  }
  a.topk_idx = TensorView(const_cast<int64_t*>(in.topk_idx), DType::kI64, {in.tokens, in.topk});
  a.topk_weights = TensorView(const_cast<float*>(in.topk_weights), DType::kF32, {in.tokens, in.topk});
  a.num_experts = in.num_experts;
  a.num_sms = sms_;
  return a;
}

void* ExpertLinkImpl::recv_x_rows(bool fp8) const {
  if (!direct_) return recv_x_.as();
  return buffer_->ht_window_recv_x(fp8 ? DType::kFP8E4M3 : DType::kBF16, data_->inputs().hidden).data;
}

float* ExpertLinkImpl::recv_weights() const {
  if (!direct_) return recv_topk_weights_.as<float>();
  return static_cast<float*>(buffer_->ht_window_recv_topk_weights(data_->inputs().topk).data);
}

HtDispatchOutputs ExpertLinkImpl::dispatch_outputs(bool fp8) const {
  const Inputs& in = data_->inputs();
  HtDispatchOutputs o;
  o.recv_x = TensorView(recv_x_rows(fp8), fp8 ? DType::kFP8E4M3 : DType::kBF16, {capacity_, in.hidden});
  if (fp8) o.recv_x_scales = TensorView(recv_scales_.as(), DType::kF32, {capacity_, in.hidden / 128});
  o.recv_topk_idx = TensorView(recv_topk_idx_.as(), DType::kI64, {capacity_, in.topk});
  o.recv_topk_weights = TensorView(recv_weights(), DType::kF32, {capacity_, in.topk});
  o.num_recv_tokens_per_expert =
      TensorView(recv_expert_count_.as(), DType::kI32, {in.num_experts / in.num_ranks});
  return o;
}

void ExpertLinkImpl::dispatch(bool fp8, Sizing sizing, cudaStream_t stream) {
  const HtDispatchArgs a = dispatch_args(fp8);
  buffer_->ht_notify(a, handle_, sizing, capacity_, stream);
  buffer_->ht_dispatch(a, handle_, dispatch_outputs(fp8), stream);
}

void ExpertLinkImpl::combine(cudaStream_t stream) {
  const Inputs& in = data_->inputs();
  HtCombineArgs a;
  a.x = TensorView(recv_x_rows(false), DType::kBF16, {combine_rows_, in.hidden});
  a.topk_weights = TensorView(recv_weights(), DType::kF32, {combine_rows_, in.topk});
  a.num_sms = sms_;
  HtCombineOutputs o;
  o.combined_x = TensorView(combined_x_.as(), DType::kBF16, {in.tokens, in.hidden});
  o.combined_topk_weights = TensorView(combined_weights_.as(), DType::kF32, {in.tokens, in.topk});
  buffer_->ht_combine(a, handle_, o, stream);
}

ExpertOutputs ExpertLinkImpl::prepare(Op op, cudaStream_t stream) {
  stream_ = stream;
  for (const DeviceBuffer* b : {&recv_x_, &recv_scales_, &recv_topk_idx_, &recv_topk_weights_,
                                &recv_expert_count_, &combined_x_, &combined_weights_})
    poison(*b, stream);
  if (direct_) {  // rows and weights land in the window: poison them there (before this rank's dispatch)
    const int64_t bytes = capacity_ * data_->inputs().hidden * 2;
    EL_CUDA_CHECK(cudaMemsetAsync(recv_x_rows(false), 0xff, static_cast<size_t>(bytes), stream));
    const int64_t weight_bytes = capacity_ * data_->inputs().topk * static_cast<int64_t>(sizeof(float));
    EL_CUDA_CHECK(cudaMemsetAsync(recv_weights(), 0xff, static_cast<size_t>(weight_bytes), stream));
  }
  if (!op_has_combine(op)) return {};
  // The combine returns the rows of a BF16 dispatch (exact sizing: x is then [N_recv, H]); the harness
  // writes the expert outputs over the received rows, the received top-k weights stay as dispatched.
  dispatch(/*fp8=*/false, Sizing::kExact, stream);
  buffer_->synchronize(stream);
  combine_rows_ = handle_.num_recv_tokens();
  const Inputs& in = data_->inputs();
  ExpertOutputs eo;
  eo.rows = static_cast<uint16_t*>(recv_x_rows(false));
  eo.ids = received_rows(Family::kHt, data_->routings(), in.rank);
  if (static_cast<int64_t>(eo.ids.size()) != combine_rows_)
    EL_FAIL(ErrorCode::kInternal, "expertlink's dispatch received %lld rows, the routing says %zu",
            static_cast<long long>(combine_rows_), eo.ids.size());
  return eo;
}

void ExpertLinkImpl::run(Op op, cudaStream_t stream) {
  stream_ = stream;
  switch (op) {
    case Op::kHtDispatchFp8:
    case Op::kHtDispatchBf16:
      dispatch(op == Op::kHtDispatchFp8, exact_ ? Sizing::kExact : Sizing::kCapacity, stream);
      break;
    case Op::kHtCombineBf16:
      combine(stream);
      break;
    default:
      EL_FAIL(ErrorCode::kInternal, "expertlink: %s is not supported here", op_name(op));
  }
}

DispatchView ExpertLinkImpl::dispatch_view(Op op) {
  buffer_->synchronize(stream_);  // capacity sizing: the count is readable once the stream has passed
  const Inputs& in = data_->inputs();
  const bool fp8 = op == Op::kHtDispatchFp8;
  DispatchView v;
  v.rows_received = handle_.num_recv_tokens();
  v.format = fp8 ? RowFormat::kFp8 : RowFormat::kBf16;
  v.data = static_cast<const uint8_t*>(recv_x_rows(fp8));
  v.data_stride = fp8 ? in.hidden : 2 * in.hidden;
  if (fp8) {
    v.scales = recv_scales_.as<float>();
    v.scales_stride = in.hidden / 128;
  }
  // The HT order every implementation is checked in (source rank, then token) is ExpertLink's own;
  // check_own compares the handle's recv_src_token / rank_prefix with it.
  v.ids = received_rows(Family::kHt, data_->routings(), in.rank);
  return v;
}

std::string ExpertLinkImpl::check_dispatch_meta(bool fp8) {
  const Inputs& in = data_->inputs();
  const Routings& rt = data_->routings();
  const int R = in.num_ranks, me = in.rank, K = in.topk, per_rank = rt.experts_per_rank();
  const char* what = fp8 ? "fp8 dispatch" : "bf16 dispatch";
  const std::vector<RowId> ids = received_rows(Family::kHt, rt, me);
  const int64_t n = static_cast<int64_t>(ids.size());
  if (handle_.num_recv_tokens() != n)
    return text("%s: handle.num_recv_tokens() = %lld, the routing says %lld", what,
                static_cast<long long>(handle_.num_recv_tokens()), static_cast<long long>(n));

  std::vector<int32_t> want_prefix(static_cast<size_t>(R) + 1, 0);
  for (const RowId& id : ids) ++want_prefix[static_cast<size_t>(id.src_rank) + 1];
  for (int s = 0; s < R; ++s) want_prefix[s + 1] += want_prefix[s];
  const std::vector<int32_t> prefix = download<int32_t>(handle_.rank_prefix(), R + 1);
  for (int s = 0; s <= R; ++s)
    if (prefix[s] != want_prefix[s])
      return text("%s: handle.rank_prefix()[%d] = %d, expected %d", what, s, prefix[s], want_prefix[s]);
  const std::vector<int32_t> src_token = download<int32_t>(handle_.recv_src_token(), n);
  for (int64_t j = 0; j < n; ++j)
    if (src_token[j] != ids[j].token)
      return text("%s: handle.recv_src_token()[%lld] = %d, expected token %d of rank %d", what,
                  static_cast<long long>(j), src_token[j], ids[j].token, ids[j].src_rank);

  // recv_topk_idx: local expert ids where the expert is here, else -1 (weight 0); per-expert counts.
  std::vector<std::vector<float>> weights(static_cast<size_t>(R));
  for (int s = 0; s < R; ++s) weights[s] = workload::make_topk_weights(rt.topk_all[s], K, data_->seed(), s);
  const std::vector<int64_t> idx = download<int64_t>(recv_topk_idx_.as(), n * K);
  const std::vector<float> w = download<float>(recv_weights(), n * K);
  std::vector<int> want_count(static_cast<size_t>(per_rank), 0);
  for (int64_t j = 0; j < n; ++j) {
    const size_t src = static_cast<size_t>(ids[j].token) * K;
    std::vector<bool> seen(static_cast<size_t>(per_rank), false);
    for (int k = 0; k < K; ++k) {
      const int64_t e = rt.topk_all[ids[j].src_rank][src + k];
      const bool here = e >= 0 && e / per_rank == me;
      const int64_t want_idx = here ? e - int64_t{me} * per_rank : -1;
      const float want_w = here ? weights[ids[j].src_rank][src + k] : 0.0f;
      const size_t o = static_cast<size_t>(j * K + k);
      if (idx[o] != want_idx || !(w[o] == want_w))
        return text("%s: row %lld (rank %d token %d) slot %d: recv_topk_idx %lld weight %g, expected %lld %g",
                    what, static_cast<long long>(j), ids[j].src_rank, ids[j].token, k,
                    static_cast<long long>(idx[o]), w[o], static_cast<long long>(want_idx), want_w);
      if (here && !seen[want_idx]) {
        seen[want_idx] = true;
        ++want_count[want_idx];
      }
    }
  }
  const std::vector<int32_t> dev_count = download<int32_t>(recv_expert_count_.as(), per_rank);
  const std::vector<int> host_count = handle_.num_recv_tokens_per_expert();
  if (static_cast<int>(host_count.size()) != per_rank)
    return text("%s: handle.num_recv_tokens_per_expert() has %zu entries, expected %d", what,
                host_count.size(), per_rank);
  for (int e = 0; e < per_rank; ++e)
    if (dev_count[e] != want_count[e] || host_count[e] != want_count[e])
      return text("%s: local expert %d: num_recv_tokens_per_expert %d (handle: %d), expected %d", what, e,
                  dev_count[e], host_count[e], want_count[e]);
  return {};
}

std::string ExpertLinkImpl::check_combined_weights() {
  // Each valid slot's expert lives on one rank: the sum over ranks restores its weight exactly.
  const Inputs& in = data_->inputs();
  const std::vector<float>& want = data_->weights_host();
  const std::vector<float> got = download<float>(combined_weights_.as(), in.tokens * in.topk);
  for (size_t i = 0; i < want.size(); ++i)
    if (!(got[i] == want[i]))
      return text("combined_topk_weights[%lld][%lld] = %g, expected %g", static_cast<long long>(i / in.topk),
                  static_cast<long long>(i % in.topk), got[i], want[i]);
  return {};
}

std::string ExpertLinkImpl::check_own(Op op) {
  try {
    buffer_->synchronize(stream_);
    handle_.check_capacity();
    std::string p = check_dispatch_meta(op == Op::kHtDispatchFp8);
    if (p.empty() && op_has_combine(op)) p = check_combined_weights();
    return p;
  } catch (const Error& e) {
    return e.what();
  }
}

void ExpertLinkImpl::teardown() {
  // The Buffer (and its handle) stay for the next case of the same shape.
  recv_x_ = DeviceBuffer();
  recv_scales_ = DeviceBuffer();
  recv_topk_idx_ = DeviceBuffer();
  recv_topk_weights_ = DeviceBuffer();
  recv_expert_count_ = DeviceBuffer();
  combined_x_ = DeviceBuffer();
  combined_weights_ = DeviceBuffer();
  data_ = nullptr;
}

}  // namespace expertlink::bench
