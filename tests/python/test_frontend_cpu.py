"""CPU tests of the PyTorch front end's own logic (CI: no GPU, no torch needed): the simple Buffer's grow
decisions and size computations (issue 8's two snippets), DeepEP's argument rules checked before anything
runs, handle unpacking, Config and EventOverlap."""

import importlib.util

import pytest

import expertlink
import expertlink.deep_ep as deep_ep
from expertlink import _C, _core, _sizing
from expertlink._torch import check_stream_args

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def raises_invalid(match):
    return pytest.raises(expertlink.Error, match=match)


# ---- sizes and grow decisions ------------------------------------------------------------------------

def test_round_up_tokens_is_a_power_of_two_at_least_64():
    assert [_sizing.round_up_tokens(t) for t in (0, 1, 64, 65, 100, 128, 129, 4096, 5000)] == \
        [64, 64, 64, 128, 128, 128, 256, 4096, 8192]


def test_ht_grow_bytes_none_when_the_window_holds_the_call():
    need = _C.Buffer.ht_size_hint(2, 100, 7168, 8)
    assert _sizing.ht_bytes_needed(2, 100, 7168, 8) == need
    assert _sizing.ht_grow_bytes(need, 2, 100, 7168, 8) is None
    assert _sizing.ht_grow_bytes(need + 1000, 2, 100, 7168, 8) is None


def test_ht_grow_bytes_rounds_the_tokens_up_and_never_shrinks():
    need = _C.Buffer.ht_size_hint(2, 100, 7168, 8)
    assert _sizing.ht_grow_bytes(need - 1, 2, 100, 7168, 8) == _C.Buffer.ht_size_hint(2, 128, 7168, 8)
    big = _C.Buffer.ht_size_hint(2, 120, 7168, 16)  # more than the need, less than the rounded-up figure
    assert _sizing.ht_grow_bytes(big, 2, 120, 7168, 16) is None
    huge = _C.Buffer.ht_size_hint(2, 64, 7168, 32)  # larger top-k than the call: fits
    assert _sizing.ht_grow_bytes(huge, 2, 64, 7168, 8) is None


def test_ht_grow_bytes_of_the_first_snippet_literal_hidden_bytes():
    # Issue 8, snippet 1: Buffer(group, hidden_bytes, hidden_bytes) with hidden_bytes = hidden * 2.
    hidden, tokens, topk = 7168, 4096, 8
    hidden_bytes = hidden * 2
    target = _sizing.ht_grow_bytes(hidden_bytes, 8, tokens, hidden, topk)
    assert target == _C.Buffer.ht_size_hint(8, 4096, hidden, topk)
    assert target > 100 * hidden_bytes


def test_ht_grow_decision_from_the_allreduced_payload():
    payloads = [_sizing.ht_allreduce_payload(t, 256, 4) for t in (10, 70)]
    reduced = [max(col) for col in zip(*payloads)]
    assert reduced == [70, 256, 4, -256, -4, 0, 0, 0]
    # Every rank decides from the same numbers, whatever its own token count.
    for _ in payloads:
        assert _sizing.ht_grow_decision(0, 2, reduced, 256, 4) == _C.Buffer.ht_size_hint(2, 128, 256, 4)
    enough = _C.Buffer.ht_size_hint(2, 70, 256, 4)
    assert _sizing.ht_grow_decision(enough, 2, reduced, 256, 4) is None


def test_ht_grow_decision_refuses_different_shapes_on_every_rank():
    payloads = [_sizing.ht_allreduce_payload(8, h, 4) for h in (256, 512)]
    reduced = [max(col) for col in zip(*payloads)]
    for hidden in (256, 512):
        with raises_invalid("hidden from 256 to 512"):
            _sizing.ht_grow_decision(10**9, 2, reduced, hidden, 4)


def test_ll_grow_bytes_of_the_second_snippet():
    # Issue 8, snippet 2: num_rdma_bytes = num_max_tokens * hidden * num_experts.
    for n, hidden, experts, grows in [(128, 7168, 288, False), (64, 256, 16, True)]:
        given = n * hidden * experts
        need = _C.Buffer.ll_size_hint(2, n, hidden, experts)
        assert _sizing.ll_bytes_needed(2, n, hidden, experts) == need
        got = _sizing.ll_grow_bytes(given, 2, n, hidden, experts)
        assert got == (need if grows else None), (n, hidden, experts, given, need)
        assert (given < need) == grows


