#include "api_checks.hpp"

#include "check.hpp"

namespace expertlink::checks {
namespace {

long long ll(int64_t v) {
  return static_cast<long long>(v);
}

// The runtime's answer, or false where it has none (no device, an unknown pointer kind, ...); a failed
// query leaves no error behind for the caller's next CUDA call.
bool query_pointer(const void* p, Memory& memory, int& device) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  device = a.device;
  switch (a.type) {
    case cudaMemoryTypeDevice:
      memory = Memory::kDevice;
      return true;
    case cudaMemoryTypeHost:
      memory = Memory::kPinnedHost;
      return true;
    case cudaMemoryTypeManaged:
      memory = Memory::kManaged;
      return true;
    case cudaMemoryTypeUnregistered:
      memory = Memory::kUnregistered;
      return true;
  }
  return false;
}

// Device pointers already found on a device: the hot path (LL decode calls are ~25 us) asks the runtime
// about a pointer once, not on every call (torch's caching allocator hands the same blocks back).
// Per thread, the last kSeen answers; an address freed and reused by another device's allocation is
// asked again only once it has left the ring.
constexpr int kSeen = 64;
struct SeenPointers {
  const void* ptr[kSeen] = {};
  int device[kSeen] = {};
  int next = 0;
  bool has(const void* p, int d) const {
    for (int i = 0; i < kSeen; ++i)
      if (ptr[i] == p && device[i] == d) return true;
    return false;
  }
  void add(const void* p, int d) {
    ptr[next] = p;
    device[next] = d;
    next = (next + 1) % kSeen;
  }
};
thread_local SeenPointers seen_pointers;

}  // namespace

void view(const TensorView& t, const char* name) {
  if (!t.defined()) return;
  EL_CHECK(t.ndim >= 1 && t.ndim <= TensorView::kMaxDims, "%s has %d dimensions: a view has 1 to %d", name,
           t.ndim, TensorView::kMaxDims);
  for (int d = 0; d < t.ndim; ++d)
    EL_CHECK(t.shape[d] >= 0, "%s: dimension %d has extent %lld (negative): %s", name, d, ll(t.shape[d]),
             t.describe().c_str());
  EL_CHECK(t.data != nullptr || t.numel() == 0, "%s.data is null but %s has %lld elements (%s)", name, name,
           ll(t.numel()), t.describe().c_str());
}

void required(const TensorView& t, const char* name) {
  EL_CHECK(t.defined(), "%s is required", name);
  view(t, name);
}

int topk_idx(const TensorView& t, int64_t tokens, int max_topk, const char* name) {
  required(t, name);
  EL_CHECK(t.ndim == 2, "%s must be 2-D [T, K], got %s", name, t.describe().c_str());
  EL_CHECK(t.dtype == DType::kI64 || t.dtype == DType::kI32, "%s must be i64 or i32, got %s", name,
           dtype_name(t.dtype));
  EL_CHECK(t.shape[0] == tokens, "%s has %lld rows but there are %lld tokens", name, ll(t.shape[0]),
           ll(tokens));
  EL_CHECK(t.shape[1] >= 1 && t.shape[1] <= max_topk, "%s: top-k = %lld must be in [1, %d]", name,
           ll(t.shape[1]), max_topk);
  return static_cast<int>(t.shape[1]);
}

void num_experts(int num_experts, int num_ranks, int max_experts) {
  EL_CHECK(num_experts >= num_ranks && num_experts <= max_experts && num_experts % num_ranks == 0,
           "num_experts = %d must be a multiple of the %d ranks, at least %d and at most %d", num_experts,
           num_ranks, num_ranks, max_experts);
}

void token_rows(const TensorView& t, const char* name) {
  EL_CHECK(t.ndim == 2, "%s must be 2-D [T, H], got %s", name, t.describe().c_str());
  EL_CHECK(t.rows_are_dense_16b(),
           "%s rows must be contiguous, 16-byte aligned, a multiple of 16 bytes: %s at %p", name,
           t.describe().c_str(), t.data);
  EL_CHECK(t.dtype != DType::kFP8E4M3 || t.shape[1] % 128 == 0,
           "%s is fp8 with hidden = %lld, not a multiple of 128 (one scale per 128 channels)", name,
           ll(t.shape[1]));
}

void location(const char* name, const void* ptr, Memory memory, int pointer_device, int device) {
  EL_CHECK(
      memory != Memory::kUnregistered,
      "%s (%p) is not memory a GPU can reach (pageable host memory, or no allocation at all): pass device "
      "memory of device %d",
      name, ptr, device);
  EL_CHECK(memory != Memory::kDevice || pointer_device == device,
           "%s (%p) lives on device %d but the buffer is on device %d", name, ptr, pointer_device, device);
}

void stream_device(int stream_device, int device) {
  EL_CHECK(stream_device == device,
           "stream belongs to device %d but the buffer is on device %d (a stream of device %d is needed)",
           stream_device, device, device);
}

void tensors(std::initializer_list<Named> views, int device, cudaStream_t stream) {
  for (const Named& n : views) view(*n.view, n.name);
  // While a stream captures a graph, asking the runtime about it (cudaStreamGetDevice) or about pointers
  // invalidates the capture (seen on CUDA 13 with thread-local capture): only the view checks run then.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) {
    cudaGetLastError();
    return;  // no runtime to ask (or a stream it does not know: the launch will say so)
  }
  if (capture != cudaStreamCaptureStatusNone) return;
  int stream_dev = -1;
  if (cudaStreamGetDevice(stream, &stream_dev) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  stream_device(stream_dev, device);
  for (const Named& n : views) {
    if (!n.view->defined() || n.view->data == nullptr || seen_pointers.has(n.view->data, device)) continue;
    Memory memory;
    int pointer_device = -1;
    if (query_pointer(n.view->data, memory, pointer_device)) {
      location(n.name, n.view->data, memory, pointer_device, device);
      if (memory == Memory::kDevice) seen_pointers.add(n.view->data, device);
    }
  }
}

}  // namespace expertlink::checks
