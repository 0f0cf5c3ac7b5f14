"""expertlink.Buffer: the simple PyTorch front end (issue 8), over the torch-free binding expertlink._C.

    from expertlink import Buffer
    buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)             # collective over `group`
    recv_x, recv_topk_idx, recv_topk_weights, handle, event = buffer.dispatch(x, topk_idx, topk_weights, E)
    combined_x, combined_topk_weights, event = buffer.combine(expert_out, handle)
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(x, topk_idx, num_max_tokens, E)
    combined_x, event, hook = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle)

Every rank makes the same calls in the same order (collective), as with DeepEP. Streams, handles and
window generations: _core.py's docstring.

The buffer grows itself. ``num_nvl_bytes`` (high-throughput region) and ``num_rdma_bytes`` (low-latency
region) are a starting size; a call that needs more builds a larger window first:
- dispatch: the bytes depend on the largest token count over the ranks, so every fresh dispatch does one
  all-reduce (max) of (tokens, hidden, top-k, -hidden, -top-k, num_worst_tokens, direct, -direct) over `group`
  (64 bytes, torch's NCCL), read on the host (one host sync; the exact-size dispatch syncs once anyway). If the region is too small every rank sees it
  and rebuilds with ``Buffer.ht_size_hint(R, T', H, K)``, T' = the largest token count rounded up to a power
  of two (at least 64).
- low_latency_dispatch: N, H and E are the same on every rank, so no communication: if the region is below
  ``Buffer.ll_size_hint(R, N, H, E)`` every rank rebuilds with that.
A rebuild is collective (NCCL window allocation and registration: milliseconds) and happens only when the
size goes up. The old window is kept so handles made on it still combine (``num_retired``); free them with
``release_retired()`` on every rank at the same point. Pass ``grow=False`` for DeepEP's behaviour (a call
that does not fit fails before launching with an ``expertlink.Error`` giving the bytes needed), and size with
``Buffer.ht_size_hint`` / ``Buffer.ll_size_hint`` to never rebuild.

Direct dispatch (``direct_recv=True``, an ExpertLink extension, opt-in): the
window also holds a receive region (``num_recv_bytes``, grown like the HT region to
``Buffer.ht_recv_size_hint(R, T', H)``, enough for every row that may arrive) and dispatch returns recv_x as a
view of it, written in place by the senders; ``get_direct_combine_buffer(handle)`` is the BF16 view a direct
combine reads. recv_x IS ONLY VALID UNTIL THE NEXT DISPATCH ON THIS BUFFER (that dispatch writes its rows over
it): copy what must live longer, and do not let autograd save it across dispatches (``direct=False`` on a call
gives an ordinary tensor).
"""

import logging

from . import _sizing
from ._core import BufferCore, HtHandle, LlHandle, RecvHook, check_direct_recv_args  # noqa: F401 (re-exported)
from ._torch import EventOverlap, invalid_argument, require_torch  # noqa: F401 (EventOverlap re-exported)

log = logging.getLogger("expertlink")


def check_ht_fits(current_bytes, num_ranks, tokens, hidden, topk, dtype_label="bf16"):
    """Raises (before anything launches) when a dispatch of `tokens` rows cannot fit `current_bytes`."""
    need = _sizing.ht_bytes_needed(num_ranks, tokens, hidden, topk)
    if need > current_bytes:
        raise invalid_argument(
            f"dispatch of {tokens} tokens x {hidden} {dtype_label} channels, top-k {topk}, over {num_ranks} ranks "
            f"needs num_nvl_bytes >= {need} (Buffer.ht_size_hint({num_ranks}, {tokens}, {hidden}, {topk})) but the "
            f"Buffer has {current_bytes}")


def check_ht_recv_fits(current_recv_bytes, num_ranks, tokens, hidden, num_worst_tokens=0):
    """Raises (before anything launches) when the receive region cannot hold every row a direct dispatch of
    `tokens` rows per rank may bring (and num_worst_tokens rows)."""
    need = _sizing.ht_recv_bytes_needed(num_ranks, tokens, hidden, num_worst_tokens)
    if need > current_recv_bytes:
        rows = _sizing.recv_tokens(num_ranks, tokens, num_worst_tokens)
        worst = f", num_worst_tokens {num_worst_tokens}," if num_worst_tokens else ""
        raise invalid_argument(
            f"direct dispatch of {tokens} tokens x {hidden} channels over {num_ranks} ranks{worst} needs "
            f"num_recv_bytes >= {need} (Buffer.ht_recv_size_hint({num_ranks}, {rows}, {hidden})) but the receive "
            f"region has {current_recv_bytes}")


