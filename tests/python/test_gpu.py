"""GPU tests of the Python front end: 2 ranks via torch.multiprocessing, every result against the CPU oracle.

One mp.spawn runs every check in order (process and NCCL start-up are the expensive part); each check is then
reported as its own pytest case (test_check[name]) with both ranks' outcome. Skips, with the reason, without
torch or without 2 CUDA GPUs.

Covered: issue 8's two snippets as written (their literal text, with their literal small byte counts, inside a
small MoE step; the buffer grows), the simple Buffer's grow across unequal token counts with handles of a
retired window, FP8 input and bias; the deep_ep surface: get_dispatch_layout, dispatch (BF16, FP8, UE8M0,
expert_alignment, cached, num_worst_tokens, config / set_num_sms), combine (weights, bias pair), the stream
arguments (previous_event on a delayed stream, async_finish, allocate_on_comm_stream, EventOverlap with
current_stream_wait and `with`, capture, get_comm_stream), low_latency_dispatch (BF16, FP8, round_scale,
UE8M0, return_recv_hook with two calls in flight, async_finish, cumulative stats), low_latency_combine (hook,
zero_copy with get_next_low_latency_combine_buffer, out, async_finish), clean_low_latency_buffer, the size
hints, topk_idx_t, fixed-size failures that give the bytes needed, destroy. Direct dispatch and combine
(direct_recv=True; written 2026-11-28, NOT YET RUN ON A GPU): BF16 and FP8 dispatch into the receive region and
the direct combine from it, num_worst_tokens, cached, topk_weights refused, a plain dispatch on the same Buffer
afterwards, and deep_ep.Buffer's fixed-size variant."""

import datetime
import os
import socket
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: GPU tests of the Python front end skipped")
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA GPUs (found %d): GPU tests of the Python front end skipped"
                % (torch.cuda.device_count() if torch.cuda.is_available() else 0), allow_module_level=True)

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import expertlink  # noqa: E402
import expertlink.deep_ep as deep_ep  # noqa: E402

ref = expertlink.reference
R, E, K, H = 2, 16, 4, 256
EL = E // R
T_HT = 64          # HT tokens per rank
N_LL, T_LL = 64, 48  # LL capacity and tokens per rank

# Issue 8's snippets, verbatim. The second continues the first's module (it uses its `_buffer = None`).
SNIPPET_1 = '''
from expertlink import Buffer            # they wrote: from deep_ep import Buffer
_buffer = None
def get_buffer(group, hidden_bytes):
    global _buffer
    if _buffer is None or _buffer.group != group:
        _buffer = Buffer(group, hidden_bytes, hidden_bytes)
    return _buffer
def dispatch_forward(x, topk_idx, topk_weights, num_experts):
    recv_x, recv_topk_idx, recv_topk_weights, handle, event = _buffer.dispatch(x, topk_idx, topk_weights, num_experts)
    return recv_x, recv_topk_idx, recv_topk_weights, handle, event
'''
SNIPPET_2 = '''
def get_buffer(group, num_max_tokens, hidden, num_experts):
    global _buffer
    if _buffer is None or _buffer.group != group:
        _buffer = Buffer(group, 0, num_max_tokens * hidden * num_experts, low_latency_mode=True)
    return _buffer
def low_latency_dispatch(hidden_states, topk_idx, num_max_tokens, num_experts):
    recv_hidden_states, recv_expert_count, handle, event, hook = _buffer.low_latency_dispatch(hidden_states, topk_idx, num_max_tokens, num_experts)
    return recv_hidden_states, recv_expert_count, handle, event, hook
'''


# ---- data (every rank can rebuild every rank's) and the oracle -------------------------------------------

def routing(rank, tokens, seed=100, drop=0.1):
    g = torch.Generator().manual_seed(seed + rank)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]).to(torch.int64)
    idx[torch.rand((tokens, K), generator=g) < drop] = -1
    x = torch.randn((tokens, H), generator=g).to(torch.bfloat16)
    w = torch.where(idx >= 0, torch.rand((tokens, K), generator=g) + 0.25, torch.zeros(())).float()
    return x.reshape(tokens, H), idx.reshape(tokens, K), w.reshape(tokens, K)


def bits(t):  # BF16 tensor -> uint16 numpy bit patterns
    return t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def bf16_from_bits(b, shape):
    return torch.from_numpy(np.ascontiguousarray(b).view(np.int16).reshape(shape)).view(torch.bfloat16)


