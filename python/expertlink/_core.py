"""What expertlink.Buffer (simple, grows) and expertlink.deep_ep.Buffer (DeepEP V1, fixed size) share: the
communicator, the window generations, the communication stream, the handles, and the HT / LL calls with
DeepEP's stream arguments. Written for torch, over the torch-free binding expertlink._C.

Streams (StreamPlan in _torch.py): an HT call runs on the Buffer's communication stream, which waits for
``previous_event`` (else the current stream); ``async_finish`` returns an event recorded there and leaves
the current stream free, otherwise the current stream waits. Without any of these arguments that is the same
order as running on the current stream, which is what happens. LL calls run on the current stream, on the
communication stream with ``async_finish``; ``return_recv_hook`` runs both halves on the stream current at
each call (DeepEP's rules; async_finish and return_recv_hook together are refused, as there).

Generations: a Buffer owns one C++ window at a time (generation g). The simple Buffer may replace it by a
larger one (a grow, collective); the old window is retired, not freed, so a handle made on it still combines
(or dispatches in cached mode) on the window it was made on. ``release_retired()`` (collective: every rank,
same point) frees retired windows; handles made on them then raise. Frees happen only there and in
``destroy()``, so every rank frees the same windows at the same point (NCCL window deregistration is
collective).

Direct dispatch (opt-in, ``direct_recv=True``): the window gets a third region, the receive region, and a
dispatch's recv_x is a tensor viewing its first rows instead of a fresh allocation: the senders write every row
straight into it (no copy-out of the rows on the receiving side). ``get_direct_combine_buffer(handle)`` is the
BF16 view of the same region that a direct combine reads (the expert outputs written there are read by their
sources, nothing is sent). The price is the lifetime: those rows are overwritten by the next dispatch on the
Buffer, so recv_x (and anything that still views it, such as autograd's saved tensors) is only valid until then.
The C++ side tells direct from plain calls by where recv_x / x start (Buffer::ht_window_recv_x).
"""

import itertools

from . import _C
from ._torch import (
    EventOverlap,
    StreamPlan,
    check_stream_args,
    current_stream_handle,
    dtype_name,
    invalid_argument,
    make_communicator,
    require_torch,
    split_x,
    tensor_from_view,
    unsupported,
    view,
)


def _give_back(handle, kind):
    """A dead handle's C++ state goes back to its Buffer's pool (see BufferCore._take_handle)."""
    owner = getattr(handle, "_owner", None)
    if owner is not None:
        try:
            owner._give_back_handle(kind, handle.generation, handle._h)
        except Exception:  # noqa: BLE001 - never raise from a finalizer (interpreter shutdown, destroyed Buffer)
            pass


class HtHandle:
    """What an HT dispatch leaves for its combine, its cached dispatch and autograd's backward: opaque.

    ``num_recv_tokens()``: rows received (-1 until the stream has passed the notify in num_worst_tokens
    mode), ``num_recv_tokens_per_expert()``: host list per local expert, ``check_capacity()``: raises if a
    num_worst_tokens dispatch received more rows than it held (call after the stream passed the dispatch).
    DeepEP's handle is a tuple of tensors; this one is not (code that only passes it back works as is).
    ``direct``: the fresh dispatch that made it wrote into the receive region (direct_recv)."""

    def __init__(self, handle, owner, generation, num_tokens, hidden, topk, num_experts, capacity_mode,
                 direct=False):
        self._h = handle
        self._owner = owner
        self.generation = generation
        self.num_tokens = num_tokens
        self.hidden = hidden
        self.topk = topk
        self.num_experts = num_experts
        self.capacity_mode = capacity_mode
        self.direct = direct

    def __del__(self):
        _give_back(self, "ht")

    def num_recv_tokens(self):
        return self._h.num_recv_tokens()

    def num_recv_tokens_per_expert(self):
        return self._h.num_recv_tokens_per_expert()

    def capacity(self):
        return self._h.capacity()

    def check_capacity(self):
        self._h.check_capacity()


