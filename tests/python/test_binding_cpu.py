"""CPU tests of the Python package (CI: no GPU, no torch): the binding imports, the oracle through the
binding matches numpy recomputations, errors map to expertlink.Error with their code, and argument checks
that happen before any GPU use raise."""

import importlib.util

import numpy as np
import pytest

import expertlink
import expertlink.deep_ep as deep_ep
from expertlink import _C

ref = expertlink.reference
HAVE_TORCH = importlib.util.find_spec("torch") is not None


# ---- numpy recomputations of the oracle's numerics -------------------------------------------------

def np_bf16_to_float(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def np_float_to_bf16(x):
    bits = x.astype(np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FFF), rounded)


def np_e4m3_table():
    b = np.arange(256)
    s = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 7
    v = np.where(e == 0, 2.0**-6 * m / 8, 2.0 ** (e - 7) * (1 + m / 8)) * s
    v[[0x7F, 0xFF]] = np.nan
    return v.astype(np.float32)


def test_bf16_conversions_match_numpy():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(4096).astype(np.float32) * 100,
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-40], np.float32)])
    np.testing.assert_array_equal(ref.float_to_bf16(x), np_float_to_bf16(x))
    bits = np.arange(0, 65536, 7, dtype=np.uint16)
    np.testing.assert_array_equal(ref.bf16_to_float(bits).view(np.uint32), np_bf16_to_float(bits).view(np.uint32))


def test_bf16_conversion_keeps_shape():
    x = np.ones((3, 5), np.float32)
    assert ref.float_to_bf16(x).shape == (3, 5)


def test_e4m3_to_float_matches_table():
    got = ref.e4m3_to_float(np.arange(256, dtype=np.uint8))
    np.testing.assert_array_equal(got, np_e4m3_table())  # NaN == NaN for assert_array_equal


def test_float_to_e4m3_round_trips_every_finite_value():
    table = np_e4m3_table()
    finite = np.array([b for b in range(256) if not np.isnan(table[b]) and b != 0x80], np.uint8)
    np.testing.assert_array_equal(ref.float_to_e4m3(table[finite]), finite)


def test_float_to_e4m3_saturates_and_rounds_to_nearest():
    sat = ref.float_to_e4m3(np.array([1000.0, -1000.0, np.inf, -np.inf, np.nan], np.float32))
    np.testing.assert_array_equal(sat, [0x7E, 0xFE, 0x7E, 0xFE, 0x7F])
    table = np_e4m3_table()
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(2000) * 50).astype(np.float32)
    q = ref.float_to_e4m3(x)
    finite = table[~np.isnan(table)]
    best = np.abs(x[:, None] - finite[None, :]).min(axis=1)
    np.testing.assert_array_equal(np.abs(x - table[q]), best)