def fp8_cast(x, round_scale=False, use_ue8m0=False):
    """The oracle's per-128-channel cast -> (TokenRows, fp8 tensor, scales tensor) on the CPU."""
    rows = ref.cast_to_fp8(bits(x), round_scale, use_ue8m0)
    q = torch.from_numpy(np.asarray(rows.fp8).reshape(x.shape[0], H)).view(torch.float8_e4m3fn)
    if use_ue8m0:
        s = torch.from_numpy(np.asarray(rows.packed_scales, np.int32).reshape(x.shape[0], -1))
    else:
        s = torch.from_numpy(np.asarray(rows.scales, np.float32).reshape(x.shape[0], H // 128))
    return rows, q, s


def ht_oracle(xs, idxs, ws, alignment=1):
    """xs: per-rank TokenRows (or BF16 tensors); -> per-rank HtDispatchOutput."""
    params = ref.HtDispatchParams()
    params.num_experts, params.topk, params.expert_alignment = E, K, alignment
    inputs = []
    for x, idx, w in zip(xs, idxs, ws):
        inp = ref.HtDispatchInput()
        inp.x = x if isinstance(x, ref.TokenRows) else ref.TokenRows.from_bf16(bits(x))
        inp.topk_idx = idx.numpy()
        if w is not None:
            inp.topk_weights = w.numpy()
        inputs.append(inp)
    return ref.ht_dispatch(params, inputs)


def expert_rows(recv_x, recv_idx, rank):
    """A toy expert whose result is the same bits on the CPU and the GPU: one float32 product, rounded."""
    count = (recv_idx >= 0).sum(dim=1, keepdim=True).float()
    return (recv_x.float() * (1 + count + rank)).to(torch.bfloat16)


def oracle_expert_rows(out, rank):
    n = out.handle.num_recv()
    x = bf16_from_bits(out.x.bf16, (n, H))
    idx = torch.from_numpy(np.asarray(out.topk_idx).reshape(n, K))
    return expert_rows(x, idx, rank)


def oracle_dequantized_rows(outs):
    """Every rank's received FP8 rows (the oracle's), dequantized with their per-128 scales, as BF16."""
    ys = []
    for o in outs:
        n = o.handle.num_recv()
        deq = torch.from_numpy(np.asarray(o.x.fp8).reshape(n, H)).view(torch.float8_e4m3fn).float()
        ys.append((deq * torch.from_numpy(np.asarray(o.x.scales).reshape(n, -1)).repeat_interleave(128, dim=1))
                  .to(torch.bfloat16))
    return ys


def ht_combine_oracle(outs, ys, with_weights=False, biases=None):
    cin = []
    for d, (o, y) in enumerate(zip(outs, ys)):
        c = ref.HtCombineInput()
        c.x = bits(y).reshape(-1)
        if with_weights:
            c.topk_weights = np.asarray(o.topk_weights, np.float32)
        if biases is not None:
            b0, b1 = biases[d]
            if b0 is not None:
                c.bias0 = bits(b0).reshape(-1)
            if b1 is not None:
                c.bias1 = bits(b1).reshape(-1)
        cin.append(c)
    return ref.ht_combine([o.handle for o in outs], cin, H)


def assert_combined(c, outs, combined, combined_w=None, ys=None):
    """combined (and combined_w, when given) bitwise as the oracle combines every rank's rows `ys` (default:
    the oracle's expert rows)."""
    if ys is None:
        ys = [oracle_expert_rows(o, d) for d, o in enumerate(outs)]
    want = ht_combine_oracle(outs, ys, with_weights=combined_w is not None)
    np.testing.assert_array_equal(bits(combined).reshape(-1), want[c.rank].x)
    if combined_w is not None:
        np.testing.assert_allclose(combined_w.cpu().numpy().reshape(-1), want[c.rank].topk_weights, rtol=1e-6)


def ll_oracle(xs, idxs, use_fp8, round_scale=False, use_ue8m0=False):
    params = ref.LlDispatchParams()
    params.num_experts, params.hidden, params.topk = E, H, K
    params.num_max_dispatch_tokens_per_rank = N_LL
    params.use_fp8, params.round_scale, params.use_ue8m0 = use_fp8, round_scale, use_ue8m0
    ins = []
    for x, idx in zip(xs, idxs):
        inp = ref.LlDispatchInput()
        inp.num_tokens, inp.x, inp.topk_idx = x.shape[0], bits(x).reshape(-1), idx.numpy()
        ins.append(inp)
    return ref.ll_dispatch(params, ins)


def ll_dequantize(recv):
    """[E_local, R*N, H] float32 of an LL dispatch's rows (BF16, or FP8 with f32 scales)."""
    if isinstance(recv, tuple):
        q, s = recv
        return q.float() * s.float().repeat_interleave(128, dim=2)
    return recv.float()


def ll_oracle_recv(out, use_fp8):
    slots = R * N_LL
    if use_fp8:
        q = torch.from_numpy(np.asarray(out.x.fp8).reshape(EL, slots, H)).view(torch.float8_e4m3fn)
        s = torch.from_numpy(np.asarray(out.x.scales, np.float32).reshape(EL, slots, H // 128))
        return q, s
    return bf16_from_bits(out.x.bf16, (EL, slots, H))


def check_ll_recv(recv, count, handle, out, use_fp8, use_ue8m0=False):
    """GPU LL dispatch outputs vs the oracle's, valid rows only."""
    exp_count = np.asarray(out.handle.recv_count)
    np.testing.assert_array_equal(count.cpu().numpy(), exp_count)
    slots = R * N_LL
    src_token = np.asarray(out.handle.src_token).reshape(EL, slots)
    begin = np.asarray(out.handle.range_begin).reshape(EL, R)
    cnt = np.asarray(out.handle.range_count).reshape(EL, R)
    src_info = handle.src_info.cpu().numpy()
    layout = handle.layout_range.cpu().numpy()
    for j in range(EL):
        n = exp_count[j]
        np.testing.assert_array_equal(src_info[j, :n], src_token[j, :n])
        np.testing.assert_array_equal(layout[j] & 0xFFFFFFFF, cnt[j])
        np.testing.assert_array_equal(layout[j] >> 32, np.where(cnt[j] > 0, begin[j], layout[j] >> 32))
        if use_fp8:
            q = recv[0][j, :n].cpu().view(torch.uint8).numpy()
            np.testing.assert_array_equal(q, np.asarray(out.x.fp8).reshape(EL, slots, H)[j, :n])
            s = recv[1][j, :n].cpu().numpy()
            if use_ue8m0:
                exp_s = np.asarray(out.x.packed_scales, np.int32).reshape(EL, slots, -1)[j, :n]
            else:
                exp_s = np.asarray(out.x.scales, np.float32).reshape(EL, slots, H // 128)[j, :n]
            np.testing.assert_array_equal(s, exp_s)
        else:
            np.testing.assert_array_equal(bits(recv[j, :n]), np.asarray(out.x.bf16).reshape(EL, slots, H)[j, :n])


def ll_combine_oracle(outs, ys, idxs, ws):
    cin = []
    for o, y, idx, w in zip(outs, ys, idxs, ws):
        c = ref.LlCombineInput()
        c.x, c.topk_idx, c.topk_weights = bits(y).reshape(-1), idx.numpy(), w.numpy()
        cin.append(c)
    return [bf16_from_bits(v, (-1, H)) for v in ref.ll_combine([o.handle for o in outs], cin)]


def ll_expert(recv, rank):
    return (ll_dequantize(recv) * (1 + rank)).to(torch.bfloat16)


def assert_close_bf16(got, want, tol=1e-2):
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol)


class Ctx:
    def __init__(self, rank, group):
        self.rank, self.group = rank, group
        self.dev = torch.device("cuda", rank)
        self.ht = [routing(r, T_HT) for r in range(R)]
        self.ll = [routing(r, T_LL, seed=300) for r in range(R)]
        self.deep = None  # deep_ep.Buffer sized for both paths
        self.direct = None  # expertlink.Buffer(direct_recv=True), grown by its first dispatch

    def mine(self, data):
        return tuple(t.to(self.dev) for t in data[self.rank])


CHECKS = []


def check(fn):
    CHECKS.append(fn.__name__)
    return fn


# ---- issue 8 ----------------------------------------------------------------------------------------------

@check
def snippet1_dispatch_combine_as_written(c):
    ns = {}
    exec(SNIPPET_1, ns)  # noqa: S102 (the user's text, verbatim)
    hidden_bytes = H * 2  # the literal, DeepEP-style byte count: far less than a dispatch needs
    buf = ns["get_buffer"](c.group, hidden_bytes)
    assert buf is ns["_buffer"] and buf.group is c.group and ns["get_buffer"](c.group, hidden_bytes) is buf
    x, idx, w = c.mine(c.ht)
    recv_x, recv_idx, recv_w, handle, event = ns["dispatch_forward"](x, idx, w, E)
    event.current_stream_wait()
    assert buf.num_grows == 1 and buf.num_nvl_bytes >= expertlink.Buffer.ht_size_hint(R, T_HT, H, K)
    outs = ht_oracle(*zip(*c.ht))
    exp = outs[c.rank]
    n = exp.handle.num_recv()
    np.testing.assert_array_equal(bits(recv_x).reshape(-1), exp.x.bf16)
    np.testing.assert_array_equal(recv_idx.cpu().numpy().reshape(-1), exp.topk_idx)
    np.testing.assert_array_equal(recv_w.cpu().numpy().reshape(-1), exp.topk_weights)
    assert handle.num_recv_tokens() == n
    assert handle.num_recv_tokens_per_expert() == list(exp.num_recv_tokens_per_expert)
    # The small MoE step: experts, then combine (with the weights) back to the tokens.
    y = expert_rows(recv_x, recv_idx, c.rank)
    combined, combined_w, event = buf.combine(y, handle, topk_weights=recv_w)
    assert_combined(c, outs, combined, combined_w)
    c.snippet1 = ns


@check
def simple_buffer_grows_with_unequal_tokens_and_keeps_old_handles(c):
    buf = c.snippet1["_buffer"]
    x, idx, w = c.mine(c.ht)
    old_recv, old_idx, _, old_handle, _ = buf.dispatch(x, idx, w, E)
    grows = buf.num_grows
    tokens = [T_HT + 80 * r for r in range(R)]  # 64 and 144: the larger rank sets the size on both
    data = [routing(r, tokens[r], seed=500) for r in range(R)]
    x2, idx2, w2 = c.mine(data)
    recv_x, recv_idx, recv_w, handle, _ = buf.dispatch(x2, idx2, w2, E)
    assert buf.num_grows == grows + 1 and buf.num_retired >= 1
    assert buf.num_nvl_bytes >= expertlink.Buffer.ht_size_hint(R, max(tokens), H, K)
    outs = ht_oracle(*zip(*data))
    np.testing.assert_array_equal(bits(recv_x).reshape(-1), outs[c.rank].x.bf16)
    # A handle made before the grow still combines, on its own (retired) window.
    old_outs = ht_oracle(*zip(*c.ht))
    combined, _, _ = buf.combine(expert_rows(old_recv, old_idx, c.rank), old_handle)
    want = ht_combine_oracle(old_outs, [oracle_expert_rows(o, d) for d, o in enumerate(old_outs)])
    np.testing.assert_array_equal(bits(combined).reshape(-1), want[c.rank].x)
    # Same token count again: no grow.
    buf.dispatch(x2, idx2, w2, E)
    assert buf.num_grows == grows + 1
    buf.release_retired()
    assert buf.num_retired == 0
    try:
        buf.combine(old_recv, old_handle)
        raise AssertionError("a handle of a released window was accepted")
    except expertlink.Error as e:
        assert "freed since" in str(e), str(e)


@check
def simple_buffer_fp8_input_and_bias(c):
    buf = c.snippet1["_buffer"]
    x, idx, w = c.ht[c.rank]
    casts = [fp8_cast(xr) for xr, _, _ in c.ht]
    _, q, s = casts[c.rank]
    (recv_q, recv_s), recv_idx, recv_w, handle, _ = buf.dispatch((q.to(c.dev), s.to(c.dev)), idx.to(c.dev),
                                                                  w.to(c.dev), E)
    outs = ht_oracle([cr[0] for cr in casts], [d[1] for d in c.ht], [d[2] for d in c.ht])
    exp = outs[c.rank]
    np.testing.assert_array_equal(recv_q.cpu().view(torch.uint8).numpy().reshape(-1), exp.x.fp8)
    np.testing.assert_array_equal(recv_s.cpu().numpy().reshape(-1), exp.x.scales)
    np.testing.assert_array_equal(recv_idx.cpu().numpy().reshape(-1), exp.topk_idx)
    # Combine with a bias (one tensor).
    y = (recv_q.float() * recv_s.repeat_interleave(128, dim=1)).to(torch.bfloat16)
    bias = torch.full((T_HT, H), 0.5, dtype=torch.bfloat16)
    combined, _, _ = buf.combine(y, handle, bias=bias.to(c.dev))
    want = ht_combine_oracle(outs, oracle_dequantized_rows(outs), biases=[(bias, None)] * R)
    assert_close_bf16(combined, bf16_from_bits(want[c.rank].x, (T_HT, H)))


@check
def snippet2_low_latency_as_written(c):
    ns = {"Buffer": expertlink.Buffer, "_buffer": None}  # what the first snippet's module provides
    exec(SNIPPET_2, ns)  # noqa: S102 (the user's text, verbatim)
    num_max_tokens = N_LL
    buf = ns["get_buffer"](c.group, num_max_tokens, H, E)  # num_max_tokens * hidden * num_experts bytes
    assert buf is ns["_buffer"] and buf.group is c.group and buf.num_nvl_bytes == 0
    x, idx, w = c.mine(c.ll)
    recv, count, handle, event, hook = ns["low_latency_dispatch"](x, idx, num_max_tokens, E)
    hook()  # not split: a no-op
    event.current_stream_wait()
    given = num_max_tokens * H * E
    need = expertlink.Buffer.ll_size_hint(R, N_LL, H, E)
    assert buf.num_grows == (1 if given < need else 0) and buf.num_rdma_bytes >= need
    outs = ll_oracle([d[0] for d in c.ll], [d[1] for d in c.ll], use_fp8=True)
    check_ll_recv(recv, count, handle, outs[c.rank], use_fp8=True)
    # The small MoE step: dequantize, expert, weighted combine back to the tokens.
    y = ll_expert(recv, c.rank)
    combined, event, hook = buf.low_latency_combine(y, idx, w, handle)
    hook()
    want = ll_combine_oracle(outs, [ll_expert(ll_oracle_recv(o, True), d) for d, o in enumerate(outs)],
                             [d[1] for d in c.ll], [d[2] for d in c.ll])
    assert_close_bf16(combined, want[c.rank])
    c.snippet2 = ns


# ---- deep_ep surface --------------------------------------------------------------------------------------

def deep(c):
    if c.deep is None:
        cfg = deep_ep.Buffer.get_dispatch_config(R)
        nvl = max(cfg.get_nvl_buffer_size_hint(H * 2, R), deep_ep.Buffer.get_combine_config(R)
                  .get_nvl_buffer_size_hint(H * 2, R))
        rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(N_LL, H, R, E)
        c.deep = deep_ep.Buffer(c.group, nvl, rdma, low_latency_mode=True, num_qps_per_rank=EL,
                                explicitly_destroy=True)
        assert c.deep.num_rdma_bytes >= rdma and c.deep.rank == c.rank and c.deep.group_size == R
    return c.deep


@check
def deep_ep_get_dispatch_layout(c):
    buf = deep(c)
    x, idx, w = c.mine(c.ht)
    idx = idx.to(deep_ep.topk_idx_t)
    per_rank, per_rdma, per_expert, in_rank, event = buf.get_dispatch_layout(
        idx, E, previous_event=buf.capture(), async_finish=True, allocate_on_comm_stream=True)
    assert per_rdma is None and event.event is not None
    event.current_stream_wait()
    lay = ref.get_dispatch_layout(c.ht[c.rank][1].numpy(), E, R)
    np.testing.assert_array_equal(per_rank.cpu().numpy(), lay.num_tokens_per_rank)
    np.testing.assert_array_equal(per_expert.cpu().numpy(), lay.num_tokens_per_expert)
    np.testing.assert_array_equal(in_rank.cpu().numpy().astype(np.uint8).reshape(-1), lay.is_token_in_rank)
    _, _, _, _, event = buf.get_dispatch_layout(idx, E)
    assert event.event is None  # not async: the current stream already waits


def deep_layout(buf, idx):
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    return dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


@check
def deep_ep_dispatch_bf16_alignment_config_and_cached(c):
    buf = deep(c)
    x, idx, w = c.mine(c.ht)
    rx, ri, rw, counts, handle, ev = buf.dispatch(x, topk_idx=idx, topk_weights=w, expert_alignment=4,
                                                  config=deep_ep.Buffer.get_dispatch_config(R), **deep_layout(buf, idx))
    exp = ht_oracle(*zip(*c.ht), alignment=4)[c.rank]
    np.testing.assert_array_equal(bits(rx).reshape(-1), exp.x.bf16)
    np.testing.assert_array_equal(ri.cpu().numpy().reshape(-1), exp.topk_idx)
    np.testing.assert_array_equal(rw.cpu().numpy().reshape(-1), exp.topk_weights)
    assert counts == list(exp.num_recv_tokens_per_expert) and all(n % 4 == 0 for n in counts)
    # Cached: the handle's routing, no top-k; DeepEP returns (recv_x, None, None, None, None, event).
    x2 = (x.float() * 2).to(torch.bfloat16)
    rx2, n1, n2, n3, n4, ev = buf.dispatch(x2, handle=handle)
    assert n1 is None and n2 is None and n3 is None and n4 is None
    cached = ref.ht_dispatch_cached(
        [o.handle for o in ht_oracle(*zip(*c.ht))],
        [ref.TokenRows.from_bf16(bits((xr.float() * 2).to(torch.bfloat16))) for xr, _, _ in c.ht])
    np.testing.assert_array_equal(bits(rx2).reshape(-1), cached[c.rank].bf16)


@check
def deep_ep_dispatch_fp8_and_ue8m0(c):
    buf = deep(c)
    _, idx, w = c.mine(c.ht)
    for round_scale, ue8m0 in ((False, False), (True, True)):
        casts = [fp8_cast(xr, round_scale, ue8m0) for xr, _, _ in c.ht]
        _, q, s = casts[c.rank]
        (rq, rs), ri, rw, counts, handle, _ = buf.dispatch((q.to(c.dev), s.to(c.dev)), topk_idx=idx, topk_weights=w,
                                                           **deep_layout(buf, idx))
        exp = ht_oracle([cr[0] for cr in casts], [d[1] for d in c.ht], [d[2] for d in c.ht])[c.rank]
        np.testing.assert_array_equal(rq.cpu().view(torch.uint8).numpy().reshape(-1), exp.x.fp8)
        got_s = rs.cpu().numpy().reshape(-1)
        np.testing.assert_array_equal(got_s, exp.x.packed_scales if ue8m0 else exp.x.scales)
        assert counts == list(exp.num_recv_tokens_per_expert)
        # Cached dispatch of an FP8 pair returns a pair.
        (cq, cs), _, _, _, _, _ = buf.dispatch((q.to(c.dev), s.to(c.dev)), handle=handle)
        torch.testing.assert_close(cq.view(torch.uint8), rq.view(torch.uint8))


@check
def deep_ep_combine_weights_and_bias_pair(c):
    buf = deep(c)
    x, idx, w = c.mine(c.ht)
    rx, ri, rw, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **deep_layout(buf, idx))
    y = expert_rows(rx, ri, c.rank)
    outs = ht_oracle(*zip(*c.ht))
    ys = [oracle_expert_rows(o, d) for d, o in enumerate(outs)]
    cx, cw, ev = buf.combine(y, handle, topk_weights=rw, config=deep_ep.Buffer.get_combine_config(R))
    want = ht_combine_oracle(outs, ys, with_weights=True)
    np.testing.assert_array_equal(bits(cx).reshape(-1), want[c.rank].x)
    np.testing.assert_allclose(cw.cpu().numpy().reshape(-1), want[c.rank].topk_weights, rtol=1e-6)
    biases = [(torch.full((T_HT, H), 0.25 * (r + 1), dtype=torch.bfloat16),
               torch.full((T_HT, H), -0.125, dtype=torch.bfloat16)) for r in range(R)]
    b0, b1 = (b.to(c.dev) for b in biases[c.rank])
    cx, cw, _ = buf.combine(y, handle, bias=(b0, b1))
    assert cw is None
    want = ht_combine_oracle(outs, ys, biases=biases)
    assert_close_bf16(cx, bf16_from_bits(want[c.rank].x, (T_HT, H)))


@check
def deep_ep_stream_arguments(c):
    buf = deep(c)
    assert buf.get_comm_stream() != torch.cuda.current_stream()
    x, idx, w = c.mine(c.ht)
    exp = ht_oracle(*zip(*c.ht))[c.rank]
    layout = deep_layout(buf, idx)
    # previous_event: x is written on another stream after a delay; only the event orders the dispatch after it.
    late = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        late.copy_(x)
        ready = deep_ep.EventOverlap(torch.cuda.Event())
        ready.event.record(side)
    rx, _, _, _, handle, ev = buf.dispatch(late, topk_idx=idx, topk_weights=w, previous_event=ready,
                                           async_finish=True, allocate_on_comm_stream=True, **layout)
    assert ev.event is not None
    ev.current_stream_wait()
    np.testing.assert_array_equal(bits(rx).reshape(-1), exp.x.bf16)
    # async_finish on combine, waited for with `with`.
    cx, _, ev = buf.combine(rx, handle, async_finish=True)
    with ev:
        pass
    cx_sync, _, ev_sync = buf.combine(rx, handle)
    assert ev_sync.event is None
    torch.testing.assert_close(cx, cx_sync)
    # previous_event from capture(), not async: the current stream waits by itself.
    rx3, _, _, _, _, ev = buf.dispatch(x, handle=handle, previous_event=buf.capture())
    assert ev.event is None
    torch.testing.assert_close(rx3, rx)
    torch.cuda.synchronize()
    side.synchronize()


@check
def deep_ep_num_worst_tokens_and_set_num_sms(c):
    buf = deep(c)
    x, idx, w = c.mine(c.ht)
    exp = ht_oracle(*zip(*c.ht))[c.rank]
    n = exp.handle.num_recv()
    worst = R * T_HT
    deep_ep.Buffer.set_num_sms(8)
    try:
        assert deep_ep.Buffer.get_dispatch_config(R).num_sms == 8
        rx, ri, rw, counts, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst,
                                                     **deep_layout(buf, idx))
    finally:
        deep_ep.Buffer.set_num_sms(0)
    assert rx.shape[0] == worst and counts == []
    torch.cuda.synchronize()
    handle.check_capacity()
    assert handle.num_recv_tokens() == n
    np.testing.assert_array_equal(bits(rx[:n]).reshape(-1), exp.x.bf16)
    np.testing.assert_array_equal(ri[:n].cpu().numpy().reshape(-1), exp.topk_idx)
    y = expert_rows(rx, ri, c.rank)
    y[n:] = 0
    cx, _, _ = buf.combine(y, handle)
    assert_combined(c, ht_oracle(*zip(*c.ht)), cx)


@check
def deep_ep_low_latency_dispatch_variants(c):
    buf = deep(c)
    x, idx, w = c.mine(c.ll)
    stats = torch.zeros((EL,), dtype=torch.int32, device=c.dev)
    for use_fp8, round_scale, ue8m0 in ((False, False, False), (True, False, False), (True, True, False),
                                        (True, True, True)):
        recv, count, handle, ev, hook = buf.low_latency_dispatch(
            x, idx, N_LL, E, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8, round_scale=round_scale,
            use_ue8m0=ue8m0)
        hook()
        outs = ll_oracle([d[0] for d in c.ll], [d[1] for d in c.ll], use_fp8, round_scale, ue8m0)
        check_ll_recv(recv, count, handle, outs[c.rank], use_fp8, ue8m0)
        src_info, layout_range, n, hidden, experts = handle  # DeepEP's handle tuple
        assert (n, hidden, experts) == (N_LL, H, E)
    torch.testing.assert_close(stats, 4 * count)


@check
def deep_ep_low_latency_hooks_async_zero_copy_out(c):
    buf = deep(c)
    x, idx, w = c.mine(c.ll)
    outs = ll_oracle([d[0] for d in c.ll], [d[1] for d in c.ll], True)
    want = ll_combine_oracle(outs, [ll_expert(ll_oracle_recv(o, True), d) for d, o in enumerate(outs)],
                             [d[1] for d in c.ll], [d[2] for d in c.ll])[c.rank]
    # Two split dispatches in flight, receive halves launched by the hooks.
    stats = torch.zeros((EL,), dtype=torch.int32, device=c.dev)
    a = buf.low_latency_dispatch(x, idx, N_LL, E, cumulative_local_expert_recv_stats=stats, return_recv_hook=True)
    b = buf.low_latency_dispatch(x, idx, N_LL, E, return_recv_hook=True)
    a[4]()
    b[4]()
    torch.testing.assert_close(stats, a[1])
    for recv, count, handle, _, _ in (a, b):
        check_ll_recv(recv, count, handle, outs[c.rank], True)
    # Combine: split with a hook; async_finish with an event; zero_copy; out=.
    ya = ll_expert(a[0], c.rank)
    out1, ev, hook = buf.low_latency_combine(ya, idx, w, a[2], return_recv_hook=True)
    hook()
    assert_close_bf16(out1, want)
    yb = ll_expert(b[0], c.rank)
    out2, ev, hook = buf.low_latency_combine(yb, idx, w, b[2], async_finish=True)
    assert ev.event is not None and ev.extra_tensors
    ev.current_stream_wait()
    hook()  # not split: a no-op
    assert_close_bf16(out2, want)
    recv, count, handle, ev, _ = buf.low_latency_dispatch(x, idx, N_LL, E, async_finish=True)
    with ev:
        pass
    check_ll_recv(recv, count, handle, outs[c.rank], True)
    zbuf = buf.get_next_low_latency_combine_buffer(handle)
    assert zbuf.shape == (EL, R * N_LL, H) and zbuf.dtype == torch.bfloat16
    zbuf.copy_(ll_expert(recv, c.rank))
    out = torch.empty((T_LL, H), dtype=torch.bfloat16, device=c.dev)
    out3, _, _ = buf.low_latency_combine(zbuf, idx, w, handle, zero_copy=True, out=out)
    assert out3.data_ptr() == out.data_ptr()
    assert_close_bf16(out3, want)
    buf.clean_low_latency_buffer(N_LL, H, E)


@check
def cuda_graph_capture_ht_worst_tokens_and_ll(c):
    """HT (num_worst_tokens: no host sync) and LL dispatch + combine captured once after a warm-up (which
    leaves the handles' device arrays allocated), replayed on fresh inputs, checked against the oracle."""
    buf = deep(c)
    x, idx, w = c.mine(c.ht)
    layout = deep_layout(buf, idx)
    static_x = x.clone()
    worst = R * T_HT

    def ht_step():
        rx, _, _, _, handle, _ = buf.dispatch(static_x, topk_idx=idx, topk_weights=w, num_worst_tokens=worst,
                                              **layout)
        cx, _, _ = buf.combine(rx, handle)
        return rx, cx, handle

    xl, idxl, wl = c.mine(c.ll)
    static_xl = xl.clone()

    def ll_step():
        recv, count, handle, _, _ = buf.low_latency_dispatch(static_xl, idxl, N_LL, E, use_fp8=False)
        out, _, _ = buf.low_latency_combine(recv, idxl, wl, handle)
        return recv, count, handle, out

    ht_step()
    ll_step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rx, cx, handle = ht_step()
        recv, count, lhandle, out = ll_step()
    for round_ in range(2):  # fresh inputs each replay (same routing)
        ht_data = [(routing(r, T_HT, seed=700 + round_)[0], c.ht[r][1], c.ht[r][2]) for r in range(R)]
        ll_data = [(routing(r, T_LL, seed=900 + round_)[0], c.ll[r][1], c.ll[r][2]) for r in range(R)]
        static_x.copy_(ht_data[c.rank][0].to(c.dev))
        static_xl.copy_(ll_data[c.rank][0].to(c.dev))
        graph.replay()
        torch.cuda.synchronize()
        exp = ht_oracle(*zip(*ht_data))[c.rank]
        n = exp.handle.num_recv()
        handle.check_capacity()
        np.testing.assert_array_equal(bits(rx[:n]).reshape(-1), exp.x.bf16)
        xr, idxr = ht_data[c.rank][0], c.ht[c.rank][1]
        times = sum(((idxr >= r * EL) & (idxr < (r + 1) * EL)).any(dim=1).float() for r in range(R))
        # Each token comes back once per rank it went to: x * that count, exactly (0 for a token sent nowhere).
        torch.testing.assert_close(cx.float().cpu(), (xr.float() * times[:, None]).to(torch.bfloat16).float(),
                                   rtol=0, atol=0)
        outs = ll_oracle([d[0] for d in ll_data], [d[1] for d in ll_data], use_fp8=False)
        check_ll_recv(recv, count, lhandle, outs[c.rank], use_fp8=False)
        want = ll_combine_oracle(outs, [ll_oracle_recv(o, False) for o in outs], [d[1] for d in ll_data],
                                 [d[2] for d in ll_data])
        assert_close_bf16(out, want[c.rank])


@check
def deep_ep_fixed_sizes_fail_with_the_bytes_needed(c):
    small = deep_ep.Buffer(c.group, 1024, 4096)
    x, idx, w = c.mine(c.ht)
    try:
        small.dispatch(x, topk_idx=idx, topk_weights=w, **deep_layout(small, idx))
        raise AssertionError("an HT dispatch into 1024 bytes did not fail")
    except expertlink.Error as e:
        assert "num_nvl_bytes >=" in str(e), str(e)
    xl, idxl, _ = c.mine(c.ll)
    try:
        small.low_latency_dispatch(xl, idxl, N_LL, E)
        raise AssertionError("an LL dispatch into 4096 bytes did not fail")
    except expertlink.Error as e:
        assert "ll_size_hint" in str(e) and str(expertlink.Buffer.ll_size_hint(R, N_LL, H, E)) in str(e), str(e)
    small.destroy()
    # The simple Buffer with grow=False behaves the same.
    fixed = expertlink.Buffer(c.group, 1024, 0, grow=False)
    try:
        fixed.dispatch(x, idx, w, E)
        raise AssertionError("dispatch into 1024 bytes with grow=False did not fail")
    except expertlink.Error as e:
        assert "num_nvl_bytes >=" in str(e), str(e)
    fixed.destroy()


# ---- direct dispatch and combine (direct_recv) ------------------------------------------------------------

def direct_buffer(c):
    if c.direct is None:
        c.direct = expertlink.Buffer(c.group, 0, 0, direct_recv=True)
    return c.direct


def oracle_rows(exp):
    """The oracle's received BF16 rows as [n, H] uint16 bit patterns."""
    return np.asarray(exp.x.bf16).reshape(exp.handle.num_recv(), H)


@check
def direct_bf16_dispatch_and_combine(c):
    buf = direct_buffer(c)
    x, idx, w = c.mine(c.ht)
    recv_x, recv_idx, recv_w, handle, event = buf.dispatch(x, idx, w, E)
    event.current_stream_wait()
    assert buf.num_grows == 1 and handle.direct
    assert buf.num_recv_bytes >= expertlink.Buffer.ht_recv_size_hint(R, T_HT, H)
    outs = ht_oracle(*zip(*c.ht))
    exp = outs[c.rank]
    n = exp.handle.num_recv()
    region = buf.get_direct_combine_buffer(handle)
    assert recv_x.shape == (n, H) and recv_x.dtype == torch.bfloat16
    assert region.shape == (n, H) and region.dtype == torch.bfloat16 and region.data_ptr() == recv_x.data_ptr()
    np.testing.assert_array_equal(bits(recv_x), oracle_rows(exp))  # every row
    np.testing.assert_array_equal(recv_idx.cpu().numpy().reshape(-1), exp.topk_idx)
    np.testing.assert_array_equal(recv_w.cpu().numpy().reshape(-1), exp.topk_weights)
    assert handle.num_recv_tokens_per_expert() == list(exp.num_recv_tokens_per_expert)
    # The expert reads recv_x into a new tensor first: the region (recv_x's memory) is written afterwards.
    y = expert_rows(recv_x, recv_idx, c.rank)
    region.copy_(y)
    combined, combined_w, _ = buf.combine(region, handle)
    assert combined_w is None
    assert_combined(c, outs, combined)


@check
def direct_fp8_dispatch_and_combine(c):
    buf = direct_buffer(c)
    _, idx, w = c.mine(c.ht)
    casts = [fp8_cast(xr) for xr, _, _ in c.ht]
    _, q, s = casts[c.rank]
    (rq, rs), ri, rw, handle, _ = buf.dispatch((q.to(c.dev), s.to(c.dev)), idx, w, E)
    outs = ht_oracle([cr[0] for cr in casts], [d[1] for d in c.ht], [d[2] for d in c.ht])
    exp = outs[c.rank]
    n = exp.handle.num_recv()
    region = buf.get_direct_combine_buffer(handle)
    assert rq.dtype == torch.float8_e4m3fn and rq.shape == (n, H) and rq.data_ptr() == region.data_ptr()
    assert rs.dtype == torch.float32 and rs.shape == (n, H // 128)  # scales: an ordinary tensor
    np.testing.assert_array_equal(rq.cpu().view(torch.uint8).numpy(), np.asarray(exp.x.fp8).reshape(n, H))
    np.testing.assert_array_equal(rs.cpu().numpy().reshape(-1), exp.x.scales)
    np.testing.assert_array_equal(ri.cpu().numpy().reshape(-1), exp.topk_idx)
    np.testing.assert_array_equal(rw.cpu().numpy().reshape(-1), exp.topk_weights)
    # Dequantized first (the BF16 view shares rq's bytes), then written for the direct combine.
    y = (rq.float() * rs.repeat_interleave(128, dim=1)).to(torch.bfloat16)
    region.copy_(y)
    combined, _, _ = buf.combine(region, handle)
    assert_combined(c, outs, combined, ys=oracle_dequantized_rows(outs))


@check
def direct_dispatch_num_worst_tokens(c):
    buf = direct_buffer(c)
    x, idx, w = c.mine(c.ht)
    outs = ht_oracle(*zip(*c.ht))
    exp = outs[c.rank]
    n = exp.handle.num_recv()
    worst = R * T_HT
    rx, ri, rw, handle, _ = buf.dispatch(x, idx, w, E, num_worst_tokens=worst)
    assert rx.shape == (worst, H) and handle.capacity_mode and handle.direct
    torch.cuda.synchronize()
    handle.check_capacity()
    assert handle.num_recv_tokens() == n
    np.testing.assert_array_equal(bits(rx[:n]), oracle_rows(exp))
    np.testing.assert_array_equal(ri[:n].cpu().numpy().reshape(-1), exp.topk_idx)
    np.testing.assert_array_equal(rw[:n].cpu().numpy().reshape(-1), exp.topk_weights)
    region = buf.get_direct_combine_buffer(handle)
    assert region.shape == (worst, H) and region.data_ptr() == rx.data_ptr()
    y = expert_rows(rx, ri, c.rank)
    y[n:] = 0
    region.copy_(y)
    cx, _, _ = buf.combine(region, handle)
    assert_combined(c, outs, cx)


@check
def direct_cached_dispatch(c):
    buf = direct_buffer(c)
    x, idx, w = c.mine(c.ht)
    rx, _, _, handle, _ = buf.dispatch(x, idx, w, E)
    x2 = (x.float() * 2).to(torch.bfloat16)
    rx2, n1, n2, handle2, _ = buf.dispatch(x2, handle=handle)
    assert n1 is None and n2 is None and handle2 is handle
    assert rx2.data_ptr() == rx.data_ptr()  # the same region (rx now holds the cached rows too)
    cached = ref.ht_dispatch_cached(
        [o.handle for o in ht_oracle(*zip(*c.ht))],
        [ref.TokenRows.from_bf16(bits((xr.float() * 2).to(torch.bfloat16))) for xr, _, _ in c.ht])
    n = handle.num_recv_tokens()
    want = np.asarray(cached[c.rank].bf16).reshape(n, H)
    np.testing.assert_array_equal(bits(rx2), want)
    # direct=False: the same cached rows into an ordinary tensor.
    rx3, _, _, _, _ = buf.dispatch(x2, handle=handle, direct=False)
    assert rx3.data_ptr() != rx2.data_ptr()
    np.testing.assert_array_equal(bits(rx3), want)


@check
def direct_combine_with_topk_weights(c):
    buf = direct_buffer(c)
    x, idx, w = c.mine(c.ht)
    rx, ri, rw, handle, _ = buf.dispatch(x, idx, w, E)
    region = buf.get_direct_combine_buffer(handle)
    region.copy_(expert_rows(rx, ri, c.rank))
    y = region.clone()
    outs = ht_oracle(*zip(*c.ht))
    # Direct, weights summed from the holders' staged copies.
    cx, cw, _ = buf.combine(region, handle, topk_weights=rw)
    assert_combined(c, outs, cx, cw)
    # The same rows from outside the region right after it (no dispatch between): an ordinary combine.
    cx, cw, _ = buf.combine(y, handle, topk_weights=rw)
    assert_combined(c, outs, cx, cw)


@check
def plain_dispatch_after_direct_matches_oracle(c):
    buf = direct_buffer(c)
    x, idx, w = c.mine(c.ht)
    outs = ht_oracle(*zip(*c.ht))
    exp = outs[c.rank]
    ys = [oracle_expert_rows(o, d) for d, o in enumerate(outs)]
    # A direct round trip, then a plain one (direct=False) on the same Buffer, then a direct one again.
    rx, ri, _, handle, _ = buf.dispatch(x, idx, w, E)
    region = buf.get_direct_combine_buffer(handle)
    region.copy_(expert_rows(rx, ri, c.rank))
    buf.combine(region, handle)
    px, pi, pw, phandle, _ = buf.dispatch(x, idx, w, E, direct=False)
    assert not phandle.direct and px.data_ptr() != region.data_ptr()
    np.testing.assert_array_equal(bits(px), oracle_rows(exp))
    np.testing.assert_array_equal(pi.cpu().numpy().reshape(-1), exp.topk_idx)
    np.testing.assert_array_equal(pw.cpu().numpy().reshape(-1), exp.topk_weights)
    cx, cw, _ = buf.combine(expert_rows(px, pi, c.rank), phandle, topk_weights=pw)
    want = ht_combine_oracle(outs, ys, with_weights=True)
    np.testing.assert_array_equal(bits(cx).reshape(-1), want[c.rank].x)
    np.testing.assert_allclose(cw.cpu().numpy().reshape(-1), want[c.rank].topk_weights, rtol=1e-6)
    rx2, ri2, _, handle2, _ = buf.dispatch(x, idx, w, E)
    assert handle2.direct
    np.testing.assert_array_equal(bits(rx2), oracle_rows(exp))
    region = buf.get_direct_combine_buffer(handle2)
    region.copy_(expert_rows(rx2, ri2, c.rank))
    cx, _, _ = buf.combine(region, handle2)
    np.testing.assert_array_equal(bits(cx).reshape(-1), ht_combine_oracle(outs, ys)[c.rank].x)


@check
def deep_ep_direct_fixed_size(c):
    cfg = deep_ep.Buffer.get_dispatch_config(R)
    recv_bytes = expertlink.Buffer.ht_recv_size_hint(R, T_HT, H)
    buf = deep_ep.Buffer(c.group, cfg.get_nvl_buffer_size_hint(H * 2, R), 0, direct_recv=True,
                         num_recv_bytes=recv_bytes)
    try:
        x, idx, w = c.mine(c.ht)
        rx, ri, rw, counts, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **deep_layout(buf, idx))
        outs = ht_oracle(*zip(*c.ht))
        exp = outs[c.rank]
        region = buf.get_direct_combine_buffer(handle)
        assert rx.data_ptr() == region.data_ptr() and counts == list(exp.num_recv_tokens_per_expert)
        np.testing.assert_array_equal(bits(rx), oracle_rows(exp))
        region.copy_(expert_rows(rx, ri, c.rank))
        cx, _, _ = buf.combine(region, handle)
        assert_combined(c, outs, cx)
        # Fixed size: more rows than the region holds fail before launching, giving the bytes needed.
        try:
            buf.dispatch(x, topk_idx=idx, topk_weights=w, num_worst_tokens=4 * R * T_HT, **deep_layout(buf, idx))
            raise AssertionError("a num_worst_tokens dispatch beyond the receive region did not fail")
        except expertlink.Error as e:
            assert "num_recv_bytes >=" in str(e), str(e)
    finally:
        buf.destroy()


@check
def destroy_buffers(c):
    if c.direct is not None:
        c.direct.destroy()
    deep(c).destroy()
    for ns in (getattr(c, "snippet1", None), getattr(c, "snippet2", None)):
        if ns is not None and ns["_buffer"] is not None:
            ns["_buffer"].destroy()
    try:
        c.deep.synchronize()
        raise AssertionError("a destroyed Buffer was usable")
    except expertlink.Error as e:
        assert "destroyed" in str(e)


# ---- the two processes ------------------------------------------------------------------------------------

def worker(rank, port, results):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=R,
                            device_id=torch.device("cuda", rank), timeout=datetime.timedelta(seconds=120))
    outcome = {}
    try:
        c = Ctx(rank, dist.group.WORLD)
        for name in CHECKS:
            try:
                globals()[name](c)
                torch.cuda.synchronize()
                outcome[name] = "ok"
            except Exception as e:  # recorded; the next check still runs
                tb = traceback.format_exc().splitlines()
                outcome[name] = f"{type(e).__name__}: {e}\n" + "\n".join(tb[-12:])
            dist.barrier()
    finally:
        results[rank] = outcome
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=R, join=True)
    return dict(results)


@pytest.mark.parametrize("name", CHECKS)
def test_check(outcomes, name):
    got = {rank: outcomes.get(rank, {}).get(name, "not run (the process ended before)") for rank in range(R)}
    assert got == {rank: "ok" for rank in range(R)}, "\n".join(f"rank {r}: {v}" for r, v in got.items())
