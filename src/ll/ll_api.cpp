// The LL operations of Buffer: argument validation (before any kernel runs; messages name the argument
// and the value), the double-buffer bookkeeping of split calls, then the launches. Kernels:
// src/kernels/ll_*.cu; protocol and layout: src/kernels/ll_protocol.cuh. Across nodes the same checks and
// bookkeeping, then the internode LL path (src/internode/ll_internode.hpp) instead of the fused kernels.
#include <algorithm>
#include <climits>

#include "api_checks.hpp"
#include "buffer_state.hpp"
#include "check.hpp"
#include "internode/ll_internode.hpp"
#include "kernels/ll_kernels.hpp"
#include "ll/ll_handle.hpp"

namespace expertlink {
namespace {

using kernels::IdxType;

struct Routing {
  const void* data = nullptr;
  IdxType type = IdxType::kNone;
  int64_t row_stride = 0, col_stride = 0;
  int topk = 0;
};

long long ll(int64_t v) {
  return static_cast<long long>(v);
}

Routing check_routing(const TensorView& t, int64_t tokens, const char* name) {
  Routing r;
  r.topk = checks::topk_idx(t, tokens, kLlMaxTopk, name);
  r.data = t.data;
  r.type = t.dtype == DType::kI64 ? IdxType::kI64 : IdxType::kI32;
  r.row_stride = t.stride[0];
  r.col_stride = t.stride[1];
  return r;
}

// A 3-D [a, b, c] view whose last dimension is contiguous with 16-byte aligned rows (the kernels move
// rows in 16-byte vectors).
void check_rows_3d(const TensorView& t, DType dtype, int64_t a, int64_t b, int64_t c, const char* name) {
  EL_CHECK(
      t.defined() && t.ndim == 3 && t.dtype == dtype && t.shape[0] == a && t.shape[1] == b && t.shape[2] == c,
      "%s must be %s [%lld, %lld, %lld], got %s", name, dtype_name(dtype), ll(a), ll(b), ll(c),
      t.defined() ? t.describe().c_str() : "nothing");
  const int64_t es = dtype_size(dtype);
  EL_CHECK(t.stride[2] == 1 && (t.stride[0] * es) % 16 == 0 && (t.stride[1] * es) % 16 == 0 &&
               reinterpret_cast<uintptr_t>(t.data) % 16 == 0,
           "%s: the last dimension must be contiguous and rows 16-byte aligned, got %s at %p", name,
           t.describe().c_str(), t.data);
}

void raise_bad_expert(LlState& ll_state) {
  volatile int32_t* f = ll_state.host_flags;
  if (f == nullptr || f[0] != 2) return;
  const int t = f[1], k = f[2], v = f[3];
  f[0] = 0;  // reported once
  EL_FAIL(
      ErrorCode::kInvalidArgument,
      "an earlier ll_dispatch on this buffer got topk_idx[%d][%d] = %d, which is neither -1 nor an expert id "
      "in [0, num_experts); that pick was ignored",
      t, k, v);
}

void ll_init(Buffer::State& s) {
  LlState& st = s.ll;
  if (st.ready()) return;
  int coop = 0;
  EL_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, s.comm.device()));
  if (coop == 0)
    EL_FAIL(ErrorCode::kUnsupported, "device %d cannot launch cooperative kernels (LL path)",
            s.comm.device());
  const int per_sm = std::min(kernels::ll_dispatch_blocks_per_sm(), kernels::ll_combine_blocks_per_sm());
  if (per_sm < 1)
    EL_FAIL(ErrorCode::kInternal, "the LL kernels do not fit one block of %d threads per SM",
            kernels::kLlThreads);
  st.grid = s.device_sms;
  EL_CUDA_CHECK(cudaMalloc(&st.seq, 8 * sizeof(uint64_t)));
  EL_CUDA_CHECK(cudaMalloc(&st.done, kernels::kLlDoneCount * sizeof(uint32_t)));
  EL_CUDA_CHECK(cudaMemset(st.seq, 0, 8 * sizeof(uint64_t)));
  EL_CUDA_CHECK(cudaMemset(st.done, 0, kernels::kLlDoneCount * sizeof(uint32_t)));
  EL_CUDA_CHECK(cudaHostAlloc(&st.host_flags, 4 * sizeof(int32_t), cudaHostAllocMapped));
  std::fill(st.host_flags, st.host_flags + 4, 0);
  EL_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&st.host_flags_dev), st.host_flags, 0));
  EL_CUDA_CHECK(cudaDeviceSynchronize());  // the first LL call must not be inside a CUDA-graph capture
}