@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_cast_to_fp8_matches_numpy(round_scale, use_ue8m0):
    rng = np.random.default_rng(3)
    rows, hidden = 5, 640
    x = np_float_to_bf16(rng.standard_normal((rows, hidden)).astype(np.float32) * 3)
    x[1, :128] = 0  # an all-zero group: amax floored at 1e-4
    got = ref.cast_to_fp8(x, round_scale, use_ue8m0)
    assert got.rows == rows and got.hidden == hidden
    xf = np_bf16_to_float(x).reshape(rows, hidden // 128, 128)
    sf = (np.maximum(np.abs(xf).max(axis=2), np.float32(1e-4)) / np.float32(448.0)).astype(np.float32)
    if round_scale:
        bits = sf.view(np.uint32)
        bits = np.where(bits & 0x7FFFFF, ((bits >> 23) + 1) << 23, bits).astype(np.uint32)
        sf = bits.view(np.float32)
    q = ref.float_to_e4m3((xf / sf[:, :, None]).astype(np.float32)).reshape(rows, hidden)
    np.testing.assert_array_equal(got.fp8.reshape(rows, hidden), q)
    if use_ue8m0:
        assert got.format == ref.RowFormat.fp8_ue8m0
        exps = (sf.view(np.uint32) >> 23).astype(np.uint32)
        words = ref.ue8m0_words_per_row(hidden)
        padded = np.zeros((rows, words * 4), np.uint32)
        padded[:, : hidden // 128] = exps
        packed = (padded.reshape(rows, words, 4) << np.array([0, 8, 16, 24], np.uint32)).sum(axis=2)
        np.testing.assert_array_equal(got.packed_scales.view(np.uint32).reshape(rows, words), packed)
    else:
        assert got.format == ref.RowFormat.fp8
        np.testing.assert_array_equal(got.scales.reshape(rows, -1), sf)
    deq = got.dequantize()
    assert deq.shape == (rows, hidden)
    assert np.all(np.abs(deq - xf.reshape(rows, hidden)) <= np.abs(xf.reshape(rows, hidden)) / 16 + 1e-2)


# ---- layout, HT and LL oracle vs numpy --------------------------------------------------------------

def make_topk(rng, tokens, topk, num_experts):
    idx = np.array([rng.permutation(num_experts)[:topk] for _ in range(tokens)], np.int64).reshape(tokens, topk)
    idx[rng.random(idx.shape) < 0.15] = -1
    return idx


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_get_dispatch_layout_matches_numpy(dtype):
    rng = np.random.default_rng(4)
    R, E, T, K = 4, 32, 50, 6
    idx = make_topk(rng, T, K, E).astype(dtype)
    got = ref.get_dispatch_layout(idx, E, R)
    in_rank = np.zeros((T, R), np.uint8)
    per_expert = np.zeros(E, np.int32)
    for t in range(T):
        for e in set(int(v) for v in idx[t] if v >= 0):
            in_rank[t, e // (E // R)] = 1
            per_expert[e] += 1
    np.testing.assert_array_equal(got.is_token_in_rank.reshape(T, R), in_rank)
    np.testing.assert_array_equal(got.num_tokens_per_expert, per_expert)
    np.testing.assert_array_equal(got.num_tokens_per_rank, in_rank.sum(axis=0))


def ht_case(R=3, E=12, K=4, H=64, tokens=(7, 0, 9), seed=5):
    rng = np.random.default_rng(seed)
    inputs, raw = [], []
    for r in range(R):
        T = tokens[r]
        x = np_float_to_bf16(rng.standard_normal((T, H)).astype(np.float32))
        idx = make_topk(rng, T, K, E)
        w = np.where(idx >= 0, rng.random((T, K)) + 0.25, 0).astype(np.float32)
        inp = ref.HtDispatchInput()
        inp.x = ref.TokenRows.from_bf16(x)
        inp.topk_idx, inp.topk_weights = idx, w
        inputs.append(inp)
        raw.append((x, idx, w))
    params = ref.HtDispatchParams()
    params.num_experts, params.topk, params.expert_alignment = E, K, 1
    return params, inputs, raw


def test_ht_dispatch_and_combine_match_numpy():
    R, E, K, H = 3, 12, 4, 64
    params, inputs, raw = ht_case(R, E, K, H)
    outs = ref.ht_dispatch(params, inputs)
    assert len(outs) == R
    el = E // R
    for d, out in enumerate(outs):
        rows, src = [], []
        for s, (x, idx, w) in enumerate(raw):
            for t in range(x.shape[0]):
                if any(v >= 0 and v // el == d for v in idx[t]):
                    rows.append(x[t])
                    src.append((s, t))
        n = len(rows)
        assert out.handle.num_recv() == n
        got = out.x.bf16.reshape(n, H)
        if n:
            np.testing.assert_array_equal(got, np.stack(rows))
        np.testing.assert_array_equal(out.handle.recv_src_rank, [s for s, _ in src])
        np.testing.assert_array_equal(out.handle.recv_src_token, [t for _, t in src])
        exp_idx = np.array([[v - d * el if v >= 0 and v // el == d else -1 for v in raw[s][1][t]] for s, t in src],
                           np.int64).reshape(n, K)
        np.testing.assert_array_equal(out.topk_idx.reshape(n, K), exp_idx)
        exp_w = np.array([raw[s][2][t] for s, t in src], np.float32).reshape(n, K) * (exp_idx >= 0)
        np.testing.assert_array_equal(out.topk_weights.reshape(n, K), exp_w)
        counts = [int(((exp_idx == j).any(axis=1)).sum()) for j in range(el)]
        np.testing.assert_array_equal(out.num_recv_tokens_per_expert, counts)

    # Combine: expert outputs = received rows scaled by (d + 1); each token sums over its ranks.
    handles = [o.handle for o in outs]
    cin = []
    for d, o in enumerate(outs):
        c = ref.HtCombineInput()
        n = o.handle.num_recv()
        c.x = np_float_to_bf16(np_bf16_to_float(o.x.bf16) * (d + 1))
        c.topk_weights = o.topk_weights
        cin.append(c)
    comb = ref.ht_combine(handles, cin, H)
    for s, (x, idx, w) in enumerate(raw):
        T = x.shape[0]
        acc = np.zeros((T, H), np.float32)
        for d, o in enumerate(outs):
            y = np_bf16_to_float(cin[d].x).reshape(-1, H)
            for i, (rs, rt) in enumerate(zip(o.handle.recv_src_rank, o.handle.recv_src_token)):
                if rs == s:
                    acc[rt] += y[i]
        np.testing.assert_array_equal(comb[s].x.reshape(T, H), np_float_to_bf16(acc))
        np.testing.assert_allclose(comb[s].topk_weights.reshape(T, K), w, rtol=1e-6)

    cached = ref.ht_dispatch_cached(handles, [i.x for i in inputs])
    for d, o in enumerate(outs):
        np.testing.assert_array_equal(cached[d].bf16, o.x.bf16)


def test_ll_dispatch_and_combine_match_numpy():
    rng = np.random.default_rng(6)
    R, E, K, H, N = 2, 8, 3, 256, 6
    params = ref.LlDispatchParams()
    params.num_experts, params.hidden, params.topk, params.num_max_dispatch_tokens_per_rank = E, H, K, N
    params.use_fp8 = False
    ins, raw = [], []
    for r in range(R):
        T = [5, 6][r]
        x = np_float_to_bf16(rng.standard_normal((T, H)).astype(np.float32))
        idx = make_topk(rng, T, K, E)
        inp = ref.LlDispatchInput()
        inp.num_tokens, inp.x, inp.topk_idx = T, x, idx
        ins.append(inp)
        raw.append((x, idx, np.where(idx >= 0, rng.random((T, K)), 0).astype(np.float32)))
    outs = ref.ll_dispatch(params, ins)
    el = E // R
    for d, o in enumerate(outs):
        counts = [sum(int((idx == d * el + j).any(axis=1).sum()) for _, idx, _ in raw) for j in range(el)]
        np.testing.assert_array_equal(o.handle.recv_count, counts)
        x = o.x.bf16.reshape(el, R * N, H)
        src_rank = o.handle.src_rank.reshape(el, R * N)
        src_token = o.handle.src_token.reshape(el, R * N)
        for j in range(el):
            for slot in range(counts[j]):
                np.testing.assert_array_equal(x[j, slot], raw[src_rank[j, slot]][0][src_token[j, slot]])
    cin = []
    for d, o in enumerate(outs):
        c = ref.LlCombineInput()
        c.x, c.topk_idx, c.topk_weights = o.x.bf16, raw[d][1], raw[d][2]
        cin.append(c)
    comb = ref.ll_combine([o.handle for o in outs], cin)
    for s, (x, idx, w) in enumerate(raw):
        exp = np.zeros((x.shape[0], H), np.float32)
        for t in range(x.shape[0]):
            for k in range(K):
                if idx[t, k] >= 0:
                    exp[t] += np.float32(w[t, k]) * np_bf16_to_float(x[t])
        got = np_bf16_to_float(comb[s]).reshape(-1, H)
        np.testing.assert_allclose(got, exp, rtol=1e-2, atol=1e-2)


# ---- errors and argument checks before any GPU use ---------------------------------------------------

@pytest.mark.parametrize("code", list(_C.ErrorCode.__members__.values()) if hasattr(_C.ErrorCode, "__members__")
                         else list(_C.ErrorCode))
def test_error_maps_with_code(code):
    with pytest.raises(expertlink.Error) as info:
        _C._raise_for_test(code, "rank 1 did something")
    assert info.value.code == code
    assert "rank 1 did something" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_oracle_invalid_argument_names_the_value():
    with pytest.raises(expertlink.Error, match=r"topk_idx\[0\]\[1\] = 9") as info:
        ref.get_dispatch_layout(np.array([[0, 9]], np.int64), 4, 2)
    assert info.value.code == expertlink.ErrorCode.invalid_argument
    with pytest.raises(expertlink.Error, match="not a multiple of num_ranks"):
        ref.get_dispatch_layout(np.array([[0, 1]], np.int64), 5, 2)


def test_tensor_view_construction_and_checks():
    v = expertlink.TensorView(4096, "bf16", [4, 8])
    assert v.defined and v.shape == [4, 8] and v.strides == [8, 1] and v.dtype == "bf16"
    assert "bf16[4, 8]" in v.describe()
    t = expertlink.TensorView(4096, "float32", [4, 8], [1, 4])
    assert t.strides == [1, 4] and not t.is_contiguous()
    assert not expertlink.TensorView().defined
    assert expertlink.TensorView(0, "i64", [0, 8]).numel() == 0
    for args, msg in [((16, "f16", [2]), "dtype 'f16'"), ((16, "bf16", [1, 1, 1, 1, 1]), "1 to 4 dimensions"),
                      ((16, "bf16", [2, 2], [1]), "1 strides for 2 dimensions"), ((0, "bf16", [2]), "data = 0"),
                      ((16, "bf16", [-1]), "negative")]:
        with pytest.raises(expertlink.Error, match=msg) as info:
            expertlink.TensorView(*args)
        assert info.value.code == expertlink.ErrorCode.invalid_argument


def test_size_hints_and_their_checks():
    ht = _C.Buffer.ht_size_hint(2, 4096, 7168, 8)
    assert ht > 2 * 4096 * 7168 * 2  # at least the BF16 rows, both areas
    assert _C.Buffer.ht_size_hint(1, 4096, 7168, 8) == 0  # one rank: nothing leaves it
    assert _C.Buffer.ll_size_hint(2, 128, 7168, 288) > 0
    assert expertlink.Buffer.ht_size_hint(2, 4096, 7168, 8) == ht
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 2, 288) == _C.Buffer.ll_size_hint(2, 128, 7168, 288)
    with pytest.raises(expertlink.Error, match="ht_size_hint"):
        _C.Buffer.ht_size_hint(0, 1, 1, 1)
    # Direct dispatch's receive region: every row that may arrive, BF16 (which covers FP8), one rank included.
    assert _C.Buffer.ht_recv_size_hint(2, 4096, 7168) == 2 * 4096 * 7168 * 2
    assert _C.Buffer.ht_recv_size_hint(1, 10, 128) == 10 * 128 * 2
    assert expertlink.Buffer.ht_recv_size_hint(8, 100, 256) == 8 * 100 * 256 * 2
    with pytest.raises(expertlink.Error, match=r"ht_recv_size_hint\(num_ranks = 2, max_tokens_per_rank = -1"):
        _C.Buffer.ht_recv_size_hint(2, -1, 128)


def test_buffer_binding_takes_a_receive_region():
    assert "ht_recv_bytes" in _C.Buffer.__init__.__doc__
    assert "ht_window_recv_x" in dir(_C.Buffer) and "dtype" in _C.Buffer.ht_window_recv_x.__doc__


def test_communicator_arguments_checked_before_gpu_use():
    with pytest.raises(expertlink.Error, match="unique id is 128 bytes"):
        _C.Communicator(b"short", 0, 2, 0)
    with pytest.raises(expertlink.Error, match="num_ranks = 0"):
        _C.Communicator(bytes(128), 0, 0, 0)
    with pytest.raises(expertlink.Error, match="rank = 3"):
        _C.Communicator(bytes(128), 3, 2, 0)
    with pytest.raises(expertlink.Error, match="lazily") as info:
        _C.Communicator.adopt(0)
    assert info.value.code == expertlink.ErrorCode.invalid_argument


def test_argument_structs_round_trip():
    a = _C.HtDispatchArgs()
    assert not a.x.defined and a.expert_alignment == 1 and a.num_sms == 0
    a.x = expertlink.TensorView(4096, "bf16", [3, 128])
    assert a.x.shape == [3, 128]
    o = _C.LlDispatchOptions()
    assert o.use_fp8 and not o.return_recv_hook
    assert not _C.HtHandle().valid and not _C.LlHandle().valid and not _C.LlRecvHook().valid


def test_deep_ep_surface():
    cfg = deep_ep.Buffer.get_dispatch_config(8)
    assert isinstance(cfg, deep_ep.Config)
    assert cfg.get_nvl_buffer_size_hint(7168 * 2, 8) == _C.Buffer.ht_size_hint(8, 4096, 7168, 32)
    assert cfg.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    for name in ["get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine",
                 "get_next_low_latency_combine_buffer", "clean_low_latency_buffer", "capture", "set_num_sms",
                 "get_dispatch_config", "get_combine_config", "get_low_latency_rdma_size_hint"]:
        assert callable(getattr(deep_ep.Buffer, name)), name
    ev = deep_ep.EventOverlap()
    with ev:
        pass
    ev.current_stream_wait()  # no event: nothing to wait for, no torch needed
    deep_ep.Buffer.set_num_sms(24)
    assert deep_ep.Buffer.get_combine_config(2).num_sms == 24
    deep_ep.Buffer.set_num_sms(0)


@pytest.mark.skipif(HAVE_TORCH, reason="torch is installed: the missing-torch message cannot be checked")
def test_buffer_without_torch_says_so():
    with pytest.raises(ImportError, match="needs PyTorch"):
        expertlink.Buffer(None, 1, 1)
    with pytest.raises(ImportError, match="needs PyTorch"):
        deep_ep.topk_idx_t
