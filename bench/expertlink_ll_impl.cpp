#include "expertlink_ll_impl.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <utility>

#include "check.hpp"
#include "expertlink/error.hpp"
#include "expertlink/reference.hpp"
#include "impl_util.hpp"

namespace expertlink::bench {
namespace {

long long ll(int64_t v) {
  return static_cast<long long>(v);
}

}  // namespace

ExpertLinkLlImpl::ExpertLinkLlImpl() = default;
ExpertLinkLlImpl::~ExpertLinkLlImpl() = default;

std::optional<int> ExpertLinkLlImpl::sms(Op) const {
  if (!buffer_) return std::nullopt;
  return sms_;
}

std::optional<int64_t> ExpertLinkLlImpl::buffer_bytes(Op) const {
  if (!buffer_) return std::nullopt;
  return static_cast<int64_t>(buffer_->window_bytes() + buffer_->internode_staging_bytes());
}

void ExpertLinkLlImpl::setup(const CaseData& data, ncclComm_t comm, cudaStream_t stream) {
  data_ = &data;
  stream_ = stream;
  ref_q_.clear();
  ref_sf_.clear();
  if (data.family() != Family::kLl) return;
  const Inputs& in = data.inputs();
  if (!comm_) comm_ = std::make_unique<Communicator>(comm, Communicator::Adopt::kSplit);
  capacity_ = ll_capacity(in.tokens);
  if (buffer_capacity_ != capacity_) {
    // One buffer per capacity (collective); the routings and token counts of that capacity share it.
    hook_ = LlRecvHook();
    handle_ = LlHandle();
    buffer_.reset();
    const size_t hint = Buffer::ll_size_hint(in.num_ranks, capacity_, in.hidden, in.num_experts);
    buffer_ = std::make_unique<Buffer>(*comm_, /*ht_bytes=*/0, hint);
    buffer_capacity_ = capacity_;
  }
  sms_ = buffer_->ll_sms();
  local_experts_ = in.num_experts / in.num_ranks;
  slots_ = in.num_ranks * capacity_;
  layout_ = ll_layout(data.routings(), in.rank, capacity_);

  const size_t rows = static_cast<size_t>(local_experts_) * static_cast<size_t>(slots_);
  const size_t h = static_cast<size_t>(in.hidden);
  recv_x_ = DeviceBuffer(rows * h);
  recv_scales_ = DeviceBuffer(rows * (h / 128) * sizeof(float));
  recv_count_ = DeviceBuffer(static_cast<size_t>(local_experts_) * sizeof(int32_t));
  src_info_ = DeviceBuffer(rows * sizeof(int32_t));
  layout_range_ = DeviceBuffer(static_cast<size_t>(local_experts_) * in.num_ranks * sizeof(int64_t));
  expert_y_ = DeviceBuffer(rows * h * 2);
  out_ = DeviceBuffer(static_cast<size_t>(in.tokens) * h * 2);
}

std::vector<Variant> ExpertLinkLlImpl::variants(Op op) const {
  // Internode records say so in their name, as the HT ones do: "_internode2n" for 2 nodes.
  const std::string inter =
      buffer_ && buffer_->num_nodes() > 1 ? "_internode" + std::to_string(buffer_->num_nodes()) + "n" : "";
  if (op == Op::kLlRoundtrip) return {Variant{0, inter}};
  return {Variant{static_cast<int>(Mode::kWhole), inter},
          Variant{static_cast<int>(Mode::kSend), inter + "_send"},
          Variant{static_cast<int>(Mode::kRecv), inter + "_recv"}};
}

void ExpertLinkLlImpl::select(Op, const Variant& variant) {
  EL_CHECK(variant.id >= 0 && variant.id <= static_cast<int>(Mode::kRecv),
           "expertlink LL: variant %d is not one of mine", variant.id);
  mode_ = static_cast<Mode>(variant.id);
}

void ExpertLinkLlImpl::dispatch(bool split, cudaStream_t stream) {
  const Inputs& in = data_->inputs();
  const int64_t el = local_experts_, h = in.hidden;
  LlDispatchArgs a;
  a.x = TensorView(const_cast<uint16_t*>(in.x_bf16), DType::kBF16, {in.tokens, h});
  a.topk_idx = TensorView(const_cast<int64_t*>(in.topk_idx), DType::kI64, {in.tokens, in.topk});
  a.num_max_dispatch_tokens_per_rank = static_cast<int>(capacity_);
  a.num_experts = in.num_experts;
  a.options.use_fp8 = true;
  a.options.round_scale = false;
  a.options.use_ue8m0 = false;
  a.options.return_recv_hook = split;
  LlDispatchOutputs o;
  o.recv_x = TensorView(recv_x_.as(), DType::kFP8E4M3, {el, slots_, h});
  o.recv_scales = TensorView(recv_scales_.as(), DType::kF32, {el, slots_, h / 128});
  o.recv_count = TensorView(recv_count_.as(), DType::kI32, {el});
  o.src_info = TensorView(src_info_.as(), DType::kI32, {el, slots_});
  o.layout_range = TensorView(layout_range_.as(), DType::kI64, {el, in.num_ranks});
  if (split) EL_CHECK(!hook_.valid(), "expertlink LL: a split call is still waiting for its receive hook");
  LlRecvHook hook = buffer_->ll_dispatch(a, handle_, o, stream);
  if (split) hook_ = std::move(hook);
}

void ExpertLinkLlImpl::combine(bool split, cudaStream_t stream) {
  const Inputs& in = data_->inputs();
  LlCombineArgs a;
  a.x = TensorView(expert_y_.as(), DType::kBF16, {local_experts_, slots_, in.hidden});
  a.topk_idx = TensorView(const_cast<int64_t*>(in.topk_idx), DType::kI64, {in.tokens, in.topk});
  a.topk_weights = TensorView(const_cast<float*>(in.topk_weights), DType::kF32, {in.tokens, in.topk});
  a.return_recv_hook = split;
  LlCombineOutputs o;
  o.out = TensorView(out_.as(), DType::kBF16, {in.tokens, in.hidden});
  if (split) EL_CHECK(!hook_.valid(), "expertlink LL: a split call is still waiting for its receive hook");
  LlRecvHook hook = buffer_->ll_combine(a, handle_, o, stream);
  if (split) hook_ = std::move(hook);
}

void ExpertLinkLlImpl::receive(cudaStream_t stream) {
  if (!hook_.valid())
    EL_FAIL(ErrorCode::kInternal, "expertlink LL: no split call is waiting for its receive hook");
  LlRecvHook hook = std::move(hook_);
  hook.receive(stream);
}

void ExpertLinkLlImpl::poison_outputs(Op op, cudaStream_t stream) {
  if (op_has_dispatch(op))
    for (const DeviceBuffer* b : {&recv_x_, &recv_scales_, &recv_count_, &src_info_, &layout_range_})
      poison(*b, stream);
  if (op_has_combine(op)) poison(out_, stream);
}

ExpertOutputs ExpertLinkLlImpl::prepare(Op op, cudaStream_t stream) {
  stream_ = stream;
  EL_CHECK(!hook_.valid(), "expertlink LL: a split call is still waiting for its receive hook");
  for (const DeviceBuffer* b :
       {&recv_x_, &recv_scales_, &recv_count_, &src_info_, &layout_range_, &expert_y_, &out_})
    poison(*b, stream);
  if (!op_has_combine(op)) return {};
  // The combine follows the handle of a whole dispatch; the harness writes the expert outputs of the
  // valid slots (the rest stays NaN, so a combine reading an unused slot is seen).
  dispatch(/*split=*/false, stream);
  ExpertOutputs eo;
  eo.rows = expert_y_.as<uint16_t>();
  eo.ids = layout_.ids;
  eo.positions = layout_.positions;
  return eo;
}

void ExpertLinkLlImpl::before_run(Op op, cudaStream_t stream) {
  stream_ = stream;
  poison_outputs(op, stream);
  if (mode_ != Mode::kRecv) return;
  // The send half, untimed: the timed region is the receive half alone.
  if (op == Op::kLlDispatchFp8)
    dispatch(/*split=*/true, stream);
  else if (op == Op::kLlCombineBf16)
    combine(/*split=*/true, stream);
}

void ExpertLinkLlImpl::run(Op op, cudaStream_t stream) {
  stream_ = stream;
  switch (op) {
    case Op::kLlDispatchFp8:
      if (mode_ == Mode::kRecv)
        receive(stream);
      else
        dispatch(mode_ == Mode::kSend, stream);
      break;
    case Op::kLlCombineBf16:
      if (mode_ == Mode::kRecv)
        receive(stream);
      else
        combine(mode_ == Mode::kSend, stream);
      break;
    case Op::kLlRoundtrip:
      dispatch(/*split=*/false, stream);
      combine(/*split=*/false, stream);
      break;
    default:
      EL_FAIL(ErrorCode::kInternal, "expertlink LL: %s is not supported here", op_name(op));
  }
}

void ExpertLinkLlImpl::after_run(Op, cudaStream_t stream) {
  // The receive half of a timed send half, untimed.
  if (mode_ == Mode::kSend) receive(stream);
}

DispatchView ExpertLinkLlImpl::dispatch_view(Op) {
  buffer_->synchronize(stream_);
  const Inputs& in = data_->inputs();
  const std::vector<int32_t> counts = download<int32_t>(recv_count_.as(), local_experts_);
  DispatchView v;
  for (int32_t c : counts) v.rows_received += c;
  v.format = RowFormat::kFp8;
  v.data = recv_x_.as<uint8_t>();
  v.data_stride = in.hidden;
  v.scales = recv_scales_.as<float>();
  v.scales_stride = in.hidden / 128;
  v.ids = layout_.ids;
  v.positions = layout_.positions;
  return v;
}

void ExpertLinkLlImpl::make_reference_fp8() {
  if (!ref_q_.empty()) return;
  const Inputs& in = data_->inputs();
  const int64_t rows = in.num_ranks * in.tokens, h = in.hidden, groups = h / 128;
  const std::vector<uint16_t> x = download<uint16_t>(data_->all_x_bf16(), rows * h);
  ref_q_.resize(static_cast<size_t>(rows * h));
  ref_sf_.resize(static_cast<size_t>(rows * groups));
  for (int64_t r = 0; r < rows; ++r)
    reference::quantize_row_fp8(x.data() + r * h, h, /*round_scale=*/false, ref_q_.data() + r * h,
                                ref_sf_.data() + r * groups);
}

std::string ExpertLinkLlImpl::check_rows_exact(const std::vector<int32_t>& counts) {
  make_reference_fp8();
  const Inputs& in = data_->inputs();
  const int64_t h = in.hidden, groups = h / 128;
  long long bad = 0;
  std::string first;
  size_t i = 0;  // layout_.ids is expert-major: expert j's rows are the next counts[j] ids
  for (int j = 0; j < local_experts_; ++j) {
    const int64_t n = counts[static_cast<size_t>(j)], row0 = j * slots_;
    const std::vector<uint8_t> q = download<uint8_t>(recv_x_.as<uint8_t>() + row0 * h, n * h);
    const std::vector<float> sf = download<float>(recv_scales_.as<float>() + row0 * groups, n * groups);
    for (int64_t r = 0; r < n; ++r, ++i) {
      const RowId& id = layout_.ids[i];
      const int64_t src = int64_t{id.src_rank} * in.tokens + id.token;
      const uint8_t* want_q = ref_q_.data() + src * h;
      const float* want_sf = ref_sf_.data() + src * groups;
      for (int64_t c = 0; c < h; ++c) {
        if (q[static_cast<size_t>(r * h + c)] == want_q[c]) continue;
        if (bad++ == 0)
          first = text(
              "local expert %d slot %lld (rank %d token %d) column %lld: e4m3 0x%02x, the oracle's 0x%02x", j,
              ll(r), id.src_rank, id.token, ll(c), q[static_cast<size_t>(r * h + c)], want_q[c]);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const float got = sf[static_cast<size_t>(r * groups + g)];
        if (std::memcmp(&got, want_sf + g, sizeof got) == 0) continue;
        if (bad++ == 0)
          first = text("local expert %d slot %lld (rank %d token %d) scale %lld: %.9g, the oracle's %.9g", j,
                       ll(r), id.src_rank, id.token, ll(g), got, want_sf[g]);
      }
    }
    if (n < slots_) {  // the first slot after the valid prefix keeps what it held (the poison)
      const std::vector<uint8_t> after = download<uint8_t>(recv_x_.as<uint8_t>() + (row0 + n) * h, 16);
      if (std::any_of(after.begin(), after.end(), [](uint8_t b) { return b != 0xff; }) && bad++ == 0)
        first = text("local expert %d: slot %lld, past recv_count, was written", j, ll(n));
    }
  }
  if (bad == 0) return {};
  return text("%lld values differ from the oracle's FP8 cast (reference::quantize_row_fp8); first: %s", bad,
              first.c_str());
}

std::string ExpertLinkLlImpl::check_dispatch_own() {
  const Inputs& in = data_->inputs();
  const int R = in.num_ranks, el = local_experts_;
  if (!handle_.valid() || handle_.num_tokens() != in.tokens || handle_.hidden() != in.hidden ||
      handle_.topk() != in.topk || handle_.num_experts() != in.num_experts || handle_.num_ranks() != R ||
      handle_.num_max_dispatch_tokens_per_rank() != capacity_)
    return text(
        "handle: valid %d, T %d, H %d, K %d, E %d, R %d, N %d; expected T %lld, H %lld, K %d, E %d, R %d, "
        "N %lld",
        int{handle_.valid()}, handle_.num_tokens(), handle_.hidden(), handle_.topk(), handle_.num_experts(),
        handle_.num_ranks(), handle_.num_max_dispatch_tokens_per_rank(), ll(in.tokens), ll(in.hidden),
        in.topk, in.num_experts, R, ll(capacity_));
  const std::vector<int32_t> counts = download<int32_t>(recv_count_.as(), el);
  for (int j = 0; j < el; ++j)
    if (counts[static_cast<size_t>(j)] != layout_.recv_count[static_cast<size_t>(j)])
      return text("recv_count[%d] (expert %d) = %d, the routing says %d", j, in.rank * el + j,
                  counts[static_cast<size_t>(j)], layout_.recv_count[static_cast<size_t>(j)]);
  const std::vector<int64_t> ranges = download<int64_t>(layout_range_.as(), int64_t{el} * R);
  for (int j = 0; j < el; ++j) {
    for (int s = 0; s < R; ++s) {
      const size_t k = static_cast<size_t>(j) * R + s;
      const int64_t want =
          int64_t{layout_.range_begin[k]} << 32 | static_cast<uint32_t>(layout_.range_count[k]);
      if (ranges[k] != want)
        return text("layout_range[%d][%d] = (begin %lld, count %lld), the routing says (%d, %d)", j, s,
                    ll(ranges[k] >> 32), ll(ranges[k] & 0xffffffff), layout_.range_begin[k],
                    layout_.range_count[k]);
    }
  }
  const std::vector<int32_t> src = download<int32_t>(src_info_.as(), el * slots_);
  for (size_t i = 0; i < layout_.ids.size(); ++i)
    if (src[static_cast<size_t>(layout_.positions[i])] != layout_.ids[i].token)
      return text("src_info at row %lld (local expert %lld) = %d, expected token %d of rank %d",
                  ll(layout_.positions[i]), ll(layout_.positions[i] / slots_),
                  src[static_cast<size_t>(layout_.positions[i])], layout_.ids[i].token,
                  layout_.ids[i].src_rank);
  return check_rows_exact(counts);
}

std::string ExpertLinkLlImpl::check_own(Op op) {
  try {
    buffer_->synchronize(stream_);
    buffer_->ll_clean(stream_);  // no split call left without its hook
    return op_has_dispatch(op) ? check_dispatch_own() : std::string();
  } catch (const Error& e) {
    return e.what();
  }
}

void ExpertLinkLlImpl::teardown() {
  // The Buffer and its handle stay for the next case of the same capacity.
  if (hook_.valid()) receive(stream_);
  recv_x_ = DeviceBuffer();
  recv_scales_ = DeviceBuffer();
  recv_count_ = DeviceBuffer();
  src_info_ = DeviceBuffer();
  layout_range_ = DeviceBuffer();
  expert_y_ = DeviceBuffer();
  out_ = DeviceBuffer();
  layout_ = LlLayout();
  ref_q_.clear();
  ref_sf_.clear();
  data_ = nullptr;
}

}  // namespace expertlink::bench