class LlHandle:
    """What an LL dispatch leaves for its combine. Unpacks like DeepEP's tuple:
    ``src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts = handle``."""

    def __init__(self, handle, owner, generation, src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
                 num_experts):
        self._h = handle
        self._owner = owner
        self.generation = generation
        self.src_info = src_info
        self.layout_range = layout_range
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.hidden = hidden
        self.num_experts = num_experts

    def __del__(self):
        _give_back(self, "ll")

    def _fields(self):
        return (self.src_info, self.layout_range, self.num_max_dispatch_tokens_per_rank, self.hidden,
                self.num_experts)

    def __len__(self):
        return 5

    def __iter__(self):
        return iter(self._fields())

    def __getitem__(self, index):
        return self._fields()[index]

    def num_tokens(self):
        return self._h.num_tokens()


class RecvHook:
    """Receive half of a split LL call (``return_recv_hook=True``): ``hook()`` launches it on the current
    stream. A no-op when the call was not split, and when called again. Keeps the call's tensors alive
    until called; `after` runs after the launch (e.g. the receive-statistics add)."""

    def __init__(self, hook=None, keep=(), after=None):
        self._hook = hook
        self._keep = keep
        self._after = after

    def __call__(self):
        if self._hook is not None and self._hook.valid:
            self._hook(current_stream_handle())
            if self._after is not None:
                self._after()
        self._hook, self._keep, self._after = None, (), None


def check_ll_dispatch_args(num_ranks, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale,
                           use_ue8m0, async_finish, return_recv_hook, use_per_tensor_quantization, static_scale):
    """DeepEP's low_latency_dispatch rules that need no tensor (CPU-testable)."""
    if num_experts <= 0 or num_experts % num_ranks != 0:
        raise invalid_argument(f"num_experts = {num_experts} is not a positive multiple of the {num_ranks} ranks")
    if num_max_dispatch_tokens_per_rank <= 0:
        raise invalid_argument(f"num_max_dispatch_tokens_per_rank = {num_max_dispatch_tokens_per_rank} must be > 0")
    if use_ue8m0 and not (use_fp8 and round_scale):
        raise invalid_argument("use_ue8m0=True needs use_fp8=True and round_scale=True (as DeepEP)")
    if async_finish and return_recv_hook:
        raise invalid_argument("async_finish and return_recv_hook cannot both be set (as DeepEP: with the hook "
                               "the receive half runs on the stream current when hook() is called)")
    if use_per_tensor_quantization or static_scale is not None:
        raise unsupported("use_per_tensor_quantization / static_scale: ExpertLink casts with one scale per 128 "
                          "channels (use_fp8) or sends BF16")


def check_ht_dispatch_args(x, handle, topk_idx, topk_weights, is_token_in_rank, num_experts):
    """Which mode an HT dispatch is (cached or fresh), and DeepEP's rules for it (CPU-testable)."""
    if isinstance(x, (tuple, list)) and len(x) != 2:
        raise invalid_argument("x must be a BF16 tensor or an (FP8 tensor, scales) pair")
    if handle is not None:
        if not isinstance(handle, HtHandle):
            raise invalid_argument(f"handle must come from an HT dispatch of an expertlink Buffer, got "
                                   f"{type(handle).__name__}")
        if topk_idx is not None or topk_weights is not None:
            raise invalid_argument("a cached dispatch (handle given) takes no topk_idx / topk_weights: the routing "
                                   "is the handle's")
        return True
    if topk_idx is None and is_token_in_rank is None:
        raise invalid_argument("dispatch needs topk_idx (or is_token_in_rank), or a handle (cached mode)")
    if topk_idx is not None and num_experts is None:
        raise invalid_argument("dispatch with topk_idx needs num_experts")
    if topk_weights is not None and topk_idx is None:
        raise invalid_argument("topk_weights needs topk_idx")
    return False


def check_direct_recv_args(direct_recv, num_recv_bytes, grow):
    """The receive region's constructor arguments (CPU-testable): num_recv_bytes sizes it and needs
    direct_recv; a Buffer that does not grow needs it sized."""
    if int(num_recv_bytes) < 0:
        raise invalid_argument(f"num_recv_bytes = {num_recv_bytes} must be >= 0")
    if int(num_recv_bytes) > 0 and not direct_recv:
        raise invalid_argument(f"num_recv_bytes = {num_recv_bytes} sizes the receive region of direct dispatch: "
                               f"pass direct_recv=True too")
    if direct_recv and not grow and int(num_recv_bytes) <= 0:
        raise invalid_argument("direct_recv=True on a Buffer that does not grow needs num_recv_bytes > 0 (see "
                               "expertlink.Buffer.ht_recv_size_hint(num_ranks, max_tokens_per_rank, hidden))")


