"""torch helpers shared by expertlink.buffer and expertlink.deep_ep: lazy import, tensor -> TensorView,
the communicator of a ProcessGroup, events. UNTESTED ON GPU as of 2026-11-28."""

from . import _C

_TORCH_MISSING = (
    "expertlink.Buffer needs PyTorch (import torch failed: {err}). Install torch with CUDA, or use "
    "expertlink._C (torch-free: raw device pointers) and expertlink.reference (CPU oracle)."
)


def require_torch():
    """Imports torch, or raises ImportError saying what needs it."""
    try:
        import torch  # noqa: PLC0415 (lazy on purpose)
    except ImportError as err:  # pragma: no cover - exercised where torch is absent
        raise ImportError(_TORCH_MISSING.format(err=err)) from err
    return torch


def invalid_argument(message):
    """An expertlink.Error with code invalid_argument, raised from Python-side checks."""
    err = _C.Error("invalid argument: " + message)
    err.code = _C.ErrorCode.invalid_argument
    return err


def dtype_name(dtype):
    torch = require_torch()
    names = {
        torch.bfloat16: "bf16",
        torch.float32: "f32",
        torch.int32: "i32",
        torch.int64: "i64",
        torch.uint8: "u8",
        torch.bool: "bool",
    }
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None:
        names[fp8] = "fp8_e4m3"
    if dtype not in names:
        raise invalid_argument(f"dtype {dtype} is not supported (bf16, float8_e4m3fn, f32, i32, i64, u8, bool)")
    return names[dtype]


def view(tensor, name="tensor"):
    """A TensorView of a CUDA tensor (undefined for None). The tensor must outlive the call using it."""
    if tensor is None:
        return _C.TensorView()
    if not tensor.is_cuda:
        raise invalid_argument(f"{name} must be a CUDA tensor, got device {tensor.device}")
    return _C.TensorView(tensor.data_ptr(), dtype_name(tensor.dtype), list(tensor.shape), list(tensor.stride()))


def current_stream_handle():
    torch = require_torch()
    return torch.cuda.current_stream().cuda_stream


def split_x(x):
    """x or (x_fp8, x_scales) -> (x, scales or None)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise invalid_argument("x must be a tensor or an (fp8 tensor, scales) pair")
        return x[0], x[1]
    return x, None


def make_communicator(group, adopt="split"):
    """The ExpertLink Communicator of a torch NCCL ProcessGroup.

    adopt="split" (default): ncclCommSplit of torch's communicator (separate lifetime); "borrow": torch's
    communicator as is; "unique_id": a fresh NCCL communicator, its id broadcast over the group (for torch
    builds without ``_comm_ptr``)."""
    torch = require_torch()
    import torch.distributed as dist  # noqa: PLC0415

    device = torch.cuda.current_device()
    if adopt in ("split", "borrow"):
        backend = group._get_backend(torch.device("cuda"))
        if hasattr(backend, "_comm_ptr"):
            ptr = backend._comm_ptr()
            if ptr == 0:
                # torch creates its communicator lazily: one collective makes it exist.
                dist.all_reduce(torch.zeros(1, device="cuda"), group=group)
                torch.cuda.synchronize()
                ptr = backend._comm_ptr()
            if ptr != 0:
                return _C.Communicator.adopt(ptr, split=(adopt == "split"))
        adopt = "unique_id"
    if adopt != "unique_id":
        raise invalid_argument(f"adopt = {adopt!r} must be 'split', 'borrow' or 'unique_id'")
    ids = [_C.Communicator.make_unique_id() if group.rank() == 0 else None]
    dist.broadcast_object_list(ids, src=dist.get_global_rank(group, 0), group=group)
    return _C.Communicator(ids[0], group.rank(), group.size(), device)


class EventOverlap:
    """DeepEP's EventOverlap: an optional CUDA event (torch.cuda.Event) and tensors kept alive with it.

    ``current_stream_wait()`` makes the current stream wait for the event; ``with event: ...`` runs the
    block and then waits (as DeepEP)."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    @classmethod
    def record(cls, extra_tensors=None):
        torch = require_torch()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return cls(event, extra_tensors)

    def current_stream_wait(self):
        if self.event is not None:
            require_torch().cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if self.event is not None:
            self.current_stream_wait()


def wait_previous(previous_event):
    if previous_event is not None:
        previous_event.current_stream_wait()


def finish_event(async_finish, tensors=None):
    """Every ExpertLink call runs on the caller's current stream, so an event recorded after it marks its end."""
    return EventOverlap.record(tensors) if async_finish else EventOverlap()


class _CudaArray:
    """__cuda_array_interface__ of raw device memory (int16 for BF16, viewed back as bfloat16); holds `owner`."""

    def __init__(self, data, shape, strides_elems, itemsize, typestr, owner):
        self.owner = owner
        self.__cuda_array_interface__ = {
            "data": (data, False),
            "shape": tuple(shape),
            "strides": tuple(s * itemsize for s in strides_elems),
            "typestr": typestr,
            "version": 3,
        }


def tensor_from_view(view_, owner):
    """A torch tensor over a TensorView's memory (BF16 only), keeping `owner` alive."""
    torch = require_torch()
    if view_.dtype != "bf16":
        raise invalid_argument(f"tensor_from_view handles bf16, got {view_.dtype}")
    arr = _CudaArray(view_.data, view_.shape, view_.strides, 2, "<i2", owner)
    return torch.as_tensor(arr, device="cuda").view(torch.bfloat16)
