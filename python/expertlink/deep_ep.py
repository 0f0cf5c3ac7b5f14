"""DeepEP V1's Python surface over ExpertLink: ``import expertlink.deep_ep as deep_ep``.

``deep_ep.Buffer`` has DeepEP V1's methods, arguments and return values (get_dispatch_layout, dispatch incl.
the cached mode and (FP8, scales) input, combine with topk_weights / bias, low_latency_dispatch /
low_latency_combine incl. return_recv_hook, async_finish, use_fp8 / round_scale / use_ue8m0, zero_copy with
get_next_low_latency_combine_buffer, clean_low_latency_buffer, capture, set_num_sms, get_dispatch_config /
get_combine_config, get_low_latency_rdma_size_hint, get_comm_stream, destroy), ``Config``, ``EventOverlap``
and ``topk_idx_t``. Sizes are fixed, as DeepEP: a call that does not fit fails before launching with an
``expertlink.Error`` giving the bytes needed (the simple ``expertlink.Buffer`` grows instead).

Stream arguments do what DeepEP's do: the HT calls run on the Buffer's communication stream, which waits for
``previous_event`` (else the current stream); ``allocate_on_comm_stream`` allocates the outputs there (needs
previous_event, as DeepEP); ``async_finish`` returns an event recorded there and leaves the current stream
free (the call's tensors are record_stream'ed; for LL calls the event holds them instead), else the current
stream waits. ``hook()`` launches the receive half of a return_recv_hook call on the stream current then.

Accepted without effect (documented where they are taken):
- RDMA / NVSHMEM / transport arguments: num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl,
  use_fabric, enable_shrink (intranode NVLink through NCCL symmetric memory only; ``num_rdma_bytes`` sizes the
  low-latency region, num_tokens_per_rdma_rank is always None); low_latency_mode (both paths always exist).
- dispatch's num_tokens_per_rank / num_tokens_per_rdma_rank / is_token_in_rank / num_tokens_per_expert: the
  layout is recomputed from topk_idx inside the notify (is_token_in_rank routes only when topk_idx is None;
  num_tokens_per_expert's length gives num_experts, which DeepEP's dispatch does not take).
- Config's chunk sizes (only num_sms is used); clean_low_latency_buffer's arguments (nothing needs cleaning).
- use_logfmt (BF16 travels), dispatch_wait_recv_cost_stats / combine_wait_recv_cost_stats (left unchanged).
Not available: the mpi4py ``comm`` instead of a group, get_local_buffer_tensor (the window is NCCL symmetric
memory, not a tensor), use_per_tensor_quantization / static_scale (raise ``unsupported``).

ExpertLink extension, opt-in: ``direct_recv=True, num_recv_bytes=N`` (N from
``expertlink.Buffer.ht_recv_size_hint``; fixed, as every size here) makes dispatch's recv_x a view of the
window's receive region, VALID ONLY UNTIL THE NEXT DISPATCH ON THIS BUFFER, and ``get_direct_combine_buffer``
the view a direct combine reads (see expertlink.Buffer).
"""

from . import _C
from ._core import BufferCore, HtHandle, LlHandle, check_direct_recv_args  # noqa: F401 (HtHandle, LlHandle re-exported)
from ._torch import EventOverlap, invalid_argument, require_torch, unsupported
from .buffer import check_ht_fits, check_ht_recv_fits

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]


def __getattr__(name):
    if name == "topk_idx_t":  # DeepEP's top-k index dtype; torch imported only when asked for
        return require_torch().int64
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Config:
    """DeepEP's Config(num_sms, num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
    num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens). Only num_sms is used (HT kernels' SMs,
    0 = ExpertLink's default); the chunk sizes are kept for callers that read them."""

    size_hint_tokens = 4096  # tokens per rank the NVL size hint provides for
    size_hint_topk = 32

    def __init__(self, num_sms=0, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256):
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        """HT bytes for size_hint_tokens tokens per rank of hidden_bytes / 2 BF16 channels, top-k 32 (DeepEP's
        hint depends on its chunking instead; this one bounds the tokens per call)."""
        return _C.Buffer.ht_size_hint(num_ranks, self.size_hint_tokens, max(1, hidden_bytes // 2),
                                      self.size_hint_topk)

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        """0: the internode path (docs/internode.md) stages in device memory the Buffer sizes itself; there is
        no RDMA buffer to reserve."""
        return 0

    def __repr__(self):
        return (f"Config(num_sms={self.num_sms}, nvl=({self.num_max_nvl_chunked_send_tokens}, "
                f"{self.num_max_nvl_chunked_recv_tokens}), rdma=({self.num_max_rdma_chunked_send_tokens}, "
                f"{self.num_max_rdma_chunked_recv_tokens}))")


# DeepEP's recommended chunk sizes per rank count (dispatch, combine); only the shape of Config matters here.
_DISPATCH_CHUNKS = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128)}
_COMBINE_CHUNKS = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128)}


