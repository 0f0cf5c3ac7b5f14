"""A Mixture-of-Experts layer trained through ExpertLink on 2 GPUs, with autograd across ranks.

Dispatch and combine are torch.autograd.Functions that share one handle: the backward of dispatch is a
combine of the gradients along the dispatch's handle (the token-row gradients are summed back to their
source tokens, the top-k weight gradients too), and the backward of combine is a cached dispatch of the
output gradient along the same handle. The buffer is issue 8's first snippet as written: it is created with
a literal `hidden_bytes` and grows itself on the first dispatch.

The script checks the gradients of the first step (experts, gate, input) against a single-GPU reference that
computes the same layer for every rank's tokens without any communication (all parameters and data come
from seeds, so each rank can rebuild them), then trains a few steps and checks that the loss goes down.

    python examples/moe_autograd.py [--steps 12] [--ranks 2]

Prints one line per step from rank 0 and "moe_autograd: OK" at the end; exits non-zero on failure.
"""

import argparse
import os
import socket
import sys

import torch

HIDDEN, NUM_EXPERTS, TOPK = 256, 8, 2


def tokens_of(rank):
    return 96 + 32 * rank  # ranks hold different token counts


def rank_data(rank, device):
    """Input tokens (BF16, [T, H]) and regression targets of one rank, from a seed."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn((tokens_of(rank), HIDDEN), generator=g).to(torch.bfloat16)
    teacher = torch.randn((HIDDEN, HIDDEN), generator=torch.Generator().manual_seed(7)) / HIDDEN ** 0.5
    target = 0.5 * torch.tanh(x.float() @ teacher)
    return x.to(device), target.to(device)


def initial_parameters(device):
    """Gate [H, E] and all experts' weights [E, H, H] (float32), the same on every rank."""
    g = torch.Generator().manual_seed(42)
    gate = torch.randn((HIDDEN, NUM_EXPERTS), generator=g) / HIDDEN ** 0.5
    experts = torch.randn((NUM_EXPERTS, HIDDEN, HIDDEN), generator=g) / HIDDEN ** 0.5
    return gate.to(device), experts.to(device)


# ---- the layer --------------------------------------------------------------------------------------------

class Dispatch(torch.autograd.Function):
    """(x, topk_idx, topk_weights) -> (recv_x, recv_topk_idx, recv_topk_weights); the handle goes to `box`."""

    @staticmethod
    def forward(ctx, buffer, box, x, topk_idx, topk_weights, num_experts):
        recv_x, recv_idx, recv_w, handle, _ = buffer.dispatch(x, topk_idx, topk_weights, num_experts)
        ctx.buffer, ctx.handle = buffer, handle
        box["handle"] = handle
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_idx, grad_recv_w):
        # Rows back to their sources, summed per token; the weight gradients ride along.
        grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x.to(torch.bfloat16).contiguous(), ctx.handle,
                                               topk_weights=grad_recv_w.float().contiguous())
        return None, None, grad_x, None, grad_w, None


class Combine(torch.autograd.Function):
    """Expert outputs [N_recv, H] -> [T, H] along a dispatch's handle."""

    @staticmethod
    def forward(ctx, buffer, y, handle):
        combined, _, _ = buffer.combine(y, handle)
        ctx.buffer, ctx.handle = buffer, handle
        return combined

    @staticmethod
    def backward(ctx, grad_out):
        # The output gradient goes to every rank that computed a part of the token: a cached dispatch.
        grad_y, _, _, _, _ = ctx.buffer.dispatch(grad_out.to(torch.bfloat16).contiguous(), handle=ctx.handle)
        return None, grad_y, None


def route(x, gate):
    logits = x.float() @ gate
    values, topk_idx = logits.topk(TOPK, dim=1)
    return topk_idx, values.softmax(dim=1)


def local_experts(recv_x, recv_idx, recv_w, weights):
    """Each received row: sum over the local experts j it chose of weight * tanh(row @ W_j), in float32,
    returned in BF16 (what combine takes). Every expert runs on every row (tiny sizes); rows that did not
    choose j get weight 0 there."""
    xf = recv_x.float()
    y = torch.zeros_like(xf)
    for j in range(weights.shape[0]):
        w_j = (recv_w * (recv_idx == j)).sum(dim=1)
        y = y + w_j[:, None] * torch.tanh(xf @ weights[j])
    return y.to(torch.bfloat16)


def moe_forward(buffer, x, gate, weights):
    """The distributed layer: route, dispatch, local experts, combine. -> [T, H] BF16."""
    topk_idx, topk_w = route(x, gate)
    box = {}
    recv_x, recv_idx, recv_w = Dispatch.apply(buffer, box, x, topk_idx, topk_w, NUM_EXPERTS)
    y = local_experts(recv_x, recv_idx, recv_w, weights)
    return Combine.apply(buffer, y, box["handle"])


def loss_of(out, target):
    return ((out.float() - target) ** 2).mean()


