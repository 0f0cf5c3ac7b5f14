"""expertlink.Buffer: the simple PyTorch front end (issue 8), over the torch-free binding expertlink._C.

UNTESTED ON GPU as of 2026-11-28: written and CPU-checked without GPU access; tests/python/test_gpu.py
(2 ranks, torch.multiprocessing) is the check to run on a 2-GPU machine.

All work runs on the caller's current CUDA stream (there is no separate communication stream): a call is
ordered after what the stream already holds, and the returned event, when asked for with
``async_finish=True``, is recorded on that stream after the call. Every rank must make the same calls in
the same order (collective), as with DeepEP.

Byte sizes: ``num_nvl_bytes`` is the high-throughput (HT) region, ``num_rdma_bytes`` the low-latency (LL)
region. A call whose workload does not fit fails before launching with an ``expertlink.Error``
(code invalid_argument) giving the bytes needed; size with ``Buffer.ht_size_hint`` /
``Buffer.ll_size_hint``. The buffer does not grow itself.
"""

from . import _C
from ._torch import (
    EventOverlap,
    current_stream_handle,
    finish_event,
    invalid_argument,
    make_communicator,
    require_torch,
    split_x,
    tensor_from_view,
    view,
    wait_previous,
)


class HtHandle:
    """What an HT dispatch leaves for its combine (and for a cached dispatch): opaque.

    ``num_recv_tokens()`` (-1 until known in capacity mode), ``num_recv_tokens_per_expert()`` (host list)."""

    def __init__(self, handle, num_tokens, hidden, topk, num_experts, capacity_mode):
        self._h = handle
        self.num_tokens = num_tokens
        self.hidden = hidden
        self.topk = topk
        self.num_experts = num_experts
        self.capacity_mode = capacity_mode

    def num_recv_tokens(self):
        return self._h.num_recv_tokens()

    def num_recv_tokens_per_expert(self):
        return self._h.num_recv_tokens_per_expert()