def test_check_ht_fits_gives_the_bytes_needed():
    from expertlink.buffer import check_ht_fits

    need = _C.Buffer.ht_size_hint(2, 64, 256, 4)
    check_ht_fits(need, 2, 64, 256, 4)
    with raises_invalid(f"needs num_nvl_bytes >= {need}") as info:
        check_ht_fits(512, 2, 64, 256, 4)
    assert info.value.code == expertlink.ErrorCode.invalid_argument


# ---- direct dispatch: the receive region's size and grow decision ----------------------------------------

def test_ht_recv_bytes_needed_is_the_size_hint_of_every_row():
    assert _sizing.ht_recv_bytes_needed(2, 100, 7168) == _C.Buffer.ht_recv_size_hint(2, 100, 7168) == 2 * 100 * 7168 * 2
    assert expertlink.Buffer.ht_recv_size_hint(2, 100, 7168) == _C.Buffer.ht_recv_size_hint(2, 100, 7168)
    # num_worst_tokens beyond R * T: the region holds that many rows (R * ceil(worst / R) >= worst).
    assert _sizing.recv_tokens(2, 100, 0) == 100 and _sizing.recv_tokens(2, 100, 201) == 101
    assert _sizing.recv_tokens(2, 100, 150) == 100
    assert _sizing.ht_recv_bytes_needed(2, 100, 256, 201) == _C.Buffer.ht_recv_size_hint(2, 101, 256) >= 201 * 256 * 2


def test_ht_recv_grow_bytes_rounds_up_and_never_shrinks():
    need = _C.Buffer.ht_recv_size_hint(2, 100, 256)
    assert _sizing.ht_recv_grow_bytes(need, 2, 100, 256) is None
    assert _sizing.ht_recv_grow_bytes(need - 1, 2, 100, 256) == _C.Buffer.ht_recv_size_hint(2, 128, 256)
    assert _sizing.ht_recv_grow_bytes(0, 2, 10, 256) == _C.Buffer.ht_recv_size_hint(2, 64, 256)
    assert _sizing.ht_recv_grow_bytes(0, 2, 10, 256, num_worst_tokens=300) == _C.Buffer.ht_recv_size_hint(2, 256, 256)
    assert _sizing.ht_recv_grow_bytes(need, 2, 100, 256, num_worst_tokens=201) is not None  # 201 rows > 200


def test_ht_recv_grow_decision_only_for_direct_dispatches():
    payloads = [_sizing.ht_allreduce_payload(t, 256, 4, worst, direct=True) for t, worst in ((10, 0), (70, 300))]
    reduced = [max(col) for col in zip(*payloads)]
    assert reduced == [70, 256, 4, -256, -4, 300, 1, -1]
    for _ in payloads:  # every rank: the same decision, from the largest token count and num_worst_tokens
        assert _sizing.ht_recv_grow_decision(0, 2, reduced, 256, 4) == _C.Buffer.ht_recv_size_hint(2, 256, 256)
        assert _sizing.ht_grow_decision(0, 2, reduced, 256, 4) == _C.Buffer.ht_size_hint(2, 128, 256, 4)
    enough = _C.Buffer.ht_recv_size_hint(2, 150, 256)
    assert _sizing.ht_recv_grow_decision(enough, 2, reduced, 256, 4) is None
    plain = [max(col) for col in zip(*[_sizing.ht_allreduce_payload(t, 256, 4, 300) for t in (10, 70)])]
    assert _sizing.ht_recv_grow_decision(0, 2, plain, 256, 4) is None  # not direct: no region needed


def test_ranks_that_disagree_on_direct_dispatch_are_refused_on_every_rank():
    payloads = [_sizing.ht_allreduce_payload(8, 256, 4, direct=d) for d in (True, False)]
    reduced = [max(col) for col in zip(*payloads)]
    for _ in payloads:
        with raises_invalid("disagree on direct dispatch .recv_x placement."):
            _sizing.ht_grow_decision(10**9, 2, reduced, 256, 4)
        with raises_invalid("disagree on direct dispatch"):
            _sizing.ht_recv_grow_decision(10**9, 2, reduced, 256, 4)