kernels::LlDeviceState device_state(const LlState& st) {
  return {st.seq, st.done, st.host_flags_dev};
}

// Common checks of every LL call; initialises the LL state on the first one.
void begin_call(Buffer::State& s, const char* what) {
  EL_CHECK(s.ll_bytes > 0,
           "%s: the buffer has no LL region (constructed with ll_bytes = 0; see Buffer::ll_size_hint)", what);
  if (s.window)
    s.window->raise_if_device_error();
  else
    internode::ll_raise_errors(*s.internode_ll);
  raise_bad_expert(s.ll);
  ll_init(s);
}

void check_area(const Buffer::State& s, int64_t need, const kernels::LlGeometry& g, const char* what) {
  EL_CHECK(need <= g.area_bytes,
           "%s needs %lld bytes per LL area (R = %d, N = %d, H = %d, K = %d, E = %d) but ll_bytes = %zu "
           "gives %lld; "
           "construct the Buffer with ll_bytes >= Buffer::ll_size_hint(%d, %d, %d, %d) = %zu",
           what, ll(need), g.num_ranks, g.capacity, g.hidden, g.topk, g.num_experts, s.ll_bytes,
           ll(g.area_bytes), g.num_ranks, g.capacity, g.hidden, g.num_experts,
           Buffer::ll_size_hint(g.num_ranks, g.capacity, g.hidden, g.num_experts));
}

void check_parity_free(const LlHookState* const (&pending)[2], const int64_t (&pending_call)[2],
                       int64_t calls, const char* what) {
  const int parity = static_cast<int>(calls & 1);
  EL_CHECK(
      pending[parity] == nullptr,
      "%s: a third call in flight: %s #%lld (split, return_recv_hook) still waits for its receive hook, and "
      "this call (#%lld) would reuse its half of the double buffer; call that hook first (at most two may be "
      "in flight)",
      what, what, ll(pending_call[parity]), ll(calls));
}

// The halves in p.phases: the fused intranode kernel, or the internode send half (kernels + NCCL exchange)
// and/or receive half.
void launch_dispatch(Buffer::State& s, const kernels::LlDispatchParams& p, cudaStream_t stream) {
  if (!s.internode_ll) return kernels::launch_ll_dispatch(p, s.ll.grid, stream);
  if (p.phases & kernels::kLlSend) internode::ll_dispatch_send(*s.internode_ll, p, stream);
  if (p.phases & kernels::kLlRecv) internode::ll_dispatch_recv(*s.internode_ll, p, stream);
}

void launch_combine(Buffer::State& s, const kernels::LlCombineParams& p, cudaStream_t stream) {
  if (!s.internode_ll) return kernels::launch_ll_combine(p, s.ll.grid, stream);
  if (p.phases & kernels::kLlSend) internode::ll_combine_send(*s.internode_ll, p, stream);
  if (p.phases & kernels::kLlRecv) internode::ll_combine_recv(*s.internode_ll, p, stream);
}

}  // namespace

size_t Buffer::ll_size_hint(int num_ranks, int64_t num_max_dispatch_tokens_per_rank, int64_t hidden,
                            int num_experts) {
  EL_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "ll_size_hint: num_ranks = %d must be in [1, %d]",
           num_ranks, kMaxRanks);
  EL_CHECK(num_max_dispatch_tokens_per_rank >= 1 && num_max_dispatch_tokens_per_rank <= kLlMaxTokens,
           "ll_size_hint: num_max_dispatch_tokens_per_rank = %lld must be in [1, %d]",
           ll(num_max_dispatch_tokens_per_rank), kLlMaxTokens);
  EL_CHECK(hidden >= 8 && hidden <= kLlMaxHidden && hidden % 8 == 0,
           "ll_size_hint: hidden = %lld must be a multiple of 8 in [8, %d]", ll(hidden), kLlMaxHidden);
  EL_CHECK(num_experts >= num_ranks && num_experts <= kLlMaxExperts && num_experts % num_ranks == 0,
           "ll_size_hint: num_experts = %d must be a multiple of num_ranks = %d, at most %d", num_experts,
           num_ranks, kLlMaxExperts);
  // BF16 rows and the largest top-k cover every call of this shape.
  const kernels::LlGeometry g =
      kernels::ll_geometry(num_ranks, static_cast<int>(num_max_dispatch_tokens_per_rank),
                           static_cast<int>(hidden), kLlMaxTopk, num_experts, false, false, 0, 0);
  return 4 * static_cast<size_t>(kernels::ll_align16(std::max(g.dispatch_bytes(), g.combine_bytes())));
}