class BufferCore:
    """The shared implementation (see the module docstring). Not used directly."""

    num_sms = 0  # SMs of the HT kernels; 0 = ExpertLink's analytic default

    def __init__(self, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, explicitly_destroy, timeout_s,
                 adopt, direct_recv=False, num_recv_bytes=0):
        torch = require_torch()
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self._timeout_s = timeout_s
        self._comm = make_communicator(group, adopt)
        self._comm_stream = torch.cuda.Stream()
        self._gens = {}
        self._pools = {}
        self._next_gen = itertools.count()
        self._gen = None
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.direct_recv = bool(direct_recv)
        self.num_recv_bytes = int(num_recv_bytes)  # the receive region of direct dispatch (0: none)
        if self.num_nvl_bytes + self.num_rdma_bytes > 0:
            self._build(self.num_nvl_bytes, self.num_rdma_bytes)

    # ---- windows ----
    def _build(self, ht_bytes, ll_bytes, recv_bytes=None):
        """Collective: a new window of these sizes becomes current; the old one is retired (kept). recv_bytes:
        the receive region (default: as now)."""
        recv_bytes = self.num_recv_bytes if recv_bytes is None else int(recv_bytes)
        buf = _C.Buffer(self._comm, int(ht_bytes), int(ll_bytes), self._timeout_s, recv_bytes)
        gen = next(self._next_gen)
        self._gens[gen] = buf
        self._gen = gen
        self._pools.clear()
        self.num_nvl_bytes, self.num_rdma_bytes, self.num_recv_bytes = buf.ht_bytes, buf.ll_bytes, recv_bytes
        return buf

    def _current(self):
        if self._comm is None:
            raise invalid_argument("the Buffer was destroyed")
        if self._gen is None:
            raise invalid_argument("the Buffer has no window (num_nvl_bytes + num_rdma_bytes = 0): size it with "
                                   "Buffer.ht_size_hint / Buffer.ll_size_hint")
        return self._gens[self._gen]

    def _buffer_of(self, handle):
        if getattr(handle, "_owner", None) is not self:
            raise invalid_argument("the handle was made by another Buffer (a handle belongs to the Buffer whose "
                                   "dispatch made it)")
        buf = self._gens.get(handle.generation)
        if buf is None:
            raise invalid_argument(f"the handle was made on window generation {handle.generation}, freed since by "
                                   f"release_retired() or destroy()")
        return buf

    # The C++ handles own small device arrays, allocated on first use and reused when large enough. A handle
    # whose Python object died goes back to a pool and the next dispatch takes it, so calls made after a
    # warm-up allocate nothing: that is what lets them be captured in a CUDA graph (cudaMalloc cannot be).
    _POOL_LIMIT = 8

    def _take_handle(self, kind):
        pool = self._pools.get((kind, self._gen))
        if pool:
            return pool.pop()
        return _C.HtHandle() if kind == "ht" else _C.LlHandle()

    def _give_back_handle(self, kind, generation, handle):
        if generation == self._gen and self._comm is not None:
            pool = self._pools.setdefault((kind, generation), [])
            if len(pool) < self._POOL_LIMIT:
                pool.append(handle)

    @property
    def num_retired(self):
        """Windows kept after a grow for the handles made on them (freed by release_retired())."""
        return max(0, len(self._gens) - (0 if self._gen is None else 1))

    def release_retired(self):
        """Collective (every rank, same point): frees the windows a grow retired. Handles made on them raise
        afterwards. Synchronizes the device first (work may still use them)."""
        require_torch().cuda.synchronize()
        for gen in [g for g in self._gens if g != self._gen]:
            del self._gens[gen]

    def destroy(self):
        """Collective: frees every window (after synchronizing the device). The Buffer is unusable afterwards."""
        require_torch().cuda.synchronize()
        self._pools.clear()
        self._gens.clear()
        self._gen = None
        self._comm = None

    def get_comm_stream(self):
        """The communication stream (a torch.cuda.Stream) HT calls run on with previous_event / async_finish /
        allocate_on_comm_stream, and LL calls with async_finish."""
        return self._comm_stream

    def synchronize(self):
        """Bounded host wait on the current stream; device-side failures (timeouts) raise expertlink.Error."""
        self._current().synchronize(current_stream_handle())

    def barrier(self):
        """Stream-ordered barrier across the ranks, on the current stream."""
        self._current().barrier(current_stream_handle())

    @staticmethod
    def capture():
        """An EventOverlap recorded on the current stream now (pass it as previous_event)."""
        return EventOverlap.record()

    # ---- hooks the two front ends fill in ----
    def _prepare_ht(self, tokens, hidden, topk, num_worst_tokens=0, direct=False):
        """Before a fresh HT dispatch (collective point): make sure the current window holds it (and, direct,
        its receive region every row and num_worst_tokens rows), or fail."""

    def _prepare_ll(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """Before an LL dispatch: make sure the current window holds it, or fail (the C++ check does)."""

    # ---- high throughput ----
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        """-> (num_tokens_per_rank [R] i32, None, num_tokens_per_expert [E] i32, is_token_in_rank [T, R] bool,
        event). The None stands for DeepEP's num_tokens_per_rdma_rank (intranode only)."""
        torch = require_torch()
        buf = self._current()
        plan = StreamPlan(self._comm_stream, previous_event, async_finish, allocate_on_comm_stream)
        T, R = topk_idx.shape[0], self.group_size
        with plan.allocating():
            per_rank = torch.empty((R,), dtype=torch.int32, device=topk_idx.device)
            per_expert = torch.empty((num_experts,), dtype=torch.int32, device=topk_idx.device)
            in_rank = torch.empty((T, R), dtype=torch.bool, device=topk_idx.device)
        buf.get_dispatch_layout(view(topk_idx, "topk_idx"), int(num_experts), view(per_rank), view(per_expert),
                                view(in_rank), plan.handle)
        return per_rank, None, per_expert, in_rank, plan.finish([topk_idx, per_rank, per_expert, in_rank])

    def _direct_mode(self, direct, handle=None):
        """Whether a dispatch writes into the receive region: `direct` if given (True needs direct_recv), else
        the Buffer's direct_recv, and for a cached dispatch what the handle's own dispatch did."""
        if direct is None:
            return self.direct_recv and (handle is None or handle.direct)
        if direct and not self.direct_recv:
            raise invalid_argument("direct=True needs a Buffer made with direct_recv=True (this one has no receive "
                                   "region)")
        return bool(direct)

    def _region_tensor(self, buf, dtype_label, hidden, rows):
        """The first `rows` rows of the receive region of `buf`'s window as a [rows, hidden] tensor."""
        region = buf.ht_window_recv_x(dtype_label, int(hidden))
        if rows > region.shape[0]:
            raise invalid_argument(
                f"{rows} rows of {hidden} {dtype_label} channels do not fit the receive region, which holds "
                f"{region.shape[0]} ({self.num_recv_bytes} bytes now; size it with Buffer.ht_recv_size_hint)")
        return tensor_from_view(region, buf)[:rows]

    def _ht_dispatch(self, x, topk_idx=None, topk_weights=None, num_experts=None, handle=None,
                     is_token_in_rank=None, expert_alignment=1, num_worst_tokens=0, num_sms=None,
                     previous_event=None, async_finish=False, allocate_on_comm_stream=False, direct=None):
        """Notify (unless `handle` is given: cached mode) + dispatch. Returns (recv_x, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert_list, handle, event). direct: see _direct_mode; recv_x is
        then a view of the receive region (valid until the next dispatch on this Buffer)."""
        cached = check_ht_dispatch_args(x, handle, topk_idx, topk_weights, is_token_in_rank, num_experts)
        check_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        if num_worst_tokens < 0:
            raise invalid_argument(f"num_worst_tokens = {num_worst_tokens} must be >= 0")
        direct = self._direct_mode(direct, handle if cached else None)
        torch = require_torch()
        x, x_scales = split_x(x)
        args = _C.HtDispatchArgs()
        args.x = view(x, "x")
        if x_scales is not None:
            args.x_scales = view(x_scales, "x_scales")
        args.num_sms = type(self).num_sms if num_sms is None else int(num_sms)
        if cached:
            buf, h = self._buffer_of(handle), handle._h
            plan = StreamPlan(self._comm_stream, previous_event, async_finish, allocate_on_comm_stream)
        else:
            topk = topk_idx.shape[1] if topk_idx is not None else 0
            # may grow (collective) or raise
            self._prepare_ht(x.shape[0], x.shape[1], topk, num_worst_tokens if direct else 0, direct)
            buf = self._current()
            args.topk_idx = view(topk_idx, "topk_idx")
            args.topk_weights = view(topk_weights, "topk_weights")
            if topk_idx is None:
                args.is_token_in_rank = view(is_token_in_rank, "is_token_in_rank")
            args.num_experts = int(num_experts or 0)
            args.expert_alignment = int(expert_alignment)
            plan = StreamPlan(self._comm_stream, previous_event, async_finish, allocate_on_comm_stream)
            h = self._take_handle("ht")
            if num_worst_tokens > 0:
                buf.ht_notify(args, h, _C.Sizing.capacity, int(num_worst_tokens), plan.handle)
            else:  # host wait on plan.stream: the exact received row count sizes the outputs
                buf.ht_notify(args, h, _C.Sizing.exact, 0, plan.handle)
            handle = HtHandle(h, self, self._gen, x.shape[0], x.shape[1], topk, args.num_experts,
                              num_worst_tokens > 0, direct)
        rows = h.capacity() if handle.capacity_mode else h.num_recv_tokens()
        dev = x.device
        recv_scales = recv_idx = recv_w = None
        out = _C.HtDispatchOutputs()
        # Direct: the rows land in the receive region (not the caching allocator's: nothing to record_stream).
        recv_x = self._region_tensor(buf, dtype_name(x.dtype), x.shape[1], rows) if direct else None
        with plan.allocating():
            if not direct:
                recv_x = torch.empty((rows, x.shape[1]), dtype=x.dtype, device=dev)
            if x_scales is not None:
                recv_scales = torch.empty((rows, x_scales.shape[1]), dtype=x_scales.dtype, device=dev)
            if not cached and topk_idx is not None:
                recv_idx = torch.empty((rows, topk_idx.shape[1]), dtype=topk_idx.dtype, device=dev)
                if topk_weights is not None:
                    recv_w = torch.empty((rows, topk_idx.shape[1]), dtype=torch.float32, device=dev)
        out.recv_x = view(recv_x)
        if recv_scales is not None:
            out.recv_x_scales = view(recv_scales)
        if recv_idx is not None:
            out.recv_topk_idx = view(recv_idx)
        if recv_w is not None:
            out.recv_topk_weights = view(recv_w)
        buf.ht_dispatch(args, h, out, plan.handle)
        per_expert = None if cached else ([] if (handle.capacity_mode or topk_idx is None)
                                          else h.num_recv_tokens_per_expert())
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        event = plan.finish([x, x_scales, topk_idx, topk_weights, is_token_in_rank, None if direct else recv_x,
                             recv_scales, recv_idx, recv_w])
        return recv, recv_idx, recv_w, per_expert, handle, event

    def _ht_combine(self, x, handle, topk_weights=None, bias=None, num_sms=None, previous_event=None,
                    async_finish=False, allocate_on_comm_stream=False):
        """-> (combined_x [T, H] BF16, combined_topk_weights [T, K] f32 or None, event)."""
        if not isinstance(handle, HtHandle):
            raise invalid_argument(f"handle must come from an HT dispatch of an expertlink Buffer, got "
                                   f"{type(handle).__name__}")
        biases = tuple(bias) if isinstance(bias, (tuple, list)) else (bias, None)
        if len(biases) != 2:
            raise invalid_argument("bias must be a tensor or a pair of tensors")
        check_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        buf = self._buffer_of(handle)
        torch = require_torch()
        plan = StreamPlan(self._comm_stream, previous_event, async_finish, allocate_on_comm_stream)
        args = _C.HtCombineArgs()
        args.x = view(x, "x")
        args.topk_weights = view(topk_weights, "topk_weights")
        args.bias0 = view(biases[0], "bias")
        args.bias1 = view(biases[1], "bias")
        args.num_sms = type(self).num_sms if num_sms is None else int(num_sms)
        combined_w = None
        with plan.allocating():
            combined_x = torch.empty((handle.num_tokens, x.shape[1]), dtype=torch.bfloat16, device=x.device)
            if topk_weights is not None:
                combined_w = torch.empty((handle.num_tokens, topk_weights.shape[1]), dtype=torch.float32,
                                         device=x.device)
        out = _C.HtCombineOutputs()
        out.combined_x = view(combined_x)
        if combined_w is not None:
            out.combined_topk_weights = view(combined_w)
        buf.ht_combine(args, handle._h, out, plan.handle)
        event = plan.finish([x, topk_weights, biases[0], biases[1], combined_x, combined_w])
        return combined_x, combined_w, event

    def get_direct_combine_buffer(self, handle):
        """BF16 [N_recv, H] tensor over the receive region (N_recv: the handle's received rows, or its capacity
        with num_worst_tokens): write the expert outputs here and pass it to combine(), which is then direct
        (each source reads its rows from the ranks holding them, and topk_weights from their windows).

        It ALIASES the dispatch's recv_x (BF16: the same memory; FP8: the same bytes, differently laid out):
        consume recv_x before writing here. Like recv_x it is only valid until the next dispatch on this Buffer,
        and after the combine the peers may still read it until then: do not write it again before that
        dispatch. Needs direct_recv=True."""
        if not isinstance(handle, HtHandle):
            raise invalid_argument(f"handle must come from an HT dispatch of an expertlink Buffer, got "
                                   f"{type(handle).__name__}")
        if not self.direct_recv:
            raise invalid_argument("get_direct_combine_buffer needs a Buffer made with direct_recv=True (it has no "
                                   "receive region)")
        buf = self._buffer_of(handle)
        rows = handle.capacity() if handle.capacity_mode else handle.num_recv_tokens()
        return self._region_tensor(buf, "bf16", handle.hidden, rows)

    # ---- low latency ----
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False, use_per_tensor_quantization=False, static_scale=None):
        """x BF16 [T, H] (T <= N), topk_idx [T, K] (-1 = none). -> (recv_x, recv_count, handle, event, hook).

        recv_x: with use_fp8 a pair (FP8 [E_local, R*N, H], scales f32 [E_local, R*N, H/128] or, with
        use_ue8m0, packed i32 [E_local, R*N, ceil(H/512)]; scales column-major in their last two dims as
        DeepEP), else BF16 [E_local, R*N, H]. Only the first recv_count[j] rows of expert j are valid.
        recv_count: i32 [E_local]. handle: for low_latency_combine (unpacks like DeepEP's 5-tuple).
        event: recorded on the communication stream with async_finish (the current stream does not wait; the
        event holds the call's tensors), else empty. hook(): with return_recv_hook only the send half runs
        now and hook() launches the receive half on the stream current then; else a no-op.
        cumulative_local_expert_recv_stats (i32 [E_local]) gets recv_count added (after the receive half).
        dispatch_wait_recv_cost_stats is accepted and left unchanged (no per-token wait timing here)."""
        R, N = self.group_size, int(num_max_dispatch_tokens_per_rank)
        check_ll_dispatch_args(R, N, num_experts, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook,
                               use_per_tensor_quantization, static_scale)
        torch = require_torch()
        H = x.shape[1]
        self._prepare_ll(N, H, num_experts)  # may grow or raise
        buf = self._current()
        plan = StreamPlan(self._comm_stream, None, async_finish and not return_recv_hook)
        E_local, dev, slots = num_experts // R, x.device, R * N
        out = _C.LlDispatchOutputs()
        recv_scales = None
        with plan.allocating():
            if use_fp8:
                recv_x = torch.empty((E_local, slots, H), dtype=torch.float8_e4m3fn, device=dev)
                if use_ue8m0:
                    cols = (H + 511) // 512
                    recv_scales = torch.empty((E_local, cols, slots), dtype=torch.int32, device=dev).transpose(1, 2)
                else:
                    recv_scales = torch.empty((E_local, H // 128, slots), dtype=torch.float32,
                                              device=dev).transpose(1, 2)
            else:
                recv_x = torch.empty((E_local, slots, H), dtype=torch.bfloat16, device=dev)
            recv_count = torch.empty((E_local,), dtype=torch.int32, device=dev)
            src_info = torch.empty((E_local, slots), dtype=torch.int32, device=dev)
            layout_range = torch.empty((E_local, R), dtype=torch.int64, device=dev)
        out.recv_x = view(recv_x)
        if recv_scales is not None:
            out.recv_scales = view(recv_scales)
        out.recv_count, out.src_info, out.layout_range = view(recv_count), view(src_info), view(layout_range)
        args = _C.LlDispatchArgs()
        args.x = view(x, "x")
        args.topk_idx = view(topk_idx, "topk_idx")
        args.num_max_dispatch_tokens_per_rank = N
        args.num_experts = int(num_experts)
        opts = _C.LlDispatchOptions()
        opts.use_fp8, opts.round_scale, opts.use_ue8m0 = bool(use_fp8), bool(round_scale), bool(use_ue8m0)
        opts.return_recv_hook = bool(return_recv_hook)
        args.options = opts
        h = self._take_handle("ll")
        c_hook = buf.ll_dispatch(args, h, out, plan.handle)
        stats = cumulative_local_expert_recv_stats

        def add_stats():
            stats.add_(recv_count)

        if stats is not None and not return_recv_hook:
            with plan.launching():
                add_stats()
        handle = LlHandle(h, self, self._gen, src_info, layout_range, N, H, int(num_experts))
        keep = (x, topk_idx, recv_x, recv_scales, recv_count, src_info, layout_range, stats)
        # The hook keeps the handle too: its receive half still writes the handle's arrays.
        hook = RecvHook(c_hook if return_recv_hook else None, keep + (handle,),
                        add_stats if (stats is not None and return_recv_hook) else None)
        recv = (recv_x, recv_scales) if use_fp8 else recv_x
        return recv, recv_count, handle, plan.finish(keep, keep_in_event=True), hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None):
        """x BF16 [E_local, R*N, H]: expert outputs in the dispatch's slots; topk_idx / topk_weights [T, K] as
        dispatched (a slot set to -1 here is left out). -> (combined_x BF16 [T, H], event, hook), as DeepEP:
        out[t] = sum_k topk_weights[t, k] * x[expert of k][slot of t]. zero_copy: x was written into
        get_next_low_latency_combine_buffer(handle). out: write into this BF16 [T, H] tensor. use_logfmt is
        accepted and ignored (BF16 travels); combine_wait_recv_cost_stats is accepted and left unchanged."""
        if not isinstance(handle, LlHandle):
            raise invalid_argument(f"handle must come from low_latency_dispatch, got {type(handle).__name__}")
        if async_finish and return_recv_hook:
            raise invalid_argument("async_finish and return_recv_hook cannot both be set (as DeepEP)")
        torch = require_torch()
        buf = self._buffer_of(handle)
        plan = StreamPlan(self._comm_stream, None, async_finish and not return_recv_hook)
        T = topk_idx.shape[0]
        if out is None:
            with plan.allocating():
                out = torch.empty((T, handle.hidden), dtype=torch.bfloat16, device=topk_idx.device)
        args = _C.LlCombineArgs()
        args.x = view(x, "x")
        args.topk_idx = view(topk_idx, "topk_idx")
        args.topk_weights = view(topk_weights, "topk_weights")
        args.zero_copy, args.return_recv_hook = bool(zero_copy), bool(return_recv_hook)
        outs = _C.LlCombineOutputs()
        outs.out = view(out, "out")
        c_hook = buf.ll_combine(args, handle._h, outs, plan.handle)
        keep = (x, topk_idx, topk_weights, handle.src_info, handle.layout_range, out)
        hook = RecvHook(c_hook if return_recv_hook else None, keep + (handle,))
        return out, plan.finish(keep, keep_in_event=True), hook

    def get_next_low_latency_combine_buffer(self, handle):
        """BF16 [E_local, R*N, H] tensor that the next low_latency_combine(..., zero_copy=True) on this handle's
        window reads: write the expert outputs there and skip a copy. Valid while the Buffer lives."""
        if not isinstance(handle, LlHandle):
            raise invalid_argument(f"handle must come from low_latency_dispatch, got {type(handle).__name__}")
        buf = self._buffer_of(handle)
        return tensor_from_view(buf.get_next_ll_combine_buffer(handle._h), buf)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank=0, hidden=0, num_experts=0):
        """Nothing needs cleaning (LL signals are use counts that only grow); checks that no split call still
        waits for its hook. The arguments (DeepEP's) are accepted and not needed."""
        self._current().ll_clean(current_stream_handle())
