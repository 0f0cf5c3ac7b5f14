"""examples/moe_autograd.py: on 2 GPUs the example itself runs (its own processes; it checks gradients
against the single-device reference and that the loss goes down). Without GPUs its autograd plumbing runs on
the CPU with one rank and a loopback stand-in for the Buffer (dispatch and combine are identities there), so
the Functions' shapes, dtypes and gradient routing are checked against the same reference in CI wherever
torch is installed."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the autograd example needs it")

import expertlink  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "moe_autograd.py"


def load_example():
    spec = importlib.util.spec_from_file_location("moe_autograd_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LoopbackBuffer:
    """One rank holding every expert: dispatch and combine move nothing (the simple Buffer's return shapes)."""

    group = None
    num_grows = 1

    def __init__(self):
        self.calls = []

    def dispatch(self, x, topk_idx=None, topk_weights=None, num_experts=None, handle=None):
        self.calls.append("dispatch" if handle is None else "cached dispatch")
        assert x.dtype == torch.bfloat16 and x.is_contiguous()
        if handle is not None:
            return x.clone(), None, None, handle, expertlink.EventOverlap()
        assert topk_weights.dtype == torch.float32
        return x.clone(), topk_idx.clone(), topk_weights.clone(), ("handle", x.shape[0]), expertlink.EventOverlap()

    def combine(self, x, handle, topk_weights=None):
        self.calls.append("combine")
        assert x.dtype == torch.bfloat16 and x.shape[0] == handle[1]
        w = None if topk_weights is None else topk_weights.clone()
        return x.float().to(torch.bfloat16), w, expertlink.EventOverlap()


def test_autograd_plumbing_on_cpu_one_rank():
    example = load_example()
    buffer = LoopbackBuffer()
    lines = []
    losses = example.check_and_train(buffer, 0, 1, 8, torch.device("cpu"), lambda t: None, log=lines.append)
    assert "gradients match" in lines[0]
    assert losses[-1] < losses[0]
    # Forward: dispatch + combine; backward: cached dispatch (combine's) then combine (dispatch's).
    assert buffer.calls[:4] == ["dispatch", "combine", "cached dispatch", "combine"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs: the 2-rank run of examples/moe_autograd.py skipped")
def test_example_trains_on_two_gpus():
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    run = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "12", "--ranks", "2"], capture_output=True,
                         text=True, timeout=300, env=env)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "moe_autograd: OK" in out
    assert "gradients match the single-device reference" in out
