"""How big a Buffer's regions must be, and when the simple expertlink.Buffer grows: pure functions over
the C++ size hints (no torch, no GPU), so they are tested in CI.

HT (num_nvl_bytes): a dispatch of T tokens per rank needs ``Buffer.ht_size_hint(R, T_max, H, K)`` where
T_max is the largest T over the ranks (each source rank owns a segment of T_max rows in every receiver's
area; the BF16 figure also covers FP8 rows and the combine that follows). A grow rounds T_max up to a
power of two (at least ``MIN_GROW_TOKENS``), so a workload whose token count drifts upwards rebuilds a
logarithmic number of times, and the retired windows add up to less than the current one.

LL (num_rdma_bytes): ``Buffer.ll_size_hint(R, N, H, E)``; N, H and E are the same on every rank (the LL
contract), so every rank reaches the same decision without communicating. A grow takes exactly that.
"""

from . import _C
from ._torch import invalid_argument

MIN_GROW_TOKENS = 64


def round_up_tokens(tokens):
    """The token count a grow provides for: the next power of two >= tokens, at least MIN_GROW_TOKENS."""
    tokens = max(int(tokens), MIN_GROW_TOKENS)
    return 1 << (tokens - 1).bit_length()


def ht_bytes_needed(num_ranks, max_tokens, hidden, topk):
    """HT bytes a dispatch (and its combine) of up to max_tokens tokens per rank needs."""
    return _C.Buffer.ht_size_hint(int(num_ranks), int(max_tokens), int(hidden), int(topk))


def ht_grow_bytes(current_bytes, num_ranks, max_tokens, hidden, topk):
    """None when current_bytes hold the call, else the HT bytes to rebuild with (rounded-up tokens)."""
    if ht_bytes_needed(num_ranks, max_tokens, hidden, topk) <= current_bytes:
        return None
    return max(ht_bytes_needed(num_ranks, round_up_tokens(max_tokens), hidden, topk), int(current_bytes))


def ht_allreduce_payload(tokens, hidden, topk):
    """What each rank contributes to the grow check's all-reduce (MAX): its token count, and hidden and top-k
    both as they are and negated, so the result carries the max and the min of each over the ranks."""
    return [int(tokens), int(hidden), int(topk), -int(hidden), -int(topk)]


def ht_grow_decision(current_bytes, num_ranks, reduced, hidden, topk):
    """From the all-reduced payload (identical on every rank): None (the window holds the dispatch) or the HT
    bytes to rebuild with. Raises on every rank alike when the ranks' hidden or top-k differ."""
    max_tokens, max_hidden, max_topk, neg_min_hidden, neg_min_topk = (int(v) for v in reduced)
    if (max_hidden, max_topk) != (-neg_min_hidden, -neg_min_topk):
        raise invalid_argument(f"the ranks dispatch different shapes: hidden from {-neg_min_hidden} to {max_hidden}, "
                               f"top-k from {-neg_min_topk} to {max_topk} (this rank: {hidden}, {topk}); every rank "
                               f"must use the same")
    return ht_grow_bytes(current_bytes, num_ranks, max_tokens, hidden, topk)


def ll_bytes_needed(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts):
    """LL bytes for N tokens per rank of `hidden` channels (any top-k <= 16, BF16 or FP8)."""
    return _C.Buffer.ll_size_hint(int(num_ranks), int(num_max_dispatch_tokens_per_rank), int(hidden),
                                  int(num_experts))


def ll_grow_bytes(current_bytes, num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts):
    """None when current_bytes hold the call, else the LL bytes to rebuild with."""
    need = ll_bytes_needed(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts)
    return None if need <= current_bytes else need