int Buffer::ll_sms() const {
  ll_init(*s_);
  return s_->ll.grid;
}

LlRecvHook Buffer::ll_dispatch(const LlDispatchArgs& args, LlHandle& handle, const LlDispatchOutputs& out,
                               cudaStream_t stream) {
  State& s = *s_;
  const int R = num_ranks();
  const LlDispatchOptions& o = args.options;
  const int N = args.num_max_dispatch_tokens_per_rank, E = args.num_experts;
  EL_CHECK(N >= 1 && N <= kLlMaxTokens, "num_max_dispatch_tokens_per_rank = %d must be in [1, %d]", N,
           kLlMaxTokens);
  checks::num_experts(E, R, kLlMaxExperts);
  checks::required(args.x, "x");
  checks::tensors({{&args.x, "x"},
                   {&args.topk_idx, "topk_idx"},
                   {&out.recv_x, "recv_x"},
                   {&out.recv_scales, "recv_scales"},
                   {&out.recv_count, "recv_count"},
                   {&out.src_info, "src_info"},
                   {&out.layout_range, "layout_range"}},
                  s.comm.device(), stream);
  EL_CHECK(args.x.ndim == 2 && args.x.dtype == DType::kBF16, "x must be bf16 [T, H], got %s",
           args.x.describe().c_str());
  checks::token_rows(args.x, "x");
  const int64_t T = args.x.shape[0], H = args.x.shape[1];
  EL_CHECK(T <= N, "x has %lld tokens, more than num_max_dispatch_tokens_per_rank = %d", ll(T), N);
  EL_CHECK(H <= kLlMaxHidden, "x has hidden = %lld, more than the LL maximum %d", ll(H), kLlMaxHidden);
  EL_CHECK(!o.use_fp8 || H % 128 == 0,
           "use_fp8: hidden = %lld must be a multiple of 128 (one scale per 128 channels)", ll(H));
  EL_CHECK(
      !o.use_ue8m0 || (o.use_fp8 && o.round_scale),
      "use_ue8m0 = true requires use_fp8 = true and round_scale = true (got use_fp8 = %d, round_scale = %d)",
      int{o.use_fp8}, int{o.round_scale});
  const Routing r = check_routing(args.topk_idx, T, "topk_idx");
  const int EL = E / R;
  const int64_t slots = int64_t(R) * N;

  check_rows_3d(out.recv_x, o.use_fp8 ? DType::kFP8E4M3 : DType::kBF16, EL, slots, H, "recv_x");
  int scale_cols = 0;
  if (o.use_fp8) {
    scale_cols = static_cast<int>(o.use_ue8m0 ? (H + 511) / 512 : H / 128);
    const DType st = o.use_ue8m0 ? DType::kI32 : DType::kF32;
    const TensorView& sc = out.recv_scales;
    EL_CHECK(sc.defined() && sc.ndim == 3 && sc.dtype == st && sc.shape[0] == EL && sc.shape[1] == slots &&
                 sc.shape[2] == scale_cols,
             "recv_scales must be %s [%d, %lld, %d] (%s), got %s", dtype_name(st), EL, ll(slots), scale_cols,
             o.use_ue8m0 ? "packed UE8M0" : "one scale per 128 channels",
             sc.defined() ? sc.describe().c_str() : "nothing");
  } else {
    EL_CHECK(!out.recv_scales.defined(), "use_fp8 = false: recv_scales must not be given, got %s",
             out.recv_scales.describe().c_str());
  }
  EL_CHECK(out.recv_count.defined() && out.recv_count.dtype == DType::kI32 && out.recv_count.numel() == EL &&
               out.recv_count.is_contiguous(),
           "recv_count must be contiguous i32 [%d], got %s", EL,
           out.recv_count.defined() ? out.recv_count.describe().c_str() : "nothing");
  if (out.src_info.defined())
    EL_CHECK(out.src_info.ndim == 2 && out.src_info.dtype == DType::kI32 && out.src_info.shape[0] == EL &&
                 out.src_info.shape[1] == slots,
             "src_info must be i32 [%d, %lld], got %s", EL, ll(slots), out.src_info.describe().c_str());
  const TensorView& lr = out.layout_range;
  const bool packed = lr.defined() && lr.dtype == DType::kI64;
  if (lr.defined())
    EL_CHECK((packed && lr.ndim == 2 && lr.shape[0] == EL && lr.shape[1] == R) ||
                 (lr.dtype == DType::kI32 && lr.ndim == 3 && lr.shape[0] == EL && lr.shape[1] == R &&
                  lr.shape[2] == 2),
             "layout_range must be i64 [%d, %d] (DeepEP packing) or i32 [%d, %d, 2] (begin, count), got %s",
             EL, R, EL, R, lr.describe().c_str());

  begin_call(s, "ll_dispatch");
  const kernels::LlGeometry g =
      kernels::ll_geometry(R, N, static_cast<int>(H), r.topk, E, o.use_fp8, o.use_ue8m0,
                           static_cast<int64_t>(ll_offset()), static_cast<int64_t>(s.ll_bytes));
  if (s.internode_ll)
    check_area(s, internode::ll_layout_of(g, o.use_fp8, o.use_ue8m0).dispatch_bytes(), g,
               "ll_dispatch (across nodes)");
  else
    check_area(s, g.dispatch_bytes(), g, "ll_dispatch");
  LlState& st = s.ll;
  check_parity_free(st.dispatch_pending, st.dispatch_pending_call, st.dispatch_calls, "ll_dispatch");
  if (!handle.state_) handle.state_ = std::make_unique<LlHandleState>();
  LlHandleState& h = *handle.state_;
  EL_CHECK(!h.dispatch_pending && h.pending_combines == 0,
           "handle is in use by a split call whose receive hook has not been called (%s); use another handle",
           h.dispatch_pending ? "a dispatch" : "a combine");
  h.reserve(R, N, r.topk);
  h.owner = s_.get();
  h.num_ranks = R;
  h.capacity = N;
  h.hidden = static_cast<int>(H);
  h.topk = r.topk;
  h.num_experts = E;
  h.num_tokens = static_cast<int>(T);

  kernels::LlDispatchParams p{};
  if (s.window) p.win = s.window->view();  // across nodes: no window
  p.st = device_state(st);
  p.g = g;
  p.handle = h.view();
  p.parity = static_cast<int>(st.dispatch_calls & 1);
  p.num_tokens = static_cast<int>(T);
  p.fp8 = o.use_fp8;
  p.round_scale = o.round_scale;
  p.ue8m0 = o.use_ue8m0;
  p.x = args.x.data;
  p.x_row_stride = args.x.stride[0];
  p.topk_idx = r.data;
  p.idx_type = r.type;
  p.idx_row_stride = r.row_stride;
  p.idx_col_stride = r.col_stride;
  const int64_t xes = dtype_size(out.recv_x.dtype);
  p.out.recv_x = out.recv_x.data;
  p.out.recv_x_stride0 = out.recv_x.stride[0] * xes;
  p.out.recv_x_stride1 = out.recv_x.stride[1] * xes;
  if (o.use_fp8) {
    p.out.recv_scales = out.recv_scales.data;
    p.out.scales_stride0 = out.recv_scales.stride[0];
    p.out.scales_stride1 = out.recv_scales.stride[1];
    p.out.scales_stride2 = out.recv_scales.stride[2];
  }
  p.out.recv_count = out.recv_count.ptr<int32_t>();
  if (out.src_info.defined()) {
    p.out.src_info = out.src_info.ptr<int32_t>();
    p.out.src_info_stride0 = out.src_info.stride[0];
    p.out.src_info_stride1 = out.src_info.stride[1];
  }
  if (lr.defined()) {
    p.out.layout_range = lr.data;
    p.out.range_packed = packed;
    p.out.range_stride0 = lr.stride[0];
    p.out.range_stride1 = lr.stride[1];
    p.out.range_stride2 = packed ? 0 : lr.stride[2];
  }

  LlRecvHook hook;
  if (o.return_recv_hook) {
    p.phases = kernels::kLlSend;
    launch_dispatch(s, p, stream);
    auto hs = std::make_unique<LlHookState>();
    hs->owner = s_.get();
    hs->kind = LlHookState::Kind::kDispatch;
    hs->parity = p.parity;
    hs->call = st.dispatch_calls;
    hs->handle = &h;
    hs->dispatch = p;
    hs->dispatch.phases = kernels::kLlRecv;
    st.dispatch_pending[p.parity] = hs.get();
    st.dispatch_pending_call[p.parity] = st.dispatch_calls;
    h.dispatch_pending = true;
    h.received = false;
    hook.state_ = std::move(hs);
  } else {
    p.phases = kernels::kLlSend | kernels::kLlRecv;
    launch_dispatch(s, p, stream);
    h.received = true;
  }
  ++st.dispatch_calls;
  return hook;
}

