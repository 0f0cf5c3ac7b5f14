"""torch helpers shared by expertlink.buffer and expertlink.deep_ep: lazy import, tensor -> TensorView,
the communicator of a ProcessGroup, events and DeepEP's stream rules (StreamPlan)."""

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


def unsupported(message):
    """An expertlink.Error with code unsupported: a DeepEP feature ExpertLink does not have."""
    err = _C.Error("unsupported: " + message)
    err.code = _C.ErrorCode.unsupported
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
    """DeepEP's EventOverlap: an optional CUDA event (a torch.cuda.Event) and tensors kept alive with it.

    ``current_stream_wait()`` makes the current stream wait for the event (nothing to wait for without one;
    DeepEP asserts there instead); ``with event: ...`` runs the block, then the current stream waits.
    ``extra_tensors`` hold what the call still uses on another stream (DeepEP's CUDA-graph-friendly stand-in
    for record_stream): keep the EventOverlap until the stream has waited."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    @classmethod
    def record(cls, stream=None, extra_tensors=None):
        """An event recorded now on `stream` (default: the current stream)."""
        torch = require_torch()
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream())
        return cls(event, extra_tensors)

    def current_stream_wait(self):
        if self.event is not None:
            require_torch().cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if self.event is not None:
            self.current_stream_wait()


def check_stream_args(previous_event, async_finish, allocate_on_comm_stream):
    """DeepEP's rules, checked before anything runs (no torch needed)."""
    if previous_event is not None and not isinstance(previous_event, EventOverlap) and \
            not hasattr(previous_event, "event"):
        raise invalid_argument(f"previous_event must be an EventOverlap (e.g. Buffer.capture()), got "
                               f"{type(previous_event).__name__}")
    if allocate_on_comm_stream and previous_event is None:
        raise invalid_argument("allocate_on_comm_stream=True needs previous_event (as DeepEP: the outputs are "
                               "allocated on the communication stream, which then waits for that event only)")


class StreamPlan:
    """Where one HT call runs, with DeepEP's semantics:

    - the communication stream waits for ``previous_event`` if given, else for the current stream;
    - outputs are allocated on the communication stream with ``allocate_on_comm_stream`` (else on the
      current stream);
    - the kernels run on the communication stream;
    - ``async_finish``: an event recorded on the communication stream is returned, the current stream does
      not wait, and the tensors the call touched are record_stream'ed so the caching allocator keeps them;
      otherwise the current stream waits for the communication stream.

    When none of previous_event / async_finish / allocate_on_comm_stream is given, "wait on the current
    stream, run on the comm stream, make the current stream wait" orders exactly like running on the current
    stream, so the call runs there (no event, no extra latency)."""

    def __init__(self, comm_stream, previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        torch = require_torch()
        check_stream_args(previous_event, async_finish, allocate_on_comm_stream)
        self.compute = torch.cuda.current_stream()
        self.async_finish = bool(async_finish)
        self.allocate_on_comm_stream = bool(allocate_on_comm_stream)
        self.use_comm = previous_event is not None or self.async_finish or self.allocate_on_comm_stream
        self.stream = comm_stream if self.use_comm else self.compute
        if self.use_comm:
            event = getattr(previous_event, "event", None)
            if event is not None:
                self.stream.wait_event(event)
            else:  # no previous_event, or one without an event (DeepEP then waits for the current stream)
                self.stream.wait_stream(self.compute)
        self.alloc_stream = self.stream if self.allocate_on_comm_stream else self.compute

    @property
    def handle(self):
        """The cudaStream_t (int) the kernels are launched on."""
        return self.stream.cuda_stream

    def allocating(self):
        """Context: tensors created inside are allocated on the stream DeepEP would allocate them on."""
        return require_torch().cuda.stream(self.alloc_stream)

    def launching(self):
        """Context: torch work inside (small adds, copies) is ordered with the kernels."""
        return require_torch().cuda.stream(self.stream)

    def finish(self, tensors=(), keep_in_event=False):
        """-> EventOverlap: recorded on the comm stream with async_finish, else empty (the current stream
        already waits). keep_in_event (DeepEP's low-latency calls): the event holds `tensors` as its
        extra_tensors instead of record_stream."""
        if not self.use_comm:
            return EventOverlap()
        if self.async_finish and keep_in_event:
            return EventOverlap.record(self.stream, tuple(t for t in tensors if t is not None))
        if self.async_finish:
            for t in tensors:
                if t is not None:
                    t.record_stream(self.stream)
                    if self.allocate_on_comm_stream:
                        t.record_stream(self.compute)
            return EventOverlap.record(self.stream)
        self.compute.wait_stream(self.stream)
        if self.allocate_on_comm_stream:
            for t in tensors:
                if t is not None:
                    t.record_stream(self.compute)
        return EventOverlap()


class _CudaArray:
    """__cuda_array_interface__ of raw device memory (int16 for BF16, uint8 for FP8, viewed back as the torch
    dtype); holds `owner`."""

    def __init__(self, data, shape, strides_elems, itemsize, typestr, owner):
        self.owner = owner
        self.__cuda_array_interface__ = {
            "data": (data, False),
            "shape": tuple(shape),
            "strides": tuple(s * itemsize for s in strides_elems),
            "typestr": typestr,
            "version": 3,
        }


# TensorView dtype -> (bytes, typestr of the carrier, torch dtype name).
_VIEW_DTYPES = {"bf16": (2, "<i2", "bfloat16"), "fp8_e4m3": (1, "|u1", "float8_e4m3fn")}


def tensor_from_view(view_, owner):
    """A torch tensor over a TensorView's memory (BF16 or FP8 e4m3), keeping `owner` alive."""
    torch = require_torch()
    if view_.dtype not in _VIEW_DTYPES:
        raise invalid_argument(f"tensor_from_view handles bf16 and fp8_e4m3, got {view_.dtype}")
    itemsize, typestr, dtype = _VIEW_DTYPES[view_.dtype]
    arr = _CudaArray(view_.data, view_.shape, view_.strides, itemsize, typestr, owner)
    return torch.as_tensor(arr, device="cuda").view(getattr(torch, dtype))
