"""How big a Buffer's regions must be, and when the simple expertlink.Buffer grows: pure functions over
the C++ size hints (no torch, no GPU), so they are tested in CI.

HT (num_nvl_bytes): a dispatch of T tokens per rank needs ``Buffer.ht_size_hint(R, T_max, H, K)`` where
T_max is the largest T over the ranks (each source rank owns a segment of T_max rows in every receiver's
area; the BF16 figure also covers FP8 rows and the combine that follows). A grow rounds T_max up to a
power of two (at least ``MIN_GROW_TOKENS``), so a workload whose token count drifts upwards rebuilds a
logarithmic number of times, and the retired windows add up to less than the current one.

Receive region (num_recv_bytes, direct dispatch only): ``Buffer.ht_recv_size_hint(R, T_rows, H)``, every row
a dispatch may bring (BF16 rows of H, which cover FP8's) where T_rows is T_max, or more when num_worst_tokens
asks for more rows than R * T_max (outputs of that many rows are views of the region). A grow rounds T_rows up
as for HT.

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


def recv_tokens(num_ranks, max_tokens, num_worst_tokens=0):
    """Tokens per rank the receive region must provide for: max_tokens, or num_worst_tokens / R rounded up when
    that is more (R * T rows per region)."""
    return max(int(max_tokens), -(-int(num_worst_tokens) // max(1, int(num_ranks))))


def ht_recv_bytes_needed(num_ranks, max_tokens, hidden, num_worst_tokens=0):
    """Receive-region bytes a direct dispatch of up to max_tokens tokens per rank needs: every row that may
    arrive, and at least num_worst_tokens rows (a capacity-sized dispatch's outputs), as BF16 rows of hidden."""
    return _C.Buffer.ht_recv_size_hint(int(num_ranks), recv_tokens(num_ranks, max_tokens, num_worst_tokens),
                                       int(hidden))


def ht_recv_grow_bytes(current_bytes, num_ranks, max_tokens, hidden, num_worst_tokens=0):
    """None when the receive region's current_bytes hold the dispatch, else the bytes to rebuild it with
    (rounded-up tokens; never less than now)."""
    if ht_recv_bytes_needed(num_ranks, max_tokens, hidden, num_worst_tokens) <= current_bytes:
        return None
    tokens = round_up_tokens(recv_tokens(num_ranks, max_tokens, num_worst_tokens))
    return max(_C.Buffer.ht_recv_size_hint(int(num_ranks), tokens, int(hidden)), int(current_bytes))


def ht_allreduce_payload(tokens, hidden, topk, num_worst_tokens=0, direct=False):
    """What each rank contributes to the grow check's all-reduce (MAX): its token count; hidden, top-k and
    whether the dispatch is direct (0 / 1), each as it is and negated, so the result carries the max and the
    min over the ranks; and num_worst_tokens (the receive region's rows in capacity mode)."""
    return [int(tokens), int(hidden), int(topk), -int(hidden), -int(topk), int(num_worst_tokens), int(bool(direct)),
            -int(bool(direct))]


def _check_reduced(reduced, hidden, topk):
    """The all-reduced payload as (max_tokens, max_worst_tokens, direct); raises on every rank alike when the
    ranks' hidden, top-k or direct mode differ."""
    max_tokens, max_hidden, max_topk, neg_min_hidden, neg_min_topk, max_worst, max_direct, neg_min_direct = \
        (int(v) for v in reduced)
    if (max_hidden, max_topk) != (-neg_min_hidden, -neg_min_topk):
        raise invalid_argument(f"the ranks dispatch different shapes: hidden from {-neg_min_hidden} to {max_hidden}, "
                               f"top-k from {-neg_min_topk} to {max_topk} (this rank: {hidden}, {topk}); every rank "
                               f"must use the same")
    if max_direct != -neg_min_direct:
        raise invalid_argument("the ranks disagree on direct dispatch (recv_x placement): some dispatch into the "
                               "receive region (direct_recv), some not; every rank must do the same")
    return max_tokens, max_worst, bool(max_direct)


def ht_grow_decision(current_bytes, num_ranks, reduced, hidden, topk):
    """From the all-reduced payload (identical on every rank): None (the window holds the dispatch) or the HT
    bytes to rebuild with. Raises on every rank alike when the ranks' hidden, top-k or direct mode differ."""
    max_tokens, _, _ = _check_reduced(reduced, hidden, topk)
    return ht_grow_bytes(current_bytes, num_ranks, max_tokens, hidden, topk)


def ht_recv_grow_decision(current_recv_bytes, num_ranks, reduced, hidden, topk):
    """From the same payload: None (not direct, or the receive region holds the dispatch) or the receive-region
    bytes to rebuild with."""
    max_tokens, max_worst, direct = _check_reduced(reduced, hidden, topk)
    if not direct:
        return None
    return ht_recv_grow_bytes(current_recv_bytes, num_ranks, max_tokens, hidden, max_worst)


def ll_bytes_needed(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts):
    """LL bytes for N tokens per rank of `hidden` channels (any top-k <= 16, BF16 or FP8)."""
    return _C.Buffer.ll_size_hint(int(num_ranks), int(num_max_dispatch_tokens_per_rank), int(hidden),
                                  int(num_experts))


def ll_grow_bytes(current_bytes, num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts):
    """None when current_bytes hold the call, else the LL bytes to rebuild with."""
    need = ll_bytes_needed(num_ranks, num_max_dispatch_tokens_per_rank, hidden, num_experts)
    return None if need <= current_bytes else need