LlRecvHook Buffer::ll_combine(const LlCombineArgs& args, const LlHandle& handle, const LlCombineOutputs& out,
                              cudaStream_t stream) {
  State& s = *s_;
  const int R = num_ranks();
  EL_CHECK(handle.valid() && handle.state_->owner == s_.get(),
           "handle was not filled by this buffer's ll_dispatch (a handle belongs to one Buffer)");
  LlHandleState& h = *handle.state_;
  EL_CHECK(h.received,
           "handle: its dispatch was split (return_recv_hook) and its receive hook has not been called yet");
  const int N = h.capacity, H = h.hidden, K = h.topk, E = h.num_experts, EL = E / R, T = h.num_tokens;
  const int64_t slots = int64_t(R) * N;
  checks::tensors(
      {{&args.x, "x"}, {&args.topk_idx, "topk_idx"}, {&args.topk_weights, "topk_weights"}, {&out.out, "out"}},
      s.comm.device(), stream);
  begin_call(s, "ll_combine");
  LlState& st = s.ll;
  const int parity = static_cast<int>(st.combine_calls & 1);
  TensorView x = args.x;
  if (args.zero_copy) {
    EL_CHECK(
        st.combine_buffer[parity] != nullptr,
        "zero_copy: call get_next_ll_combine_buffer before this combine and write the expert outputs there");
    if (!x.defined()) x = TensorView(st.combine_buffer[parity], DType::kBF16, {EL, slots, H});
    EL_CHECK(x.data == st.combine_buffer[parity],
             "zero_copy: x (%p) is not the buffer get_next_ll_combine_buffer returned for this call (%p)",
             x.data, st.combine_buffer[parity]);
  }
  check_rows_3d(x, DType::kBF16, EL, slots, H, "x");
  const Routing r = check_routing(args.topk_idx, T, "topk_idx");
  EL_CHECK(r.topk == K, "topk_idx has top-k = %d but the handle's dispatch had %d", r.topk, K);
  const TensorView& w = args.topk_weights;
  EL_CHECK(w.defined() && w.ndim == 2 && w.dtype == DType::kF32 && w.shape[0] == T && w.shape[1] == K,
           "topk_weights must be f32 [%d, %d], got %s", T, K, w.defined() ? w.describe().c_str() : "nothing");
  const TensorView& o = out.out;
  EL_CHECK(o.defined() && o.ndim == 2 && o.dtype == DType::kBF16 && o.shape[0] == T && o.shape[1] == H &&
               o.rows_are_dense_16b(),
           "out must be bf16 [%d, %d] with contiguous 16-byte aligned rows, got %s", T, H,
           o.defined() ? o.describe().c_str() : "nothing");

  const kernels::LlGeometry g = kernels::ll_geometry(
      R, N, H, K, E, false, false, static_cast<int64_t>(ll_offset()), static_cast<int64_t>(s.ll_bytes));
  if (s.internode_ll)
    check_area(s, internode::ll_layout_of(g, false, false).combine_bytes(), g, "ll_combine (across nodes)");
  else
    check_area(s, g.combine_bytes(), g, "ll_combine");
  check_parity_free(st.combine_pending, st.combine_pending_call, st.combine_calls, "ll_combine");

  kernels::LlCombineParams p{};
  if (s.window) p.win = s.window->view();  // across nodes: no window
  p.st = device_state(st);
  p.g = g;
  p.handle = h.view();
  p.parity = parity;
  p.num_tokens = T;
  p.x = x.data;
  p.x_stride0 = x.stride[0] * 2;
  p.x_stride1 = x.stride[1] * 2;
  p.topk_idx = r.data;
  p.idx_type = r.type;
  p.idx_row_stride = r.row_stride;
  p.idx_col_stride = r.col_stride;
  p.topk_weights = w.ptr<float>();
  p.w_row_stride = w.stride[0];
  p.w_col_stride = w.stride[1];
  p.out = o.data;
  p.out_row_stride = o.stride[0];

  LlRecvHook hook;
  if (args.return_recv_hook) {
    p.phases = kernels::kLlSend;
    launch_combine(s, p, stream);
    auto hs = std::make_unique<LlHookState>();
    hs->owner = s_.get();
    hs->kind = LlHookState::Kind::kCombine;
    hs->parity = parity;
    hs->call = st.combine_calls;
    hs->handle = &h;
    hs->combine = p;
    hs->combine.phases = kernels::kLlRecv;
    st.combine_pending[parity] = hs.get();
    st.combine_pending_call[parity] = st.combine_calls;
    ++h.pending_combines;
    hook.state_ = std::move(hs);
  } else {
    p.phases = kernels::kLlSend | kernels::kLlRecv;
    launch_combine(s, p, stream);
  }
  ++st.combine_calls;
  return hook;
}

