// The low-latency (LL) path of Buffer, for decoding: arguments, outputs, the handle a dispatch fills for
// its combine, and the receive hook of the split (send / receive) mode. The operations themselves are
// Buffer::ll_dispatch / ll_combine (buffer.hpp); semantics are the oracle's (reference.hpp, LL section).
//
// Shapes: N = num_max_dispatch_tokens_per_rank (capacity), T <= N tokens on this rank, R ranks,
// E experts (E_local = E / R per rank), H hidden channels, K top-k.
//   dispatch  x [T, H] BF16, topk_idx [T, K]  ->  recv_x [E_local, R*N, H] (FP8 e4m3 + scales, or BF16),
//             expert-major; for local expert j the valid rows are the prefix [0, recv_count[j]), ordered
//             by source rank, then source token (always: the order is deterministic and equals the
//             oracle's), source rank s's rows at [begin, begin + count) of layout_range[j][s].
//   combine   expert outputs [E_local, R*N, H] BF16 (same slots) -> out [T, H] BF16,
//             out[t] = sum over k of topk_weights[t][k] * y[expert of slot k][slot of (this rank, t)].
//
// Split mode (return_recv_hook): the call launches only the send half and returns a hook; calling the
// hook launches the receive half (on a stream ordered after the call's stream, e.g. the same one). No SM
// waits for the network in between. The LL buffer is double-buffered: two dispatches (and two combines)
// may be in flight; a third raises kInvalidArgument naming the call whose hook is missing.
//
// Limits: H a multiple of 128 (FP8) or of 8 (BF16), up to 16384; K <= 16; N <= 1024; E <= 1024 and
// divisible by R. Every rank makes the same LL calls in the same order with the same N, H, K and E.
#pragma once

#include <cstdint>
#include <memory>

#include <cuda_runtime.h>

#include "expertlink/tensor.hpp"

namespace expertlink {

inline constexpr int kLlMaxTopk = 16;
inline constexpr int kLlMaxTokens = 1024;  // num_max_dispatch_tokens_per_rank
inline constexpr int kLlMaxHidden = 16384;
inline constexpr int kLlMaxExperts = 1024;

struct LlDispatchOptions {
  bool use_fp8 = true;       // cast to FP8 e4m3 with one scale per 128 channels inside the kernel
  bool round_scale = false;  // scales rounded up to powers of two
  bool use_ue8m0 = false;    // scales as packed UE8M0 bytes (requires use_fp8 and round_scale)
  bool return_recv_hook = false;
  // Rows are always in the deterministic order (source rank, then source token); kept for DeepEP-style
  // callers, changes nothing.
  bool deterministic = true;
};

struct LlDispatchArgs {
  TensorView x;                              // BF16 [T, H], rows contiguous and 16-byte aligned
  TensorView topk_idx;                       // I64 or I32 [T, K], -1 = no expert; any strides
  int num_max_dispatch_tokens_per_rank = 0;  // N, the same on every rank
  int num_experts = 0;
  LlDispatchOptions options;
};

// Caller-allocated outputs. Only valid slots are written (rows past recv_count[j] keep what they held).
struct LlDispatchOutputs {
  TensorView
      recv_x;  // FP8 e4m3 (use_fp8) or BF16 [E_local, R*N, H]; last dim contiguous, rows 16-byte aligned
  // FP8 only. F32 [E_local, R*N, H/128], or with use_ue8m0 I32 [E_local, R*N, ceil(H/512)] (4 scale bytes
  // per word, little-endian). Any strides: DeepEP's layout is strides {H/128 * R*N, 1, R*N}.
  TensorView recv_scales;
  TensorView recv_count;  // I32 [E_local]
  TensorView src_info;    // I32 [E_local, R*N]: source token of each valid slot; any strides; optional
  // Optional. I64 [E_local, R] packed as DeepEP (low 32 bits count, high 32 bits begin), or
  // I32 [E_local, R, 2] as (begin, count); any strides.
  TensorView layout_range;
};

struct LlCombineArgs {
  TensorView x;         // BF16 [E_local, R*N, H] expert outputs of the dispatched slots; last dim contiguous
  TensorView topk_idx;  // I64 or I32 [T, K] as dispatched; a slot set to -1 here is left out of the sum
  TensorView topk_weights;  // F32 [T, K]; any strides
  bool zero_copy = false;   // x is (or, left undefined, defaults to) get_next_ll_combine_buffer's buffer
  bool return_recv_hook = false;
};

struct LlCombineOutputs {
  TensorView out;  // BF16 [T, H], rows contiguous and 16-byte aligned
};

struct LlHandleState;
struct LlHookState;

// What an LL dispatch leaves for its combine: where every dispatched (token, expert) row went. Owns
// small device arrays (grown on demand, then reused: a handle used once before CUDA-graph capture does
// not allocate during capture). Move-only; belongs to the Buffer that filled it.
class LlHandle {
 public:
  LlHandle();
  ~LlHandle();
  LlHandle(LlHandle&&) noexcept;
  LlHandle& operator=(LlHandle&&) noexcept;

  bool valid() const;  // filled by a dispatch
  int num_tokens() const;
  int num_max_dispatch_tokens_per_rank() const;
  int hidden() const;
  int topk() const;
  int num_experts() const;
  int num_ranks() const;

 private:
  friend class Buffer;
  std::unique_ptr<LlHandleState> state_;
};

// The receive half of a split LL call. Call it exactly once; a default-constructed (or already called)
// hook is not valid(). The Buffer (and, for a dispatch, the outputs and the handle) must outlive it.
class LlRecvHook {
 public:
  LlRecvHook();
  ~LlRecvHook();
  LlRecvHook(LlRecvHook&&) noexcept;
  LlRecvHook& operator=(LlRecvHook&&) noexcept;

  bool valid() const;
  void operator()(cudaStream_t stream) { receive(stream); }
  void receive(cudaStream_t stream);

 private:
  friend class Buffer;
  std::unique_ptr<LlHookState> state_;
};

}  // namespace expertlink
