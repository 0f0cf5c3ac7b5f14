// The HT operations of Buffer: argument validation (before any kernel runs, messages name the argument
// and value), then the launches. Kernels: src/kernels/ht_*.cu; protocol: src/kernels/ht_protocol.cuh.
#include <algorithm>
#include <climits>

#include "api_checks.hpp"
#include "buffer_state.hpp"
#include "check.hpp"
#include "comm/host_wait.hpp"
#include "ht/handle.hpp"
#include "internode/internode.hpp"
#include "kernels/ht_kernels.hpp"

namespace expertlink {
namespace {

using kernels::IdxType;
using kernels::RowKind;

struct Routing {
  int tokens = 0, topk = 0;
  const void* idx = nullptr;
  IdxType idx_type = IdxType::kNone;
  int64_t idx_rs = 0, idx_cs = 0;
};

void check_2d(const TensorView& t, const char* name) {
  EL_CHECK(t.ndim == 2, "%s must be 2-D, got %s", name, t.describe().c_str());
}

Routing check_topk(const TensorView& topk_idx, int64_t tokens, const char* name = "topk_idx") {
  Routing r;
  r.tokens = static_cast<int>(tokens);
  if (!topk_idx.defined()) return r;
  r.topk = checks::topk_idx(topk_idx, tokens, kHtMaxTopk, name);
  r.idx = topk_idx.data;
  r.idx_type = topk_idx.dtype == DType::kI64 ? IdxType::kI64 : IdxType::kI32;
  r.idx_rs = topk_idx.stride[0];
  r.idx_cs = topk_idx.stride[1];
  return r;
}

void check_experts(int num_experts, int num_ranks) {
  checks::num_experts(num_experts, num_ranks, kHtMaxExperts);
}

// Bytes of one dispatch row of `x` in the receiving area: FP8 rows carry their scales (f32, or packed
// UE8M0 when `x_scales` is i32 or not given yet: the smaller record, so notify never refuses a valid call).
int64_t dispatch_record_of(const TensorView& x, const TensorView& x_scales, int topk) {
  const int64_t H = x.shape[1];
  if (x.dtype != DType::kFP8E4M3) return kernels::dispatch_record_bytes(H * dtype_size(x.dtype), 0, topk);
  const bool f32 = x_scales.defined() && x_scales.dtype == DType::kF32;
  return kernels::dispatch_record_bytes(H, static_cast<int>(f32 ? H / 128 : (H + 511) / 512), topk);
}

void check_weights(const TensorView& w, int64_t rows, int topk, const char* name) {
  if (!w.defined()) return;
  check_2d(w, name);
  EL_CHECK(w.dtype == DType::kF32, "%s must be f32, got %s", name, dtype_name(w.dtype));
  EL_CHECK(w.shape[0] == rows && w.shape[1] == topk, "%s must be [%lld, %d], got %s", name,
           static_cast<long long>(rows), topk, w.describe().c_str());
}

void check_output_rows(const TensorView& t, int64_t rows, const char* name) {
  EL_CHECK(t.shape[0] >= rows, "%s holds %lld rows but %lld arrive", name, static_cast<long long>(t.shape[0]),
           static_cast<long long>(rows));
}

int pick_sms(int requested, int fallback, int device_sms, const char* name) {
  EL_CHECK(requested >= 0 && requested <= device_sms, "%s = %d must be in [0, %d] (0 = default)", name,
           requested, device_sms);
  return requested > 0 ? requested : fallback;
}

// Where a call's receiving area lies: the dispatch area is the first half of the HT region, the combine
// area the second; each holds R - 1 segments of `record`-byte rows. Fails, naming what does not fit,
// when this rank's T rows would not fit a segment.
struct Area {
  int64_t rows;    // per source segment
  int64_t offset;  // within the data region
};

// Where the HT region's combine half starts (on a 128-byte line), within the data region.
size_t combine_half_offset(size_t ht_bytes) {
  return ht_bytes / 2 / 128 * 128;
}

Area plan_area(size_t ht_bytes, int num_ranks, int64_t record, bool combine, int64_t tokens) {
  const size_t half = combine_half_offset(ht_bytes);
  Area a;
  a.rows = num_ranks <= 1 ? INT_MAX : static_cast<int64_t>(half / (size_t(num_ranks - 1) * record));
  a.offset = combine ? static_cast<int64_t>(half) : 0;
  EL_CHECK(
      tokens <= a.rows,
      "this rank has %lld tokens but the buffer's HT region (%zu bytes) holds %lld %s rows per source of "
      "this size; it needs ht_bytes >= %zu (Buffer::ht_size_hint)",
      static_cast<long long>(tokens), ht_bytes, static_cast<long long>(a.rows),
      combine ? "combine" : "dispatch", 2 * size_t(num_ranks - 1) * size_t(tokens) * size_t(record));
  return a;
}

// Rows of `row_bytes` each that the receive region holds (0 without one).
int64_t receive_region_rows(const Buffer::State& s, int64_t row_bytes) {
  return static_cast<int64_t>(s.ht_recv_bytes / static_cast<size_t>(row_bytes));
}

// Whether `t` starts where the window view `view` starts (`offset` into the window, with a receive region);
// any other start inside the window is refused, naming `name`.
bool starts_at_window_view(const Buffer::State& s, const TensorView& t, size_t offset, const char* view,
                           const char* name) {
  const char* data = s.window->data();
  const char* t0 = static_cast<const char*>(t.data);
  const bool at = s.ht_recv_bytes > 0 && t0 == data + offset;
  EL_CHECK(at || t0 < data || t0 >= data + s.window->data_bytes(),
           "%s lies in this Buffer's window but is not the view %s returned (it must start where that view "
           "starts)",
           name, view);
  return at;
}

// Whether `t` ([rows, H] of its dtype) is the receive region's view (Buffer::ht_window_recv_x: the same
// start, rows back to back, within the region): direct dispatch (recv_x) or direct combine (x). Any other
// view into the window is refused, naming `name`.
bool is_receive_region(const Buffer::State& s, size_t recv_offset, const TensorView& t, int64_t H,
                       const char* name) {
  if (!s.window || !starts_at_window_view(s, t, recv_offset, "ht_window_recv_x", name)) return false;
  EL_CHECK(t.stride[0] == H,
           "%s: a view of the receive region keeps ht_window_recv_x's row stride %lld, got %s", name,
           static_cast<long long>(H), t.describe().c_str());
  EL_CHECK(t.shape[0] <= receive_region_rows(s, H * dtype_size(t.dtype)),
           "%s: %s does not fit the receive region (%zu bytes)", name, t.describe().c_str(), s.ht_recv_bytes);
  return true;
}

// Rows of `topk` f32 weights the view Buffer::ht_window_recv_topk_weights holds: the HT region's combine
// half, where a direct combine's peers read this rank's weights (also where they are staged otherwise).
int64_t window_weights_rows(const Buffer::State& s, int64_t topk) {
  if (topk <= 0) return 0;  // a malformed view: refused by the caller's check
  return static_cast<int64_t>((s.ht_bytes - combine_half_offset(s.ht_bytes)) /
                              (static_cast<size_t>(topk) * 4));
}

// Whether `t` is that view (the same start, contiguous f32 [rows, topk] within it): the weights are in
// place for a direct combine. Any other view into the window is refused, naming `name`.
bool is_window_weights(const Buffer::State& s, const TensorView& t, const char* name) {
  if (!s.window || !t.defined() ||
      !starts_at_window_view(s, t, combine_half_offset(s.ht_bytes), "ht_window_recv_topk_weights", name))
    return false;
  EL_CHECK(
      t.dtype == DType::kF32 && t.ndim == 2 && t.is_contiguous() &&
          t.shape[0] <= window_weights_rows(s, t.shape[1]),
      "%s: a view of ht_window_recv_topk_weights is contiguous f32 within it (%lld rows of %lld), got %s",
      name, static_cast<long long>(t.ndim == 2 ? window_weights_rows(s, t.shape[1]) : 0),
      static_cast<long long>(t.ndim == 2 ? t.shape[1] : 0), t.describe().c_str());
  return true;
}

// What notify and dispatch both take: well-formed views on the buffer's device, x BF16 or FP8 token rows.
void check_dispatch_inputs(const HtDispatchArgs& args, int device, cudaStream_t stream) {
  checks::required(args.x, "x");
  checks::tensors({{&args.x, "x"},
                   {&args.x_scales, "x_scales"},
                   {&args.topk_idx, "topk_idx"},
                   {&args.topk_weights, "topk_weights"},
                   {&args.is_token_in_rank, "is_token_in_rank"}},
                  device, stream);
  EL_CHECK(args.x.dtype == DType::kBF16 || args.x.dtype == DType::kFP8E4M3,
           "x must be bf16 or fp8_e4m3, got %s", dtype_name(args.x.dtype));
  checks::token_rows(args.x, "x");
  EL_CHECK(args.x.shape[0] <= INT_MAX / 2, "x has %lld tokens: too many",
           static_cast<long long>(args.x.shape[0]));
}

}  // namespace

size_t Buffer::ht_size_hint(int num_ranks, int64_t max_tokens_per_rank, int64_t hidden, int topk) {
  EL_CHECK(num_ranks >= 1 && max_tokens_per_rank >= 0 && hidden > 0 && topk >= 0,
           "ht_size_hint(num_ranks = %d, max_tokens_per_rank = %lld, hidden = %lld, topk = %d)", num_ranks,
           static_cast<long long>(max_tokens_per_rank), static_cast<long long>(hidden), topk);
  // Two equal areas (dispatch, combine); the BF16 dispatch record is the largest.
  const int64_t record = kernels::dispatch_record_bytes(2 * hidden, 0, topk);
  return 2 * static_cast<size_t>(num_ranks - 1) * max_tokens_per_rank * record;
}

size_t Buffer::ht_recv_size_hint(int num_ranks, int64_t max_tokens_per_rank, int64_t hidden) {
  EL_CHECK(num_ranks >= 1 && max_tokens_per_rank >= 0 && hidden > 0,
           "ht_recv_size_hint(num_ranks = %d, max_tokens_per_rank = %lld, hidden = %lld)", num_ranks,
           static_cast<long long>(max_tokens_per_rank), static_cast<long long>(hidden));
  return static_cast<size_t>(num_ranks) * max_tokens_per_rank * 2 * hidden;  // BF16 rows cover FP8's
}

TensorView Buffer::ht_window_recv_x(DType dtype, int64_t hidden) const {
  EL_CHECK(dtype == DType::kBF16 || dtype == DType::kFP8E4M3,
           "ht_window_recv_x: dtype must be bf16 or fp8_e4m3, got %s", dtype_name(dtype));
  EL_CHECK(hidden > 0 && hidden * dtype_size(dtype) % 16 == 0,
           "ht_window_recv_x: hidden = %lld must make rows of a multiple of 16 bytes",
           static_cast<long long>(hidden));
  EL_CHECK(s_->window != nullptr && s_->ht_recv_bytes > 0,
           "ht_window_recv_x: this Buffer has no receive region (construct it with ht_recv_bytes > 0, "
           "see ht_recv_size_hint; intranode only)");
  const int64_t rows = receive_region_rows(*s_, hidden * dtype_size(dtype));
  return TensorView(s_->window->data() + ht_recv_offset(), dtype, {rows, hidden});
}

TensorView Buffer::ht_window_recv_topk_weights(int topk) const {
  EL_CHECK(topk >= 1 && topk <= kHtMaxTopk, "ht_window_recv_topk_weights: topk = %d is outside [1, %d]", topk,
           kHtMaxTopk);
  EL_CHECK(
      s_->window != nullptr && s_->ht_recv_bytes > 0,
      "ht_window_recv_topk_weights: this Buffer has no receive region (construct it with ht_recv_bytes > 0, "
      "see ht_recv_size_hint; intranode only)");
  return TensorView(s_->window->data() + combine_half_offset(s_->ht_bytes), DType::kF32,
                    {window_weights_rows(*s_, topk), topk});
}

void Buffer::get_dispatch_layout(const TensorView& topk_idx, int num_experts,
                                 const TensorView& num_tokens_per_rank,
                                 const TensorView& num_tokens_per_expert, const TensorView& is_token_in_rank,
                                 cudaStream_t stream) {
  const int R = num_ranks();
  checks::required(topk_idx, "topk_idx");
  checks::tensors({{&topk_idx, "topk_idx"},
                   {&num_tokens_per_rank, "num_tokens_per_rank"},
                   {&num_tokens_per_expert, "num_tokens_per_expert"},
                   {&is_token_in_rank, "is_token_in_rank"}},
                  s_->comm.device(), stream);
  Routing r = check_topk(topk_idx, topk_idx.ndim == 2 ? topk_idx.shape[0] : 0);
  check_experts(num_experts, R);
  EL_CHECK(num_tokens_per_rank.dtype == DType::kI32 && num_tokens_per_rank.numel() == R &&
               num_tokens_per_rank.is_contiguous(),
           "num_tokens_per_rank must be contiguous i32 [%d], got %s", R,
           num_tokens_per_rank.describe().c_str());
  EL_CHECK(num_tokens_per_expert.dtype == DType::kI32 && num_tokens_per_expert.numel() == num_experts &&
               num_tokens_per_expert.is_contiguous(),
           "num_tokens_per_expert must be contiguous i32 [%d], got %s", num_experts,
           num_tokens_per_expert.describe().c_str());
  uint8_t* in_rank = nullptr;
  if (is_token_in_rank.defined()) {
    EL_CHECK((is_token_in_rank.dtype == DType::kBool || is_token_in_rank.dtype == DType::kU8) &&
                 is_token_in_rank.ndim == 2 && is_token_in_rank.shape[0] == r.tokens &&
                 is_token_in_rank.shape[1] == R && is_token_in_rank.is_contiguous(),
             "is_token_in_rank must be contiguous bool [%d, %d], got %s", r.tokens, R,
             is_token_in_rank.describe().c_str());
    in_rank = is_token_in_rank.ptr<uint8_t>();
  }
  if (s_->window) s_->window->raise_if_device_error();  // none on the internode path
  kernels::launch_ht_layout(r.idx, r.idx_type, r.idx_rs, r.idx_cs, r.tokens, r.topk, num_experts, R,
                            num_tokens_per_rank.ptr<int32_t>(), num_tokens_per_expert.ptr<int32_t>(), in_rank,
                            stream);
}

void Buffer::ht_notify(const HtDispatchArgs& args, HtHandle& handle, Sizing sizing, int64_t capacity,
                       cudaStream_t stream) {
  const int R = num_ranks();
  check_dispatch_inputs(args, s_->comm.device(), stream);
  const int64_t T = args.x.shape[0];
  Routing r = check_topk(args.topk_idx, T);
  if (r.idx != nullptr) {
    check_experts(args.num_experts, R);
  } else {
    EL_CHECK(args.is_token_in_rank.defined(), "either topk_idx or is_token_in_rank is required");
  }
  if (args.is_token_in_rank.defined() && r.idx == nullptr) {
    EL_CHECK((args.is_token_in_rank.dtype == DType::kBool || args.is_token_in_rank.dtype == DType::kU8) &&
                 args.is_token_in_rank.ndim == 2 && args.is_token_in_rank.shape[0] == T &&
                 args.is_token_in_rank.shape[1] == R && args.is_token_in_rank.stride[1] == 1,
             "is_token_in_rank must be bool [%lld, %d] with unit column stride, got %s",
             static_cast<long long>(T), R, args.is_token_in_rank.describe().c_str());
  }
  EL_CHECK(args.expert_alignment >= 1, "expert_alignment = %d must be >= 1", args.expert_alignment);
  if (sizing == Sizing::kCapacity)
    EL_CHECK(capacity >= 0 && capacity <= INT_MAX, "capacity = %lld must be in [0, %d]",
             static_cast<long long>(capacity), INT_MAX);
  // The dispatch that follows must fit: refuse here, before the notify kernel, rather than after it.
  plan_area(s_->ht_bytes, R, dispatch_record_of(args.x, args.x_scales, r.topk), /*combine=*/false, T);
  if (s_->internode) return internode::ht_notify(*s_, args, handle.state_, sizing, capacity, stream);
  s_->window->raise_if_device_error();

  if (!handle.state_) handle.state_ = std::make_unique<HtHandleState>();
  HtHandleState& h = *handle.state_;
  const int local_experts = r.idx != nullptr ? args.num_experts / R : 0;
  h.reserve(static_cast<int>(T), R, local_experts);
  h.owner = s_.get();
  h.num_ranks = R;
  h.num_tokens = static_cast<int>(T);
  h.topk = r.topk;
  h.num_experts = r.idx != nullptr ? args.num_experts : 0;
  h.hidden = static_cast<int>(args.x.shape[1]);
  h.exact = sizing == Sizing::kExact;
  h.capacity = h.exact ? INT_MAX : capacity;
  if (!h.exact) h.reserve_recv(capacity);

  kernels::HtNotifyParams p{};
  p.win = s_->window->view();
  p.state = s_->ht;
  p.handle = h.view();
  p.topk_idx = r.idx;
  p.idx_type = r.idx_type;
  p.idx_row_stride = r.idx_rs;
  p.idx_col_stride = r.idx_cs;
  p.is_token_in_rank = r.idx == nullptr ? args.is_token_in_rank.ptr<uint8_t>() : nullptr;
  p.in_rank_row_stride = args.is_token_in_rank.defined() ? args.is_token_in_rank.stride[0] : 0;
  p.num_tokens = static_cast<int>(T);
  p.topk = r.topk;
  p.num_experts = h.num_experts;
  p.expert_alignment = args.expert_alignment;
  p.hidden = h.hidden;
  kernels::launch_ht_notify(p, stream);

  if (h.exact) {
    s_->window->synchronize(stream);
    h.raise_flags();
    h.num_recv = static_cast<const volatile int32_t*>(h.host_counts)[kernels::kHostTotal];
    h.capacity = h.num_recv;
    h.reserve_recv(h.num_recv);
  }
}

void Buffer::ht_dispatch(const HtDispatchArgs& args, HtHandle& handle, const HtDispatchOutputs& out,
                         cudaStream_t stream) {
  const int R = num_ranks();
  EL_CHECK(handle.valid() && handle.state_->owner == s_.get(),
           "handle was not filled by this buffer's ht_notify (a handle belongs to one Buffer)");
  HtHandleState& h = *handle.state_;
  check_dispatch_inputs(args, s_->comm.device(), stream);
  checks::tensors({{&out.recv_x, "recv_x"},
                   {&out.recv_x_scales, "recv_x_scales"},
                   {&out.recv_topk_idx, "recv_topk_idx"},
                   {&out.recv_topk_weights, "recv_topk_weights"},
                   {&out.num_recv_tokens_per_expert, "num_recv_tokens_per_expert"}},
                  s_->comm.device(), stream);
  const int64_t T = args.x.shape[0], H = args.x.shape[1];
  EL_CHECK(T == h.num_tokens, "x has %lld tokens but the handle was made for %d", static_cast<long long>(T),
           h.num_tokens);
  EL_CHECK(H == h.hidden, "x has hidden = %lld but the handle was made with hidden = %d",
           static_cast<long long>(H), h.hidden);
  Routing r = check_topk(args.topk_idx, T);
  EL_CHECK(r.idx == nullptr || r.topk == h.topk, "topk_idx has top-k = %d but the handle was made with %d",
           r.topk, h.topk);
  EL_CHECK(r.idx == nullptr || args.num_experts == h.num_experts,
           "num_experts = %d but the handle was made with %d", args.num_experts, h.num_experts);
  check_weights(args.topk_weights, T, r.topk, "topk_weights");
  EL_CHECK(!args.topk_weights.defined() || r.idx != nullptr, "topk_weights needs topk_idx");

  RowKind kind = RowKind::kBf16;
  int scale_cols = 0;
  if (args.x.dtype == DType::kFP8E4M3) {
    EL_CHECK(args.x_scales.defined(), "x is fp8: x_scales is required");
    check_2d(args.x_scales, "x_scales");
    if (args.x_scales.dtype == DType::kF32) {
      kind = RowKind::kFp8;
      scale_cols = static_cast<int>(H / 128);
    } else {
      EL_CHECK(args.x_scales.dtype == DType::kI32, "x_scales must be f32 or i32 (packed UE8M0), got %s",
               dtype_name(args.x_scales.dtype));
      kind = RowKind::kFp8Ue8m0;
      scale_cols = static_cast<int>((H + 511) / 512);
    }
    EL_CHECK(args.x_scales.shape[0] == T && args.x_scales.shape[1] == scale_cols,
             "x_scales must be [%lld, %d], got %s", static_cast<long long>(T), scale_cols,
             args.x_scales.describe().c_str());
  } else {
    EL_CHECK(!args.x_scales.defined(), "x is bf16: x_scales must not be given");
  }

  // Outputs.
  const int64_t rows = h.exact ? h.num_recv : h.capacity;
  EL_CHECK(out.recv_x.defined() && out.recv_x.dtype == args.x.dtype && out.recv_x.ndim == 2 &&
               out.recv_x.shape[1] == H && out.recv_x.rows_are_dense_16b(),
           "recv_x must be %s [>= %lld, %lld] with dense 16-byte rows, got %s", dtype_name(args.x.dtype),
           static_cast<long long>(rows), static_cast<long long>(H), out.recv_x.describe().c_str());
  check_output_rows(out.recv_x, rows, "recv_x");
  if (kind != RowKind::kBf16) {
    EL_CHECK(out.recv_x_scales.defined() && out.recv_x_scales.dtype == args.x_scales.dtype &&
                 out.recv_x_scales.ndim == 2 && out.recv_x_scales.shape[1] == scale_cols,
             "recv_x_scales must be %s [>= %lld, %d], got %s", dtype_name(args.x_scales.dtype),
             static_cast<long long>(rows), scale_cols, out.recv_x_scales.describe().c_str());
    check_output_rows(out.recv_x_scales, rows, "recv_x_scales");
  }
  if (out.recv_topk_idx.defined()) {
    EL_CHECK(r.idx != nullptr, "recv_topk_idx needs topk_idx");
    EL_CHECK(out.recv_topk_idx.dtype == args.topk_idx.dtype && out.recv_topk_idx.ndim == 2 &&
                 out.recv_topk_idx.shape[1] == r.topk && out.recv_topk_idx.is_contiguous(),
             "recv_topk_idx must be contiguous %s [>= %lld, %d], got %s", dtype_name(args.topk_idx.dtype),
             static_cast<long long>(rows), r.topk, out.recv_topk_idx.describe().c_str());
    check_output_rows(out.recv_topk_idx, rows, "recv_topk_idx");
  }
  if (out.recv_topk_weights.defined()) {
    EL_CHECK(args.topk_weights.defined() && out.recv_topk_idx.defined(),
             "recv_topk_weights needs topk_weights and recv_topk_idx");
    EL_CHECK(out.recv_topk_weights.dtype == DType::kF32 && out.recv_topk_weights.ndim == 2 &&
                 out.recv_topk_weights.shape[1] == r.topk && out.recv_topk_weights.is_contiguous(),
             "recv_topk_weights must be contiguous f32 [>= %lld, %d], got %s", static_cast<long long>(rows),
             r.topk, out.recv_topk_weights.describe().c_str());
    check_output_rows(out.recv_topk_weights, rows, "recv_topk_weights");
    (void)is_window_weights(*s_, out.recv_topk_weights,
                            "recv_topk_weights");  // in place, or outside the window
  }
  if (out.num_recv_tokens_per_expert.defined()) {
    EL_CHECK(h.num_experts > 0, "num_recv_tokens_per_expert needs a handle made with topk_idx");
    EL_CHECK(out.num_recv_tokens_per_expert.dtype == DType::kI32 &&
                 out.num_recv_tokens_per_expert.numel() == h.num_experts / R,
             "num_recv_tokens_per_expert must be i32 [%d], got %s", h.num_experts / R,
             out.num_recv_tokens_per_expert.describe().c_str());
  }

  // Direct dispatch: recv_x is the receive region's view (ht_window_recv_x).
  const bool direct = is_receive_region(*s_, ht_recv_offset(), out.recv_x, H, "recv_x");
  if (s_->internode) return internode::ht_dispatch(*s_, args, h, out, stream);
  kernels::HtDispatchParams p{};
  p.direct_offset = direct ? static_cast<int64_t>(ht_recv_offset()) : -1;
  p.direct_rows = direct ? receive_region_rows(*s_, H * dtype_size(args.x.dtype)) : 0;
  p.kind = kind;
  p.row_bytes = H * dtype_size(args.x.dtype);
  p.scale_cols = scale_cols;
  p.record_bytes = kernels::dispatch_record_bytes(p.row_bytes, scale_cols, h.topk);
  const Area area = plan_area(s_->ht_bytes, R, p.record_bytes, /*combine=*/false, T);
  p.area_rows = area.rows;
  p.area_offset = area.offset;
  s_->window->raise_if_device_error();

  p.win = s_->window->view();
  p.state = s_->ht;
  p.handle = h.view();
  p.num_tokens = static_cast<int>(T);
  p.hidden = static_cast<int>(H);
  p.topk = h.topk;
  p.num_experts = h.num_experts;
  p.x = {args.x.data, args.x.stride[0], 1};
  if (scale_cols > 0) p.x_scales = {args.x_scales.data, args.x_scales.stride[0], args.x_scales.stride[1]};
  if (args.topk_weights.defined())
    p.topk_weights = {args.topk_weights.data, args.topk_weights.stride[0], args.topk_weights.stride[1]};
  // Without topk_idx the rows still travel; the remapped ids are only written when asked for.
  p.topk_idx = r.idx;
  p.idx_type = r.idx_type;
  p.idx_row_stride = r.idx_rs;
  p.idx_col_stride = r.idx_cs;
  if (r.idx == nullptr) p.topk = 0;
  p.recv_x = out.recv_x.data;
  p.recv_x_row_stride = out.recv_x.stride[0];
  if (scale_cols > 0) {
    p.recv_scales = out.recv_x_scales.data;
    p.recv_scales_row_stride = out.recv_x_scales.stride[0];
    p.recv_scales_col_stride = out.recv_x_scales.stride[1];
  }
  p.recv_topk_idx = out.recv_topk_idx.defined() ? out.recv_topk_idx.data : nullptr;
  p.recv_topk_weights = out.recv_topk_weights.defined() ? out.recv_topk_weights.ptr<float>() : nullptr;
  p.recv_expert_count =
      out.num_recv_tokens_per_expert.defined() ? out.num_recv_tokens_per_expert.ptr<int32_t>() : nullptr;
  kernels::launch_ht_dispatch(p, pick_sms(args.num_sms, default_ht_sms(), s_->device_sms, "num_sms"), stream);
}

void Buffer::ht_combine(const HtCombineArgs& args, const HtHandle& handle, const HtCombineOutputs& out,
                        cudaStream_t stream) {
  const int R = num_ranks();
  EL_CHECK(handle.valid() && handle.state_->owner == s_.get(),
           "handle was not filled by this buffer's ht_notify (a handle belongs to one Buffer)");
  const HtHandleState& h = *handle.state_;
  const int64_t rows = h.exact ? h.num_recv : h.capacity;
  checks::required(args.x, "x");
  checks::tensors({{&args.x, "x"},
                   {&args.topk_weights, "topk_weights"},
                   {&args.bias0, "bias0"},
                   {&args.bias1, "bias1"},
                   {&out.combined_x, "combined_x"},
                   {&out.combined_topk_weights, "combined_topk_weights"}},
                  s_->comm.device(), stream);
  EL_CHECK(args.x.dtype == DType::kBF16, "combine x must be bf16, got %s", dtype_name(args.x.dtype));
  checks::token_rows(args.x, "x");
  // Exact sizing: the received rows; capacity sizing: the capacity (the count is on the device only).
  EL_CHECK(args.x.shape[0] >= rows, "x has %lld rows but the handle's %s is %lld",
           static_cast<long long>(args.x.shape[0]), h.exact ? "received row count" : "capacity",
           static_cast<long long>(rows));
  const int64_t H = args.x.shape[1];
  check_weights(args.topk_weights, args.x.shape[0], h.topk, "topk_weights");
  const int64_t T = h.num_tokens;
  for (const TensorView* b : {&args.bias0, &args.bias1}) {
    if (!b->defined()) continue;
    EL_CHECK(b->dtype == DType::kBF16 && b->ndim == 2 && b->shape[0] == T && b->shape[1] == H &&
                 b->rows_are_dense_16b(),
             "%s must be bf16 [%lld, %lld] with dense rows, got %s", b == &args.bias0 ? "bias0" : "bias1",
             static_cast<long long>(T), static_cast<long long>(H), b->describe().c_str());
  }
  EL_CHECK(out.combined_x.defined() && out.combined_x.dtype == DType::kBF16 && out.combined_x.ndim == 2 &&
               out.combined_x.shape[0] == T && out.combined_x.shape[1] == H &&
               out.combined_x.rows_are_dense_16b(),
           "combined_x must be bf16 [%lld, %lld] with dense rows, got %s", static_cast<long long>(T),
           static_cast<long long>(H), out.combined_x.describe().c_str());
  if (out.combined_topk_weights.defined()) {
    EL_CHECK(args.topk_weights.defined(), "combined_topk_weights needs topk_weights");
    EL_CHECK(out.combined_topk_weights.dtype == DType::kF32 &&
                 out.combined_topk_weights.numel() == T * h.topk && out.combined_topk_weights.is_contiguous(),
             "combined_topk_weights must be contiguous f32 [%lld, %d], got %s", static_cast<long long>(T),
             h.topk, out.combined_topk_weights.describe().c_str());
  }

  // Direct combine: x is the receive region's view, every source reads its rows from the holders' regions.
  const bool direct = is_receive_region(*s_, ht_recv_offset(), args.x, H, "x");
  // Weights in place (the dispatch wrote them into ht_window_recv_topk_weights): a direct combine's peers
  // read them there, no copy. A combine that sends rows would write them over the view while reading it.
  const bool weights_in_place = is_window_weights(*s_, args.topk_weights, "topk_weights");
  EL_CHECK(
      !weights_in_place || direct,
      "topk_weights is the view ht_window_recv_topk_weights returned, which only a direct combine (x = the "
      "view ht_window_recv_x returned) reads in place: this combine sends rows over it; pass a copy");
  if (s_->internode) return internode::ht_combine(*s_, args, h, out, stream);
  kernels::HtCombineParams p{};
  p.direct_offset = direct ? static_cast<int64_t>(ht_recv_offset()) : -1;
  p.direct_rows = direct ? receive_region_rows(*s_, H * dtype_size(args.x.dtype)) : 0;  // BF16 rows
  p.record_bytes = kernels::combine_record_bytes(static_cast<int>(H), h.topk);
  const Area area = plan_area(s_->ht_bytes, R, p.record_bytes, /*combine=*/true, T);
  p.area_rows = area.rows;
  p.area_offset = area.offset;
  s_->window->raise_if_device_error();
  p.win = s_->window->view();
  p.state = s_->ht;
  p.handle = h.view();
  p.num_tokens = static_cast<int>(T);
  p.hidden = static_cast<int>(H);
  p.topk = h.topk;
  p.x = {args.x.data, args.x.stride[0], 1};
  if (args.topk_weights.defined())
    p.topk_weights = {args.topk_weights.data, args.topk_weights.stride[0], args.topk_weights.stride[1]};
  if (args.bias0.defined()) p.bias0 = {args.bias0.data, args.bias0.stride[0], 1};
  if (args.bias1.defined()) p.bias1 = {args.bias1.data, args.bias1.stride[0], 1};
  p.out = out.combined_x.data;
  p.out_row_stride = out.combined_x.stride[0];
  p.out_topk_weights = out.combined_topk_weights.defined() ? out.combined_topk_weights.ptr<float>() : nullptr;
  if (direct && p.out_topk_weights != nullptr && !weights_in_place) {
    // The peers read this rank's weights from its window: staged into the combine area (unused by direct
    // combine; ht_window_recv_topk_weights is the same place) before the combine kernel announces that its
    // rows are readable.
    const size_t staged = size_t(args.x.shape[0]) * size_t(h.topk) * sizeof(float);
    EL_CHECK(args.x.shape[0] <= window_weights_rows(*s_, h.topk),  // the same place and rows as that view
             "topk_weights: direct combine stages this rank's %lld x %d weights (%zu bytes) in the HT "
             "region's combine half (%zu bytes); it needs ht_bytes >= %zu",
             static_cast<long long>(args.x.shape[0]), h.topk, staged, s_->ht_bytes - size_t(area.offset),
             2 * staged + 256);
    kernels::launch_ht_stage_weights(p, args.x.shape[0], stream);
  }
  kernels::launch_ht_combine(p, pick_sms(args.num_sms, default_ht_sms(), s_->device_sms, "num_sms"), stream);
}

}  // namespace expertlink