TensorView Buffer::get_next_ll_combine_buffer(const LlHandle& handle) {
  EL_CHECK(handle.valid() && handle.state_->owner == s_.get(),
           "handle was not filled by this buffer's ll_dispatch (a handle belongs to one Buffer)");
  const LlHandleState& h = *handle.state_;
  LlState& st = s_->ll;
  const int parity = static_cast<int>(st.combine_calls & 1);
  const int64_t EL = h.num_experts / h.num_ranks, slots = int64_t(h.num_ranks) * h.capacity;
  const size_t bytes = static_cast<size_t>(EL * slots * h.hidden * 2);
  if (st.combine_buffer_bytes[parity] < bytes) {
    cudaFree(st.combine_buffer[parity]);
    st.combine_buffer[parity] = nullptr;
    st.combine_buffer_bytes[parity] = 0;
    EL_CUDA_CHECK(cudaMalloc(&st.combine_buffer[parity], bytes));
    st.combine_buffer_bytes[parity] = bytes;
  }
  return TensorView(st.combine_buffer[parity], DType::kBF16, {EL, slots, int64_t(h.hidden)});
}

void Buffer::ll_clean(cudaStream_t /*stream*/) {
  if (s_->window) s_->window->raise_if_device_error();
  const LlState& st = s_->ll;
  for (int p = 0; p < 2; ++p) {
    EL_CHECK(st.dispatch_pending[p] == nullptr,
             "ll_clean: ll_dispatch #%lld still waits for its receive hook", ll(st.dispatch_pending_call[p]));
    EL_CHECK(st.combine_pending[p] == nullptr, "ll_clean: ll_combine #%lld still waits for its receive hook",
             ll(st.combine_pending_call[p]));
  }
}

void ll_receive(LlHookState& hook, cudaStream_t stream) {
  Buffer::State& s = *hook.owner;
  LlState& st = s.ll;
  if (s.window) s.window->raise_if_device_error();
  if (hook.kind == LlHookState::Kind::kDispatch) {
    launch_dispatch(s, hook.dispatch, stream);
    if (st.dispatch_pending[hook.parity] == &hook) st.dispatch_pending[hook.parity] = nullptr;
    hook.handle->dispatch_pending = false;
    hook.handle->received = true;
  } else {
    launch_combine(s, hook.combine, stream);
    if (st.combine_pending[hook.parity] == &hook) st.combine_pending[hook.parity] = nullptr;
    --hook.handle->pending_combines;
  }
}

}  // namespace expertlink
