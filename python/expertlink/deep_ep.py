"""DeepEP V1's Python surface over ExpertLink: ``import expertlink.deep_ep as deep_ep``.

``deep_ep.Buffer`` has DeepEP V1's methods, arguments and return values (get_dispatch_layout, dispatch,
combine, low_latency_dispatch, low_latency_combine, get_next_low_latency_combine_buffer,
clean_low_latency_buffer, capture, set_num_sms, get_dispatch_config / get_combine_config,
get_low_latency_rdma_size_hint), ``Config``, ``EventOverlap`` and ``topk_idx_t``.

UNTESTED ON GPU as of 2026-11-28 (written without GPU access).

Differences, all documented where they apply:
- Intranode only (NVLink through NCCL symmetric memory): num_tokens_per_rdma_rank is always None;
  RDMA/NVSHMEM arguments (num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric,
  enable_shrink, comm) are accepted and ignored; ``num_rdma_bytes`` sizes the low-latency region.
- No separate communication stream: every call runs on the current stream; ``allocate_on_comm_stream`` is
  ignored and ``async_finish=True`` returns an event recorded after the call on that stream.
- dispatch computes its own layout from topk_idx: the num_tokens_per_rank / num_tokens_per_rdma_rank /
  num_tokens_per_expert arguments are accepted and not read (is_token_in_rank is used only without
  topk_idx). ``config`` contributes only its num_sms.
- The HT region holds a bounded number of tokens per call (Buffer.ht_size_hint); Config's size hints
  assume ``Config.size_hint_tokens`` (4096) tokens and top-k 32. A call that does not fit fails with the
  bytes it needs.
- low_latency_combine: use_logfmt and the *_stats timing arguments are ignored.
- hook is a callable in every mode (a no-op unless return_recv_hook=True).
"""

from . import _C
from . import buffer as _simple
from ._torch import EventOverlap, invalid_argument, require_torch

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]


def __getattr__(name):
    if name == "topk_idx_t":  # DeepEP's top-k index dtype; torch imported only when asked for
        return require_torch().int64
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Config:
    """DeepEP's Config(num_sms, nvl_chunk_send, nvl_chunk_recv, rdma_chunk_send, rdma_chunk_recv). Only
    num_sms is used (HT kernels' SMs, 0 = default); the chunk sizes are kept for callers that read them."""

    size_hint_tokens = 4096  # tokens per rank the buffer size hints provide for
    size_hint_topk = 32

    def __init__(self, num_sms=0, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256):
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        """HT bytes for size_hint_tokens tokens per rank of hidden_bytes / 2 BF16 channels, top-k 32."""
        return _C.Buffer.ht_size_hint(num_ranks, self.size_hint_tokens, max(1, hidden_bytes // 2),
                                      self.size_hint_topk)

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        """0: there is no internode (RDMA) path yet."""
        return 0

    def __repr__(self):
        return (f"Config(num_sms={self.num_sms}, nvl=({self.num_max_nvl_chunked_send_tokens}, "
                f"{self.num_max_nvl_chunked_recv_tokens}), rdma=({self.num_max_rdma_chunked_send_tokens}, "
                f"{self.num_max_rdma_chunked_recv_tokens}))")


class Buffer(_simple.Buffer):
    """deep_ep.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
    allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False, explicitly_destroy=False,
    enable_shrink=False, comm=None). See the module docstring for what is ignored."""

    num_sms = 0

    @staticmethod
    def set_num_sms(new_num_sms):
        """SMs of the HT kernels (0 = ExpertLink's default). Applies to every Buffer, as in DeepEP."""
        if new_num_sms < 0:
            raise ValueError(f"num_sms = {new_num_sms} must be >= 0")
        _simple.Buffer.num_sms = new_num_sms
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks):
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks):
        return Config(Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        """The num_rdma_bytes the low-latency calls need (ExpertLink's ll_size_hint)."""
        return _C.Buffer.ll_size_hint(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def get_local_buffer_tensor(self, *args, **kwargs):
        raise NotImplementedError("ExpertLink's window is NCCL symmetric memory, not exposed as a tensor")

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event).

        Fresh dispatch: topk_idx (+ topk_weights) route; one host sync sizes the outputs exactly, unless
        num_worst_tokens > 0 (no sync: outputs hold num_worst_tokens rows, the list is empty, overflow raises
        on handle check). Cached dispatch (handle given): returns (recv_x, None, None, None, handle, event).
        num_experts is taken from num_tokens_per_expert's length (DeepEP passes no num_experts)."""
        num_sms = config.num_sms if config is not None else None
        if handle is not None:
            recv_x, _, _, _, handle, event = self._dispatch(x, handle=handle, num_sms=num_sms,
                                                            previous_event=previous_event,
                                                            async_finish=async_finish)
            return recv_x, None, None, None, handle, event
        num_experts = None
        if topk_idx is not None:
            if num_tokens_per_expert is None:
                raise invalid_argument("dispatch with topk_idx needs num_tokens_per_expert (for num_experts; "
                                               "get_dispatch_layout returns it)")
            num_experts = num_tokens_per_expert.numel()
        return self._dispatch(x, topk_idx, topk_weights, num_experts, is_token_in_rank=is_token_in_rank,
                              expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
                              num_sms=num_sms, previous_event=previous_event, async_finish=async_finish)

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False):
        """-> (combined_x, combined_topk_weights, event)."""
        num_sms = config.num_sms if config is not None else None
        return super().combine(x, handle, topk_weights, bias, previous_event=previous_event,
                               async_finish=async_finish, num_sms=num_sms)