def test_check_ht_recv_fits_gives_the_bytes_needed():
    from expertlink.buffer import check_ht_recv_fits

    need = _C.Buffer.ht_recv_size_hint(2, 64, 256)
    check_ht_recv_fits(need, 2, 64, 256)
    with raises_invalid(rf"needs num_recv_bytes >= {need} \(Buffer.ht_recv_size_hint\(2, 64, 256\)\)"):
        check_ht_recv_fits(need - 1, 2, 64, 256)
    worst = _C.Buffer.ht_recv_size_hint(2, 100, 256)
    with raises_invalid(rf"num_worst_tokens 200, needs num_recv_bytes >= {worst}"):
        check_ht_recv_fits(need, 2, 64, 256, num_worst_tokens=200)


def test_direct_recv_constructor_rules():
    check_direct_recv_args = _core.check_direct_recv_args
    check_direct_recv_args(False, 0, True)
    check_direct_recv_args(True, 0, True)  # grows from nothing
    check_direct_recv_args(True, 4096, False)
    with raises_invalid("num_recv_bytes = -1 must be >= 0"):
        check_direct_recv_args(True, -1, True)
    with raises_invalid("pass direct_recv=True too"):
        check_direct_recv_args(False, 4096, True)
    with raises_invalid("does not grow needs num_recv_bytes > 0 .*ht_recv_size_hint"):
        check_direct_recv_args(True, 0, False)


class FakeWindow:
    """A C++ Buffer stand-in with a receive region starting at `start` (ht_window_recv_x), or none."""

    def __init__(self, start=None, rows=1024):
        self.start, self.rows = start, rows

    def ht_window_recv_x(self, dtype, hidden):
        if self.start is None:
            raise _C.Error("invalid argument: ht_window_recv_x: this Buffer has no receive region")
        return expertlink.TensorView(self.start, dtype, [self.rows, hidden])


class FakeTensor:
    def __init__(self, ptr, shape=(4, 128)):
        self.ptr, self.shape = ptr, shape

    def data_ptr(self):
        return self.ptr


def direct_buffer(cls, start=0x10000):
    b = unconstructed(cls)
    b.direct_recv, b.num_recv_bytes, b._gens, b._gen = True, 1 << 20, {0: FakeWindow(start)}, 0
    return b


def test_direct_mode_per_call():
    b = direct_buffer(expertlink.Buffer)
    assert b._direct_mode(None) is True and b._direct_mode(False) is False and b._direct_mode(True) is True
    h = fake_ht_handle()
    assert b._direct_mode(None, h) is False  # a cached dispatch does what the handle's dispatch did
    h.direct = True
    assert b._direct_mode(None, h) is True
    plain = unconstructed(expertlink.Buffer)
    plain.direct_recv = False
    assert plain._direct_mode(None) is False
    with raises_invalid("direct=True needs a Buffer made with direct_recv=True"):
        plain._direct_mode(True)
    with raises_invalid("direct=True needs a Buffer made with direct_recv=True"):
        plain.dispatch(object(), object(), None, 8, direct=True)


def test_get_direct_combine_buffer_rules():
    plain = unconstructed(expertlink.Buffer)
    plain.direct_recv = False
    with raises_invalid("needs a Buffer made with direct_recv=True"):
        plain.get_direct_combine_buffer(fake_ht_handle())
    b = direct_buffer(deep_ep.Buffer)
    with raises_invalid("handle must come from an HT dispatch"):
        b.get_direct_combine_buffer(None)
    with raises_invalid("made by another Buffer"):
        b.get_direct_combine_buffer(fake_ht_handle())


# ---- DeepEP's argument rules, before anything runs ---------------------------------------------------

def test_ll_dispatch_argument_rules():
    ok = dict(use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False, return_recv_hook=False,
              use_per_tensor_quantization=False, static_scale=None)
    _core.check_ll_dispatch_args(2, 128, 16, **ok)
    with raises_invalid("not a positive multiple of the 2 ranks"):
        _core.check_ll_dispatch_args(2, 128, 15, **ok)
    with raises_invalid("num_max_dispatch_tokens_per_rank = 0"):
        _core.check_ll_dispatch_args(2, 0, 16, **ok)
    with raises_invalid("use_ue8m0=True needs use_fp8=True and round_scale=True"):
        _core.check_ll_dispatch_args(2, 128, 16, **dict(ok, use_ue8m0=True))
    _core.check_ll_dispatch_args(2, 128, 16, **dict(ok, use_ue8m0=True, round_scale=True))
    with raises_invalid("async_finish and return_recv_hook"):
        _core.check_ll_dispatch_args(2, 128, 16, **dict(ok, async_finish=True, return_recv_hook=True))
    with pytest.raises(expertlink.Error, match="per_tensor") as info:
        _core.check_ll_dispatch_args(2, 128, 16, **dict(ok, use_per_tensor_quantization=True))
    assert info.value.code == expertlink.ErrorCode.unsupported


