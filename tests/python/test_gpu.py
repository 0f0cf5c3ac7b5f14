"""GPU tests of the Python front end: 2 ranks via torch.multiprocessing, results vs the CPU oracle.

UNTESTED ON GPU as of 2026-11-28 (written without GPU access). Skips, with the reason, without torch or
without 2 CUDA GPUs. Covers issue 8's two snippets (simple Buffer: dispatch/combine, low_latency_dispatch/
low_latency_combine) and the deep_ep surface (get_dispatch_layout, dispatch, cached dispatch, combine)."""

import os
import socket

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
R, E, K, H, T = 2, 16, 4, 256, 64


def routing(rank):
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int64)
    x = torch.randn((T, H), generator=g).to(torch.bfloat16)
    w = (torch.rand((T, K), generator=g) + 0.25).float()
    return x, idx, w


def bits(t):  # BF16 tensor -> uint16 numpy bit patterns
    return t.cpu().view(torch.int16).numpy().view(np.uint16)


def oracle_ht():
    params = ref.HtDispatchParams()
    params.num_experts, params.topk, params.expert_alignment = E, K, 1
    inputs = []
    for r in range(R):
        x, idx, w = routing(r)
        inp = ref.HtDispatchInput()
        inp.x = ref.TokenRows.from_bf16(bits(x))
        inp.topk_idx, inp.topk_weights = idx.numpy(), w.numpy()
        inputs.append(inp)
    return ref.ht_dispatch(params, inputs)


def worker(rank, port, results):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=R,
                            device_id=torch.device("cuda", rank))
    try:
        group = dist.group.WORLD
        x, idx, w = (t.cuda() for t in routing(rank))
        exp = oracle_ht()[rank]
        n = exp.handle.num_recv()

        # Snippet 1 (issue 8): simple Buffer, dispatch + combine.
        buf = expertlink.Buffer(group, expertlink.Buffer.ht_size_hint(R, T, H, K),
                                expertlink.Buffer.ll_size_hint(R, T, H, E))
        assert buf.group is group
        recv_x, recv_idx, recv_w, handle, event = buf.dispatch(x, idx, w, E)
        event.current_stream_wait()
        assert recv_x.shape == (n, H)
        np.testing.assert_array_equal(bits(recv_x).reshape(-1), exp.x.bf16)
        np.testing.assert_array_equal(recv_idx.cpu().numpy().reshape(-1), exp.topk_idx)
        np.testing.assert_array_equal(recv_w.cpu().numpy().reshape(-1), exp.topk_weights)
        assert handle.num_recv_tokens_per_expert() == list(exp.num_recv_tokens_per_expert)
        combined, combined_w, _ = buf.combine(recv_x, handle, recv_w)
        # Each token comes back once per rank it went to.
        times = torch.zeros(T, device="cuda")
        for r in range(R):
            times += ((idx >= r * (E // R)) & (idx < (r + 1) * (E // R))).any(dim=1).float()
        torch.testing.assert_close(combined.float(), x.float() * times[:, None], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(combined_w, w)

        # Too few bytes: fails before launching, naming the bytes needed.
        small = expertlink.Buffer(group, 1024, 0)
        try:
            small.dispatch(x, idx, w, E)
            raise AssertionError("dispatch into 1024 bytes did not fail")
        except expertlink.Error as e:
            assert "num_nvl_bytes >=" in str(e), str(e)

        # Snippet 2: low latency (BF16 and FP8), combine vs the oracle.
        for use_fp8 in (False, True):
            recv, count, lh, event, hook = buf.low_latency_dispatch(x, idx, T, E, use_fp8=use_fp8)
            hook()
            params = ref.LlDispatchParams()
            params.num_experts, params.hidden, params.topk = E, H, K
            params.num_max_dispatch_tokens_per_rank, params.use_fp8 = T, use_fp8
            ins = []
            for r in range(R):
                xr, ir, _ = routing(r)
                inp = ref.LlDispatchInput()
                inp.num_tokens, inp.x, inp.topk_idx = T, bits(xr), ir.numpy()
                ins.append(inp)
            lexp = ref.ll_dispatch(params, ins)[rank]
            np.testing.assert_array_equal(count.cpu().numpy(), lexp.handle.recv_count)
            y = (recv[0].float() * recv[1].repeat_interleave(128, dim=2)).to(torch.bfloat16) if use_fp8 else recv
            out, _, hook = buf.low_latency_combine(y, idx, w, lh)
            hook()
            expected = (x.float()[:, None, :] * w[:, :, None]).sum(dim=1)
            tol = 0.15 if use_fp8 else 2e-2
            torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)

        # deep_ep surface: layout, dispatch (6-tuple), cached dispatch, combine.
        dbuf = deep_ep.Buffer(group, deep_ep.Buffer.get_dispatch_config(R).get_nvl_buffer_size_hint(H * 2, R), 0)
        per_rank, per_rdma, per_expert, in_rank, _ = dbuf.get_dispatch_layout(idx, E)
        lay = ref.get_dispatch_layout(idx.cpu().numpy(), E, R)
        np.testing.assert_array_equal(per_rank.cpu().numpy(), lay.num_tokens_per_rank)
        np.testing.assert_array_equal(per_expert.cpu().numpy(), lay.num_tokens_per_expert)
        assert per_rdma is None
        rx, ri, rw, counts, h2, ev = dbuf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert, topk_idx=idx,
                                                   topk_weights=w, async_finish=True)
        with ev:
            pass
        np.testing.assert_array_equal(bits(rx).reshape(-1), exp.x.bf16)
        assert counts == list(exp.num_recv_tokens_per_expert)
        rx2, none1, none2, none3, _, _ = dbuf.dispatch(x, handle=h2)
        assert none1 is None and none2 is None and none3 is None
        torch.testing.assert_close(rx2, rx)
        cx, _, _ = dbuf.combine(rx, h2)
        torch.testing.assert_close(cx.float(), x.float() * times[:, None], rtol=1e-2, atol=1e-2)
        torch.cuda.synchronize()
        results[rank] = "ok"
    except Exception as e:  # reported by the parent
        results[rank] = f"{type(e).__name__}: {e}"
        raise
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_against_the_oracle():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=R, join=True)
    assert dict(results) == {0: "ok", 1: "ok"}, dict(results)