class Buffer(BufferCore):
    """Buffer(group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, ...): collective over `group`.

    group: a torch.distributed NCCL ProcessGroup; its communicator is adopted (an ncclCommSplit of it,
    ``adopt="split"``; or ``"borrow"``, or ``"unique_id"`` for a fresh one). The current CUDA device must be
    this rank's. num_nvl_bytes -> HT region, num_rdma_bytes -> LL region: starting sizes (the Buffer grows, see
    the module docstring; with both 0 the first call builds the window). low_latency_mode and DeepEP's
    transport arguments (num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric,
    enable_shrink, comm) are accepted and ignored: both paths always exist (intranode NVLink through NCCL
    symmetric memory). explicitly_destroy: kept for DeepEP code; destroy() works either way. timeout_s: bound
    of every wait (default $EXPERTLINK_TIMEOUT_S or 5 s). grow=False: never grow, fail with the bytes needed.

    direct_recv=True (opt-in, ExpertLink only): direct dispatch and combine. The window holds a receive region
    (num_recv_bytes: its starting size, or its fixed size with grow=False; see Buffer.ht_recv_size_hint);
    dispatch's recv_x is a view of that region, written in place by the senders, and combine() of
    get_direct_combine_buffer(handle) reads the expert outputs from there. WARNING: such a recv_x is only valid
    until the next dispatch on this Buffer, which overwrites it (autograd must not save it across dispatches;
    copy it, or dispatch with direct=False, where it must live longer). Every rank must pass the same."""

    num_sms = 0

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
                 explicitly_destroy=False, enable_shrink=False, comm=None, timeout_s=None, adopt="split",
                 grow=True, direct_recv=False, num_recv_bytes=0):
        require_torch()
        if group is None:
            raise invalid_argument("group is required (a torch.distributed NCCL ProcessGroup; DeepEP's mpi4py "
                                   "`comm` alternative is not supported)")
        if int(num_nvl_bytes) < 0 or int(num_rdma_bytes) < 0:
            raise invalid_argument(f"num_nvl_bytes = {num_nvl_bytes} and num_rdma_bytes = {num_rdma_bytes} must be "
                                   f">= 0")
        if not grow and int(num_nvl_bytes) + int(num_rdma_bytes) <= 0:
            raise invalid_argument("num_nvl_bytes + num_rdma_bytes = 0 with grow=False: the buffer would hold "
                                   "nothing (see Buffer.ht_size_hint / Buffer.ll_size_hint)")
        check_direct_recv_args(direct_recv, num_recv_bytes, grow)
        self.grow = bool(grow)
        self.num_grows = 0
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, explicitly_destroy, timeout_s,
                         adopt, direct_recv, num_recv_bytes)

    # ---- sizes ----
    @staticmethod
    def ht_size_hint(num_ranks, max_tokens_per_rank, hidden, topk):
        """HT bytes (num_nvl_bytes) for up to max_tokens_per_rank tokens of `hidden` channels, BF16 or FP8."""
        return _sizing.ht_bytes_needed(num_ranks, max_tokens_per_rank, hidden, topk)

    @staticmethod
    def ht_recv_size_hint(num_ranks, max_tokens_per_rank, hidden):
        """Receive-region bytes (num_recv_bytes, direct_recv) for up to max_tokens_per_rank tokens per rank of
        `hidden` channels, BF16 or FP8: every row that may arrive."""
        return _sizing.ht_recv_bytes_needed(num_ranks, max_tokens_per_rank, hidden)

    @staticmethod
    def ll_size_hint(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """LL bytes (num_rdma_bytes) for up to N tokens per rank, any top-k <= 16, BF16 or FP8."""
        return _sizing.ll_bytes_needed(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    @staticmethod
    def set_num_sms(new_num_sms):
        """SMs of the HT kernels of every simple Buffer (0 = ExpertLink's default)."""
        if new_num_sms < 0:
            raise invalid_argument(f"num_sms = {new_num_sms} must be >= 0")
        Buffer.num_sms = int(new_num_sms)

    def _rebuild(self, ht_bytes, ll_bytes, why, recv_bytes=None):
        recv_bytes = self.num_recv_bytes if recv_bytes is None else recv_bytes
        log.info("expertlink.Buffer rank %d grows (%s): HT %d -> %d bytes, LL %d -> %d bytes, receive region %d -> "
                 "%d bytes", self.rank, why, self.num_nvl_bytes, ht_bytes, self.num_rdma_bytes, ll_bytes,
                 self.num_recv_bytes, recv_bytes)
        self._build(ht_bytes, ll_bytes, recv_bytes)
        self.num_grows += 1

    def _prepare_ht(self, tokens, hidden, topk, num_worst_tokens=0, direct=False):
        R = self.group_size
        if not self.grow:
            if R > 1:
                check_ht_fits(self.num_nvl_bytes, R, tokens, hidden, topk)
            if direct:
                check_ht_recv_fits(self.num_recv_bytes, R, tokens, hidden, num_worst_tokens)
            return
        payload = _sizing.ht_allreduce_payload(tokens, hidden, topk, num_worst_tokens, direct)
        if R > 1:
            torch = require_torch()
            import torch.distributed as dist  # noqa: PLC0415

            # One all-reduce (MAX), read on the host: every rank gets the same numbers and the same decision (a
            # rank that raised or grew alone would leave the others waiting).
            sizes = torch.tensor(payload, dtype=torch.int64, device="cuda")
            dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=self.group)
            reduced = sizes.tolist()
        elif direct:  # one rank: nothing leaves it (no HT bytes), but its rows still land in the region
            reduced = payload
        else:
            return
        target = _sizing.ht_grow_decision(self.num_nvl_bytes, R, reduced, hidden, topk)
        recv_target = _sizing.ht_recv_grow_decision(self.num_recv_bytes, R, reduced, hidden, topk)
        if target is not None or recv_target is not None:
            self._rebuild(self.num_nvl_bytes if target is None else target, self.num_rdma_bytes,
                          f"{'direct ' if direct else ''}dispatch of up to {reduced[0]} tokens per rank", recv_target)

    def _prepare_ll(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        if not self.grow:
            return  # the C++ check fails before launching, giving the bytes needed
        target = _sizing.ll_grow_bytes(self.num_rdma_bytes, self.group_size, num_max_dispatch_tokens_per_rank, hidden,
                                       num_experts)
        if target is not None:
            self._rebuild(self.num_nvl_bytes, target,
                          f"low_latency_dispatch N = {num_max_dispatch_tokens_per_rank}, hidden = {hidden}, "
                          f"num_experts = {num_experts}")

    # ---- high throughput ----
    def dispatch(self, x, topk_idx=None, topk_weights=None, num_experts=None, handle=None, expert_alignment=1,
                 num_worst_tokens=0, previous_event=None, async_finish=False, allocate_on_comm_stream=False,
                 num_sms=None, direct=None):
        """x: BF16 [T, H] or (FP8 [T, H], scales f32 [T, H/128] or packed UE8M0 i32 [T, ceil(H/512)]);
        topk_idx [T, K] i64/i32 (-1 = none); topk_weights [T, K] f32 or None; num_experts E (divisible by the
        ranks). Computes the layout itself. -> (recv_x, recv_topk_idx, recv_topk_weights, handle, event).

        recv_x is a pair for FP8; recv_topk_idx holds local expert ids (-1 where the expert is elsewhere, weight 0
        there); handle.num_recv_tokens_per_expert() gives the per-local-expert counts (padded to
        expert_alignment). Host-synced: one all-reduce read on the host (the grow check, see the module
        docstring) and the exact received row count; num_worst_tokens > 0 skips the latter (outputs hold that many
        rows, handle.check_capacity() after the stream passed). handle given: cached dispatch along an earlier
        dispatch's routing (also combine's backward) -> (recv_x, None, None, handle, event).

        With direct_recv (see the class docstring) recv_x (BF16, or the FP8 tensor of the pair) is a view of the
        Buffer's receive region: VALID ONLY UNTIL THE NEXT DISPATCH ON THIS BUFFER, which writes over it; the
        scales, top-k and weights are ordinary tensors. direct: None = the Buffer's direct_recv (a cached
        dispatch: as the handle's dispatch did); False = an ordinary recv_x on a direct_recv Buffer (for rows
        that must outlive the next dispatch); True needs direct_recv. Every rank must make the same choice."""
        recv_x, recv_idx, recv_w, _, handle, event = self._ht_dispatch(
            x, topk_idx, topk_weights, num_experts, handle=handle, expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens, num_sms=num_sms, previous_event=previous_event,
            async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream, direct=direct)
        return recv_x, recv_idx, recv_w, handle, event

    def combine(self, x, handle, topk_weights=None, bias=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False, num_sms=None):
        """x: BF16 [N_recv, H] expert outputs, one per received row of `handle`'s dispatch (the dispatch's
        backward); topk_weights [N_recv, K] f32 (optional, summed back per token); bias: a BF16 [T, H] tensor or
        a pair, added once. -> (combined_x [T, H] BF16, combined_topk_weights or None, event), as DeepEP. Runs on
        the window the handle was made on (no grow: a dispatch that fitted means its combine fits).

        x = get_direct_combine_buffer(handle) (direct_recv) is a direct combine: each source reads its rows from
        the ranks holding them (and topk_weights, staged in their windows)."""
        return self._ht_combine(x, handle, topk_weights, bias, num_sms=num_sms, previous_event=previous_event,
                                async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)

    def _current(self):
        if self._gen is None and self._comm is not None and self.grow:
            # Built lazily (Buffer(group, 0, 0)): the first call is collective, so every rank builds here.
            # 16 LL bytes: a window must hold something; the call's own check then grows it.
            self._build(0, 16)
        return super()._current()