def fake_ht_handle():
    return _core.HtHandle(_C.HtHandle(), owner=None, generation=0, num_tokens=4, hidden=128, topk=2, num_experts=8,
                          capacity_mode=False)


def test_ht_dispatch_argument_rules():
    x = object()  # a tensor stand-in: the rules look at which arguments are given, not at tensors
    assert _core.check_ht_dispatch_args(x, fake_ht_handle(), None, None, None, None) is True
    assert _core.check_ht_dispatch_args(x, None, x, x, None, 8) is False
    assert _core.check_ht_dispatch_args((x, x), None, None, None, x, None) is False
    with raises_invalid("cached dispatch .* takes no topk_idx"):
        _core.check_ht_dispatch_args(x, fake_ht_handle(), x, None, None, None)
    with raises_invalid("handle must come from an HT dispatch"):
        _core.check_ht_dispatch_args(x, ("a", "tuple"), None, None, None, None)
    with raises_invalid("needs topk_idx .*or a handle"):
        _core.check_ht_dispatch_args(x, None, None, None, None, 8)
    with raises_invalid("needs num_experts"):
        _core.check_ht_dispatch_args(x, None, x, None, None, None)
    with raises_invalid("topk_weights needs topk_idx"):
        _core.check_ht_dispatch_args(x, None, None, x, x, None)
    with raises_invalid("an .FP8 tensor, scales. pair"):
        _core.check_ht_dispatch_args((x, x, x), None, x, None, None, 8)


def test_stream_argument_rules():
    check_stream_args(None, True, False)
    check_stream_args(deep_ep.EventOverlap(), False, True)
    with raises_invalid("allocate_on_comm_stream=True needs previous_event"):
        check_stream_args(None, False, True)
    with raises_invalid("previous_event must be an EventOverlap"):
        check_stream_args(42, False, False)


def unconstructed(cls):
    """A Buffer object without a window (its checks run before any GPU use)."""
    b = object.__new__(cls)
    b.group_size, b.rank, b._gens, b._gen, b._comm = 2, 0, {}, None, None
    b.direct_recv, b.num_recv_bytes = False, 0
    return b


def test_deep_ep_dispatch_rules_before_gpu_use():
    b = unconstructed(deep_ep.Buffer)
    x = object()
    with raises_invalid("fresh dispatch needs num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert"):
        b.dispatch(x, topk_idx=x, topk_weights=x)
    with raises_invalid("takes no topk_idx"):
        b.dispatch(x, handle=fake_ht_handle(), topk_idx=x)
    with raises_invalid("allocate_on_comm_stream=True needs previous_event"):
        b.dispatch(x, handle=fake_ht_handle(), allocate_on_comm_stream=True)
    with raises_invalid("handle must come from an HT dispatch"):
        b.combine(x, handle=None)
    with raises_invalid("handle must come from low_latency_dispatch"):
        b.low_latency_combine(x, x, x, handle=fake_ht_handle())
    with raises_invalid("async_finish and return_recv_hook"):
        b.low_latency_dispatch(x, x, 128, 16, async_finish=True, return_recv_hook=True)
    with pytest.raises(expertlink.Error, match="get_local_buffer_tensor"):
        b.get_local_buffer_tensor(None)


def test_simple_buffer_dispatch_rules_before_gpu_use():
    b = unconstructed(expertlink.Buffer)
    x = object()
    with raises_invalid("needs num_experts"):
        b.dispatch(x, x, x)
    with raises_invalid("bias must be a tensor or a pair"):
        b.combine(x, fake_ht_handle(), bias=(x, x, x))
    with raises_invalid("num_max_dispatch_tokens_per_rank = -1"):
        b.low_latency_dispatch(x, x, -1, 16)


def test_handle_of_another_buffer_is_refused():
    b = unconstructed(expertlink.Buffer)
    with raises_invalid("made by another Buffer"):
        b._buffer_of(fake_ht_handle())
    h = fake_ht_handle()
    h._owner = b
    with raises_invalid("generation 0, freed since"):
        b._buffer_of(h)