def reference_loss(xs, targets, gate, experts, num_ranks):
    """The same layer for every rank's tokens on one device, no communication. Rounds where the distributed
    layer rounds: one BF16 partial per (token, destination rank), summed in float32, rounded to BF16."""
    local = NUM_EXPERTS // num_ranks
    total = 0
    for x, target in zip(xs, targets):
        topk_idx, topk_w = route(x, gate)
        out = torch.zeros((x.shape[0], HIDDEN), dtype=torch.float32, device=x.device)
        for d in range(num_ranks):
            part = torch.zeros_like(out)
            for k in range(TOPK):
                mine = (topk_idx[:, k] // local == d).float() * topk_w[:, k]
                y_k = torch.tanh(torch.einsum("th,thg->tg", x.float(), experts[topk_idx[:, k]]))
                part = part + mine[:, None] * y_k
            out = out + part.to(torch.bfloat16).float()
        total = total + loss_of(out.to(torch.bfloat16), target)
    return total


def close(name, got, want, rtol=3e-2):
    """Relative error of the whole tensor (BF16 gradients of BF16 activations: ~1e-2 is the noise)."""
    err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {rtol} (|want| = {want.float().norm():.3e})")
    return float(err)


def check_and_train(buffer, rank, num_ranks, steps, device, all_reduce, log=print):
    """The work of one rank. all_reduce(tensor) sums over the ranks in place (identity for one rank)."""
    gate0, experts0 = initial_parameters(device)
    local = NUM_EXPERTS // num_ranks
    gate = gate0.clone().requires_grad_()
    weights = experts0[rank * local:(rank + 1) * local].clone().requires_grad_()
    x, target = rank_data(rank, device)
    x = x.clone().requires_grad_()

    # 1. Gradients of one step against the single-device reference.
    loss = loss_of(moe_forward(buffer, x, gate, weights), target)
    loss.backward()
    total = loss.detach().clone()
    all_reduce(total)
    all_reduce(gate.grad)
    xs, targets = zip(*(rank_data(r, device) for r in range(num_ranks)))
    xs = [t.clone().requires_grad_() for t in xs]
    ref_gate, ref_experts = gate0.clone().requires_grad_(), experts0.clone().requires_grad_()
    ref = reference_loss(xs, targets, ref_gate, ref_experts, num_ranks)
    ref.backward()
    errs = [close("loss", total, ref.detach(), rtol=1e-2),
            close("expert weights grad", weights.grad, ref_experts.grad[rank * local:(rank + 1) * local]),
            close("gate grad", gate.grad, ref_gate.grad),
            close("input grad", x.grad, xs[rank].grad)]
    log(f"rank {rank}: gradients match the single-device reference (relative errors "
        + ", ".join(f"{e:.1e}" for e in errs) + ")")

    # 2. A few training steps; the loss (summed over ranks) goes down.
    gate.grad = weights.grad = None
    optimizer = torch.optim.Adam([gate, weights], lr=3e-3)
    x = x.detach()
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = loss_of(moe_forward(buffer, x, gate, weights), target)
        loss.backward()
        all_reduce(gate.grad)  # the gate is replicated: sum its gradient over the ranks
        optimizer.step()
        total = loss.detach().clone()
        all_reduce(total)
        losses.append(float(total))
        if rank == 0:
            log(f"step {step}: loss {losses[-1]:.5f}")
    if not losses[-1] < 0.9 * losses[0]:
        raise AssertionError(f"loss did not go down: {losses}")
    return losses


# ---- two processes, one GPU each ----------------------------------------------------------------------

_buffer = None


def get_buffer(group, hidden_bytes):  # issue 8's first snippet, as written
    global _buffer
    from expertlink import Buffer

    if _buffer is None or _buffer.group != group:
        _buffer = Buffer(group, hidden_bytes, hidden_bytes)
    return _buffer


def worker(rank, num_ranks, steps, port, results):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_ranks,
                            device_id=torch.device("cuda", rank))
    try:
        buffer = get_buffer(dist.group.WORLD, HIDDEN * 2)
        check_and_train(buffer, rank, num_ranks, steps, torch.device("cuda", rank),
                        lambda t: dist.all_reduce(t, group=dist.group.WORLD))
        if buffer.num_grows < 1:
            raise AssertionError("the buffer made with hidden_bytes did not grow")
        torch.cuda.synchronize()
        buffer.destroy()
        results[rank] = "ok"
    except BaseException as e:  # reported by the parent
        results[rank] = f"{type(e).__name__}: {e}"
        raise
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.device_count() < args.ranks:
        print(f"moe_autograd: needs {args.ranks} CUDA GPUs", file=sys.stderr)
        return 2
    import torch.multiprocessing as mp

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    try:
        mp.spawn(worker, args=(args.ranks, args.steps, port, results), nprocs=args.ranks, join=True)
    except Exception as e:  # a rank failed: its message is in results
        print(f"moe_autograd: FAILED: {dict(results) or e}", file=sys.stderr)
        return 1
    if dict(results) != {r: "ok" for r in range(args.ranks)}:
        print(f"moe_autograd: FAILED: {dict(results)}", file=sys.stderr)
        return 1
    print("moe_autograd: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