class Buffer(BufferCore):
    """deep_ep.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
    allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False, explicitly_destroy=False,
    enable_shrink=False, comm=None): collective over `group` (a torch NCCL ProcessGroup whose communicator is
    adopted through ncclCommSplit). See the module docstring for what is accepted without effect.

    Attributes as DeepEP: num_sms (class), rank, group_size, group, num_nvl_bytes, num_rdma_bytes,
    low_latency_mode. Extra keyword arguments: timeout_s (bound of every wait), adopt ("split", "borrow",
    "unique_id"), direct_recv and num_recv_bytes (direct dispatch and combine into a receive region of that
    many bytes: recv_x is then only valid until the next dispatch; see expertlink.Buffer)."""

    num_sms = 0  # DeepEP: 20; here 0 = ExpertLink's analytic default (Buffer.set_num_sms changes it)

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
                 explicitly_destroy=False, enable_shrink=False, comm=None, timeout_s=None, adopt="split",
                 direct_recv=False, num_recv_bytes=0):
        require_torch()
        if group is None:
            raise unsupported("deep_ep.Buffer needs a torch.distributed ProcessGroup (the mpi4py `comm` "
                              "alternative is not supported)")
        if int(num_nvl_bytes) < 0 or int(num_rdma_bytes) < 0 or int(num_nvl_bytes) + int(num_rdma_bytes) <= 0:
            raise invalid_argument(f"num_nvl_bytes = {num_nvl_bytes}, num_rdma_bytes = {num_rdma_bytes}: both >= 0 "
                                   f"and not both 0 (see Config.get_nvl_buffer_size_hint, "
                                   f"Buffer.get_low_latency_rdma_size_hint)")
        check_direct_recv_args(direct_recv, num_recv_bytes, grow=False)
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, explicitly_destroy, timeout_s,
                         adopt, direct_recv, num_recv_bytes)

    # ---- static helpers ----
    @staticmethod
    def set_num_sms(new_num_sms):
        """SMs of the HT kernels of every deep_ep.Buffer (0 = ExpertLink's default). DeepEP requires an even
        count; any count >= 0 works here."""
        if new_num_sms < 0:
            raise invalid_argument(f"num_sms = {new_num_sms} must be >= 0")
        Buffer.num_sms = int(new_num_sms)

    @staticmethod
    def get_dispatch_config(num_ranks):
        return Config(Buffer.num_sms, *_DISPATCH_CHUNKS.get(num_ranks, (6, 256, 6, 128)))

    @staticmethod
    def get_combine_config(num_ranks):
        return Config(Buffer.num_sms, *_COMBINE_CHUNKS.get(num_ranks, (4, 256, 6, 128)))

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        """The num_rdma_bytes the low-latency calls need (ExpertLink's ll_size_hint; BF16 figure)."""
        return _C.Buffer.ll_size_hint(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    @staticmethod
    def is_sm90_compiled():
        return True

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        raise unsupported("get_local_buffer_tensor: ExpertLink's window is NCCL symmetric memory, not exposed as "
                          "a tensor")

    def _prepare_ht(self, tokens, hidden, topk, num_worst_tokens=0, direct=False):
        if self.group_size > 1:
            check_ht_fits(self.num_nvl_bytes, self.group_size, tokens, hidden, topk)
        if direct:
            check_ht_recv_fits(self.num_recv_bytes, self.group_size, tokens, hidden, num_worst_tokens)

    # ---- high throughput ----
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event).

        Fresh dispatch: num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert are required (as DeepEP;
        get_dispatch_layout returns them); one host sync sizes the outputs exactly, unless num_worst_tokens > 0
        (no sync, CUDA-graph capturable: outputs hold num_worst_tokens rows, the list is empty,
        handle.check_capacity() raises on overflow). Cached dispatch (handle given, no topk_idx/topk_weights):
        returns (recv_x, None, None, None, None, event). With direct_recv, recv_x views the receive region and is
        valid only until the next dispatch on this Buffer."""
        num_sms = config.num_sms if config is not None else None
        if handle is not None:
            recv_x, _, _, _, _, event = self._ht_dispatch(
                x, topk_idx, topk_weights, handle=handle, num_sms=num_sms, previous_event=previous_event,
                async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
            return recv_x, None, None, None, None, event
        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            raise invalid_argument("a fresh dispatch needs num_tokens_per_rank, is_token_in_rank and "
                                   "num_tokens_per_expert (as DeepEP: get_dispatch_layout returns them)")
        num_experts = num_tokens_per_expert.numel() if topk_idx is not None else None
        return self._ht_dispatch(x, topk_idx, topk_weights, num_experts, is_token_in_rank=is_token_in_rank,
                                 expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
                                 num_sms=num_sms, previous_event=previous_event, async_finish=async_finish,
                                 allocate_on_comm_stream=allocate_on_comm_stream)

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False):
        """-> (combined_x [T, H] BF16, combined_topk_weights [T, K] f32 or None, event). Sums without weights
        (as DeepEP); bias: a BF16 [T, H] tensor or a pair, added once."""
        num_sms = config.num_sms if config is not None else None
        return self._ht_combine(x, handle, topk_weights, bias, num_sms=num_sms, previous_event=previous_event,
                                async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