def test_ll_handle_unpacks_like_deep_ep():
    h = _core.LlHandle(_C.LlHandle(), None, 0, "src_info", "layout_range", 128, 7168, 288)
    src_info, layout_range, n, hidden, experts = h
    assert (src_info, layout_range, n, hidden, experts) == ("src_info", "layout_range", 128, 7168, 288)
    assert len(h) == 5 and h[2] == 128 and h[-1] == 288


def test_recv_hook_without_a_split_call_is_a_no_op():
    hook = _core.RecvHook()
    hook()
    hook()


# ---- Config, EventOverlap, topk_idx_t ----------------------------------------------------------------

@pytest.mark.parametrize("num_ranks", [2, 4, 8, 16])
def test_configs_for_any_rank_count(num_ranks):
    deep_ep.Buffer.set_num_sms(24)
    try:
        for cfg in (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks)):
            assert isinstance(cfg, deep_ep.Config) and cfg.num_sms == 24
            assert cfg.get_nvl_buffer_size_hint(7168 * 2, num_ranks) == _C.Buffer.ht_size_hint(num_ranks, 4096, 7168,
                                                                                               32)
            assert cfg.get_rdma_buffer_size_hint(7168 * 2, num_ranks) == 0
            assert "num_sms=24" in repr(cfg)
    finally:
        deep_ep.Buffer.set_num_sms(0)
    assert deep_ep.Buffer.get_dispatch_config(2).num_max_nvl_chunked_send_tokens == 24


def test_set_num_sms_is_per_front_end_and_checked():
    expertlink.Buffer.set_num_sms(16)
    try:
        assert expertlink.Buffer.num_sms == 16 and deep_ep.Buffer.num_sms == 0
    finally:
        expertlink.Buffer.set_num_sms(0)
    with raises_invalid("num_sms = -2"):
        deep_ep.Buffer.set_num_sms(-2)


def test_event_overlap_without_event():
    ev = deep_ep.EventOverlap(None, extra_tensors=("t",))
    assert ev.extra_tensors == ("t",)
    with ev as inner:
        assert inner is ev
    ev.current_stream_wait()


def test_deep_ep_static_surface():
    assert deep_ep.Buffer.is_sm90_compiled()
    assert callable(deep_ep.Buffer.capture)
    for name in ["get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine",
                 "get_next_low_latency_combine_buffer", "clean_low_latency_buffer", "capture", "set_num_sms",
                 "get_dispatch_config", "get_combine_config", "get_low_latency_rdma_size_hint", "get_comm_stream",
                 "destroy", "get_direct_combine_buffer"]:
        assert callable(getattr(deep_ep.Buffer, name)), name
    with pytest.raises(AttributeError):
        deep_ep.no_such_name  # noqa: B018


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: topk_idx_t is a torch dtype")
def test_topk_idx_t_is_int64():
    import torch

    assert deep_ep.topk_idx_t == torch.int64
    from expertlink.deep_ep import topk_idx_t  # noqa: F401 (from-import goes through the module __getattr__)


def test_dead_handles_go_back_to_the_pool_of_their_window():
    b = unconstructed(expertlink.Buffer)
    b._pools, b._gen, b._comm = {}, 3, object()
    c_handle = _C.HtHandle()
    h = _core.HtHandle(c_handle, owner=b, generation=3, num_tokens=4, hidden=128, topk=2, num_experts=8,
                       capacity_mode=False)
    del h
    assert b._take_handle("ht") is c_handle  # reused: its device arrays are already there
    assert b._take_handle("ht") is not c_handle  # pool empty: a fresh one
    old = _core.LlHandle(_C.LlHandle(), b, 2, None, None, 1, 128, 8)  # a retired window's handle
    del old
    assert not b._pools.get(("ll", 2))
    for _ in range(20):
        _core.LlHandle(_C.LlHandle(), b, 3, None, None, 1, 128, 8)
    assert len(b._pools[("ll", 3)]) == b._POOL_LIMIT
    b._comm = None  # destroyed: nothing is kept
    _core.LlHandle(_C.LlHandle(), b, 3, None, None, 1, 128, 8)
    assert len(b._pools[("ll", 3)]) == b._POOL_LIMIT