class LlHandle:
    """What an LL dispatch leaves for its combine: opaque, plus DeepEP's handle fields (src_info,
    layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)."""

    def __init__(self, handle, src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        self._h = handle
        self.src_info = src_info
        self.layout_range = layout_range
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.hidden = hidden
        self.num_experts = num_experts

    def num_tokens(self):
        return self._h.num_tokens()


class RecvHook:
    """Callable receive half of a split LL call (``return_recv_hook=True``): ``hook()`` launches it on the
    current stream. A no-op when the call was not split. Keeps the call's tensors alive until called."""

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


class Buffer:
    """Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=False, ...): collective over `group`.

    group: a torch.distributed NCCL ProcessGroup; its communicator is adopted (an ncclCommSplit of it,
    ``adopt="split"``; or ``"borrow"``, or ``"unique_id"`` for a fresh one). The current CUDA device must be
    this rank's. num_nvl_bytes -> HT bytes, num_rdma_bytes -> LL bytes (their sum must be > 0).
    low_latency_mode and DeepEP's transport arguments (num_qps_per_rank, allow_nvlink_for_low_latency_mode,
    allow_mnnvl, use_fabric, enable_shrink, comm) are accepted and ignored: both paths always exist (intranode
    NVLink through NCCL symmetric memory). explicitly_destroy: when True, call destroy() on every rank.
    timeout_s: bound of every wait (default $EXPERTLINK_TIMEOUT_S or 5 s)."""

    num_sms = 0  # SMs of HT kernels; 0 = ExpertLink's analytic default (set_num_sms changes it)

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
                 explicitly_destroy=False, enable_shrink=False, comm=None, timeout_s=None, adopt="split"):
        require_torch()
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        if self.num_nvl_bytes + self.num_rdma_bytes <= 0:
            raise invalid_argument("num_nvl_bytes + num_rdma_bytes = 0: the buffer would hold nothing "
                                   "(see Buffer.ht_size_hint / Buffer.ll_size_hint)")
        self._comm = make_communicator(group, adopt)
        self._buffer = _C.Buffer(self._comm, self.num_nvl_bytes, self.num_rdma_bytes, timeout_s)

    # ---- sizes ----
    @staticmethod
    def ht_size_hint(num_ranks, max_tokens_per_rank, hidden, topk):
        """HT bytes (num_nvl_bytes) for up to max_tokens_per_rank tokens of `hidden` channels, BF16 or FP8."""
        return _C.Buffer.ht_size_hint(num_ranks, max_tokens_per_rank, hidden, topk)

    @staticmethod
    def ll_size_hint(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """LL bytes (num_rdma_bytes) for up to N tokens per rank, any top-k <= 16, BF16 or FP8."""
        return _C.Buffer.ll_size_hint(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def destroy(self):
        """Frees the window (collective: every rank, same order). The Buffer is unusable afterwards."""
        self._buffer = None
        self._comm = None

    def _buf(self):
        if self._buffer is None:
            raise invalid_argument("the Buffer was destroyed")
        return self._buffer

    def synchronize(self):
        """Bounded host wait on the current stream; device-side failures (timeouts) raise expertlink.Error."""
        self._buf().synchronize(current_stream_handle())

    def barrier(self):
        """Stream-ordered barrier across the ranks, on the current stream."""
        self._buf().barrier(current_stream_handle())

    # ---- high throughput ----
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        """-> (num_tokens_per_rank [R] i32, None, num_tokens_per_expert [E] i32, is_token_in_rank [T, R] bool,
        event). The None stands for DeepEP's num_tokens_per_rdma_rank (intranode only)."""
        torch = require_torch()
        wait_previous(previous_event)
        T, R = topk_idx.shape[0], self.group_size
        per_rank = torch.empty((R,), dtype=torch.int32, device=topk_idx.device)
        per_expert = torch.empty((num_experts,), dtype=torch.int32, device=topk_idx.device)
        in_rank = torch.empty((T, R), dtype=torch.bool, device=topk_idx.device)
        self._buf().get_dispatch_layout(view(topk_idx, "topk_idx"), num_experts, view(per_rank), view(per_expert),
                                        view(in_rank), current_stream_handle())
        return per_rank, None, per_expert, in_rank, finish_event(async_finish)

    def _check_ht_bytes(self, x, topk_idx):
        """Fails before notify (which is collective) when a BF16 dispatch cannot fit the HT region. FP8 rows
        are smaller: the C++ API checks those exactly in ht_dispatch."""
        torch = require_torch()
        if x.dtype != torch.bfloat16 or self.group_size <= 1:
            return
        topk = topk_idx.shape[1] if topk_idx is not None else 0
        need = _C.Buffer.ht_size_hint(self.group_size, x.shape[0], x.shape[1], topk)
        if need > self._buf().ht_bytes:
            raise invalid_argument(
                f"dispatch of {x.shape[0]} tokens x {x.shape[1]} bf16 channels, top-k {topk}, over "
                f"{self.group_size} ranks needs num_nvl_bytes >= {need} (Buffer.ht_size_hint({self.group_size}, "
                f"{x.shape[0]}, {x.shape[1]}, {topk})) but the Buffer has {self._buf().ht_bytes}")

    def _dispatch(self, x, topk_idx=None, topk_weights=None, num_experts=None, handle=None, is_token_in_rank=None,
                  expert_alignment=1, num_worst_tokens=0, num_sms=None, previous_event=None, async_finish=False):
        """Notify (unless `handle` is given: cached mode) + dispatch. Returns (recv_x, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)."""
        torch = require_torch()
        wait_previous(previous_event)
        x, x_scales = split_x(x)
        stream = current_stream_handle()
        args = _C.HtDispatchArgs()
        args.x = view(x, "x")
        if x_scales is not None:
            args.x_scales = view(x_scales, "x_scales")
        args.num_sms = self.num_sms if num_sms is None else num_sms
        cached = handle is not None
        if cached:
            h = handle._h
        else:
            if topk_idx is None and is_token_in_rank is None:
                raise invalid_argument("dispatch needs topk_idx (or is_token_in_rank), or a handle (cached mode)")
            if topk_idx is not None and num_experts is None:
                raise invalid_argument("dispatch with topk_idx needs num_experts")
            args.topk_idx = view(topk_idx, "topk_idx")
            args.topk_weights = view(topk_weights, "topk_weights")
            if topk_idx is None:
                args.is_token_in_rank = view(is_token_in_rank, "is_token_in_rank")
            args.num_experts = int(num_experts or 0)
            args.expert_alignment = int(expert_alignment)
            self._check_ht_bytes(x, topk_idx)
            h = _C.HtHandle()
            if num_worst_tokens > 0:
                self._buf().ht_notify(args, h, _C.Sizing.capacity, int(num_worst_tokens), stream)
            else:
                self._buf().ht_notify(args, h, _C.Sizing.exact, 0, stream)
            topk = topk_idx.shape[1] if topk_idx is not None else 0
            handle = HtHandle(h, x.shape[0], x.shape[1], topk, args.num_experts, num_worst_tokens > 0)
        rows = h.capacity() if handle.capacity_mode else h.num_recv_tokens()
        dev = x.device
        recv_x = torch.empty((rows, x.shape[1]), dtype=x.dtype, device=dev)
        out = _C.HtDispatchOutputs()
        out.recv_x = view(recv_x)
        recv_scales = recv_idx = recv_w = None
        if x_scales is not None:
            recv_scales = torch.empty((rows, x_scales.shape[1]), dtype=x_scales.dtype, device=dev)
            out.recv_x_scales = view(recv_scales)
        if not cached and topk_idx is not None:
            recv_idx = torch.empty((rows, topk_idx.shape[1]), dtype=topk_idx.dtype, device=dev)
            out.recv_topk_idx = view(recv_idx)
            if topk_weights is not None:
                recv_w = torch.empty((rows, topk_idx.shape[1]), dtype=torch.float32, device=dev)
                out.recv_topk_weights = view(recv_w)
        self._buf().ht_dispatch(args, h, out, stream)
        per_expert = [] if (cached or handle.capacity_mode or topk_idx is None) else h.num_recv_tokens_per_expert()
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        keep = [t for t in (x, x_scales, topk_idx, topk_weights, recv_x, recv_scales, recv_idx, recv_w) if t is not None]
        return recv, recv_idx, recv_w, per_expert, handle, finish_event(async_finish, keep)

    def dispatch(self, x, topk_idx, topk_weights, num_experts, expert_alignment=1, previous_event=None,
                 async_finish=False):
        """x: BF16 [T, H] or (FP8 [T, H], scales f32 [T, H/128] or packed UE8M0 i32); topk_idx [T, K] i64/i32
        (-1 = none); topk_weights [T, K] f32 or None. Computes the layout itself; one host sync (the exact
        received row count sizes the outputs). -> (recv_x, recv_topk_idx, recv_topk_weights, handle, event);
        recv_x is a pair for FP8; recv_topk_idx holds local expert ids (-1 elsewhere);
        handle.num_recv_tokens_per_expert() gives the per-local-expert counts."""
        recv_x, recv_idx, recv_w, _, handle, event = self._dispatch(
            x, topk_idx, topk_weights, num_experts, expert_alignment=expert_alignment,
            previous_event=previous_event, async_finish=async_finish)
        return recv_x, recv_idx, recv_w, handle, event

    def combine(self, x, handle, topk_weights=None, bias=None, previous_event=None, async_finish=False,
                num_sms=None):
        """x: BF16 [N_recv, H] expert outputs, one per received row of `handle`'s dispatch; topk_weights
        [N_recv, K] f32 (optional, summed back per token); bias: a BF16 [T, H] tensor or a pair, added once.
        -> (combined_x [T, H] BF16, combined_topk_weights or None, event), as DeepEP."""
        torch = require_torch()
        wait_previous(previous_event)
        args = _C.HtCombineArgs()
        args.x = view(x, "x")
        args.topk_weights = view(topk_weights, "topk_weights")
        biases = bias if isinstance(bias, (tuple, list)) else (bias, None)
        args.bias0 = view(biases[0], "bias")
        args.bias1 = view(biases[1], "bias")
        args.num_sms = self.num_sms if num_sms is None else num_sms
        combined_x = torch.empty((handle.num_tokens, x.shape[1]), dtype=torch.bfloat16, device=x.device)
        out = _C.HtCombineOutputs()
        out.combined_x = view(combined_x)
        combined_w = None
        if topk_weights is not None:
            combined_w = torch.empty((handle.num_tokens, topk_weights.shape[1]), dtype=torch.float32,
                                     device=x.device)
            out.combined_topk_weights = view(combined_w)
        self._buf().ht_combine(args, handle._h, out, current_stream_handle())
        return combined_x, combined_w, finish_event(async_finish, [x, combined_x])

    # ---- low latency ----
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False):
        """x BF16 [T, H] (T <= N), topk_idx [T, K]. -> (recv_x, recv_count, handle, event, hook).
        recv_x: (FP8 [E_local, R*N, H], scales [E_local, R*N, H/128] f32 (DeepEP's transposed strides) or
        packed UE8M0 i32) with use_fp8, else BF16 [E_local, R*N, H]; recv_count i32 [E_local]. hook(): the
        receive half when return_recv_hook, else a no-op. cumulative_local_expert_recv_stats (i32 [E_local])
        gets recv_count added; dispatch_wait_recv_cost_stats is ignored."""
        torch = require_torch()
        R, N, H = self.group_size, int(num_max_dispatch_tokens_per_rank), x.shape[1]
        if num_experts % R != 0:
            raise invalid_argument(f"num_experts = {num_experts} is not divisible by the {R} ranks")
        E_local, dev = num_experts // R, x.device
        slots = R * N
        out = _C.LlDispatchOutputs()
        if use_fp8:
            recv_x = torch.empty((E_local, slots, H), dtype=torch.float8_e4m3fn, device=dev)
            if use_ue8m0:
                cols = (H + 511) // 512
                recv_scales = torch.empty((E_local, cols, slots), dtype=torch.int32, device=dev).transpose(1, 2)
            else:
                recv_scales = torch.empty((E_local, H // 128, slots), dtype=torch.float32, device=dev).transpose(1, 2)
            out.recv_scales = view(recv_scales)
        else:
            recv_x = torch.empty((E_local, slots, H), dtype=torch.bfloat16, device=dev)
            recv_scales = None
        out.recv_x = view(recv_x)
        recv_count = torch.empty((E_local,), dtype=torch.int32, device=dev)
        src_info = torch.empty((E_local, slots), dtype=torch.int32, device=dev)
        layout_range = torch.empty((E_local, R), dtype=torch.int64, device=dev)
        out.recv_count, out.src_info, out.layout_range = view(recv_count), view(src_info), view(layout_range)
        args = _C.LlDispatchArgs()
        args.x = view(x, "x")
        args.topk_idx = view(topk_idx, "topk_idx")
        args.num_max_dispatch_tokens_per_rank = N
        args.num_experts = int(num_experts)
        opts = _C.LlDispatchOptions()
        opts.use_fp8, opts.round_scale, opts.use_ue8m0 = use_fp8, round_scale, use_ue8m0
        opts.return_recv_hook = return_recv_hook
        args.options = opts
        h = _C.LlHandle()
        c_hook = self._buf().ll_dispatch(args, h, out, current_stream_handle())
        stats = cumulative_local_expert_recv_stats

        def add_stats():
            stats.add_(recv_count)

        if stats is not None and not return_recv_hook:
            add_stats()
        handle = LlHandle(h, src_info, layout_range, N, H, num_experts)
        keep = (x, topk_idx, recv_x, recv_scales, recv_count, src_info, layout_range)
        hook = RecvHook(c_hook if return_recv_hook else None, keep,
                        add_stats if (stats is not None and return_recv_hook) else None)
        recv = (recv_x, recv_scales) if use_fp8 else recv_x
        return recv, recv_count, handle, finish_event(async_finish, list(keep[:3])), hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None):
        """x BF16 [E_local, R*N, H] expert outputs (the dispatch's slots), topk_idx/topk_weights [T, K] as
        dispatched. -> (combined_x BF16 [T, H], event, hook). zero_copy: x was written into
        get_next_low_latency_combine_buffer(handle). use_logfmt and combine_wait_recv_cost_stats are ignored
        (BF16 transfer)."""
        torch = require_torch()
        T = topk_idx.shape[0]
        combined = out if out is not None else torch.empty((T, handle.hidden), dtype=torch.bfloat16,
                                                             device=topk_idx.device)
        args = _C.LlCombineArgs()
        args.x = view(x, "x")
        args.topk_idx = view(topk_idx, "topk_idx")
        args.topk_weights = view(topk_weights, "topk_weights")
        args.zero_copy, args.return_recv_hook = zero_copy, return_recv_hook
        outs = _C.LlCombineOutputs()
        outs.out = view(combined, "out")
        c_hook = self._buf().ll_combine(args, handle._h, outs, current_stream_handle())
        keep = (x, topk_idx, topk_weights, combined)
        hook = RecvHook(c_hook if return_recv_hook else None, keep)
        return combined, finish_event(async_finish, [x, combined]), hook

    def get_next_low_latency_combine_buffer(self, handle):
        """BF16 [E_local, R*N, H] tensor the next low_latency_combine(zero_copy=True) reads."""
        v = self._buf().get_next_ll_combine_buffer(handle._h)
        return tensor_from_view(v, self._buffer)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank=0, hidden=0, num_experts=0):
        """Nothing to clean (LL signals only grow); checks that no split call is waiting for its hook."""
        self._buf().ll_clean(current_stream_handle())

    def capture(self):
        """An EventOverlap recorded on the current stream now."""
        return EventOverlap.record()
