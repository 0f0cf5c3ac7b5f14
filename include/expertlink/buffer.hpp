// The Buffer: one symmetric (NVLink-visible) window per rank, and the MoE dispatch/combine operations on
// it. Lifecycle as CUB/CUTLASS: size_hint -> construct (collective) -> run calls, stream-ordered on the
// caller's stream (or under a StreamOrder: a comm stream, a previous event, an async completion Event);
// nothing on the hot path allocates or synchronizes unless its name says so.
//
// High-throughput (HT) path, intranode:
//   get_dispatch_layout   counts per rank / expert and is_token_in_rank from topk_idx
//   ht_notify             exchanges counts and fills an HtHandle; Sizing::kExact waits for the counts on
//                         the host (one sync) so outputs can be sized exactly; Sizing::kCapacity does not
//                         sync: outputs hold `capacity` rows and overflow is reported, never dropped silently
//   ht_dispatch           moves the rows (BF16, or FP8 + scales) along a handle; reuse an old handle to
//                         dispatch again without notify (cached mode; also combine's backward)
//   ht_combine            rows back to their sources, float32 sum per token (dispatch's backward)
// Every rank must make the same sequence of calls (same kinds, same order); a rank that does not makes
// the others fail with a timeout naming it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include <cuda_runtime.h>

#include "expertlink/communicator.hpp"
#include "expertlink/low_latency.hpp"
#include "expertlink/options.hpp"
#include "expertlink/tensor.hpp"

namespace expertlink {

class SymmetricMemory;
struct HtHandleState;

// Limits of the HT path.
inline constexpr int kHtMaxTopk = 32;
inline constexpr int kHtMaxExperts = 1024;
inline constexpr int kHtMaxRanks = 64;

struct HtDispatchArgs {
  TensorView x;         // BF16 [T, H], or FP8 e4m3 [T, H]; rows a multiple of 16 bytes, inner dim contiguous
  TensorView x_scales;  // FP8 only: F32 [T, H/128] or I32 [T, ceil(H/512)] (packed UE8M0); any strides
  TensorView topk_idx;  // I64 or I32 [T, K], -1 = none; optional in cached mode / with is_token_in_rank
  TensorView topk_weights;      // F32 [T, K], optional (requires topk_idx)
  TensorView is_token_in_rank;  // BOOL [T, R]: routing when topk_idx is not given (notify only)
  int num_experts = 0;          // E, divisible by the ranks; required with topk_idx
  int expert_alignment = 1;
  int num_sms = 0;  // 0: the analytic default (Buffer::default_ht_sms)
};

struct HtDispatchOutputs {
  TensorView recv_x;                      // [capacity, H], dtype of x
  TensorView recv_x_scales;               // FP8: dtype of x_scales [capacity, cols] (any strides)
  TensorView recv_topk_idx;               // dtype of topk_idx [capacity, K], contiguous, optional
  TensorView recv_topk_weights;           // F32 [capacity, K], contiguous, optional
  TensorView num_recv_tokens_per_expert;  // I32 [E / R], optional (device copy of the counts)
};

struct HtCombineArgs {
  // BF16 [N_recv, H]: one expert-output row per received row (the view Buffer::ht_window_recv_x returned:
  // direct combine)
  TensorView x;
  TensorView topk_weights;  // F32 [N_recv, K], optional: summed per token into combined_topk_weights
  TensorView bias0, bias1;  // BF16 [T, H], optional
  int num_sms = 0;
};

struct HtCombineOutputs {
  TensorView combined_x;             // BF16 [T, H]
  TensorView combined_topk_weights;  // F32 [T, K], contiguous, optional (needs args.topk_weights)
};

enum class Sizing { kExact, kCapacity };

class Buffer;

// DeepEP's stream semantics for the calls that take it instead of a cudaStream_t (Python front end:
// python/expertlink/deep_ep.py does the same with torch streams).
//   - The call runs on the Buffer's own comm stream when use_comm_stream (created on first use, a
//     non-blocking stream of the buffer's device), else on `stream`.
//   - It first waits for previous_event when one is given; else, on the comm stream, for the work queued
//     on `stream` so far (so inputs produced there are ready).
//   - On the comm stream without async_finish, `stream` waits for the call's completion before the call
//     returns: work queued on `stream` afterwards is ordered after it. With async_finish the call returns
//     an Event and the caller orders later work by it (Event::wait / synchronize).
// Lifetimes are the caller's: tensors a call reads or writes on the comm stream must stay allocated
// until its completion (the Event, or `stream` without async_finish); a caching allocator that frees on
// `stream` does not know about the comm stream (torch's record_stream is the Python side's answer).
// Refused (kInvalidArgument, before anything is enqueued): `stream` of another device, and
// use_comm_stream while `stream` is capturing a CUDA graph (the comm stream is outside the capture).
struct StreamOrder {
  cudaStream_t stream = nullptr;  // the caller's compute stream
  cudaEvent_t previous_event = nullptr;
  bool use_comm_stream = false;
  bool async_finish = false;
};

// Completion of one StreamOrder call: a timing-free CUDA event recorded after the call's work on the
// stream it ran on. Valid only when the call asked for async_finish (the default path creates no event:
// nothing on the hot path allocates). Move-only; destroying it never waits.
class Event {
 public:
  Event() = default;
  ~Event();
  Event(Event&& other) noexcept;
  Event& operator=(Event&& other) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  bool valid() const { return event_ != nullptr; }
  cudaEvent_t get() const { return event_; }
  // Work queued on `stream` after this waits for the call (stream-ordered, no host wait).
  void wait(cudaStream_t stream) const;
  // Host wait, bounded by the Buffer's timeout; raises a device-side failure (timeout naming the peer)
  // or a host timeout as an Error. The Buffer that made the event must still exist. Refused for an event
  // recorded under CUDA-graph capture (wait on it from a stream of the capture instead).
  void synchronize() const;

 private:
  friend class Buffer;
  Event(cudaEvent_t event, Buffer* buffer, int device, bool captured)
      : event_(event), buffer_(buffer), device_(device), captured_(captured) {}
  cudaEvent_t event_ = nullptr;
  Buffer* buffer_ = nullptr;
  int device_ = 0;
  bool captured_ = false;
};

// A StreamOrder LL call's receive hook (as the cudaStream_t overloads return it) and completion event.
// In split mode the event covers the send half only: order the hook's stream after it (Event::wait, or
// `stream` itself without async_finish) before calling the hook.
struct LlOrdered {
  LlRecvHook hook;
  Event event;
};

// Where the rows of one HT dispatch came from and went. Owns device memory (reused across notifies when
// large enough); move-only. Valid for the Buffer that filled it.
class HtHandle {
 public:
  HtHandle();
  ~HtHandle();
  HtHandle(HtHandle&&) noexcept;
  HtHandle& operator=(HtHandle&&) noexcept;

  bool valid() const;
  int num_tokens() const;    // T of this rank
  int64_t capacity() const;  // rows the outputs may hold
  // Exact sizing: known on the host after ht_notify. Capacity sizing: read after the stream has passed
  // the notify (e.g. after Buffer::synchronize); -1 before.
  int64_t num_recv_tokens() const;
  std::vector<int> num_recv_tokens_per_expert() const;
  // Device arrays (I32): rank_prefix [R + 1], recv_src_token [capacity], send_pos [T, R].
  const int32_t* rank_prefix() const;
  const int32_t* recv_src_token() const;
  const int32_t* send_pos() const;
  // Raises kInvalidArgument if the rows that arrived exceeded the capacity (reads host-mapped memory:
  // call after the stream has passed the dispatch).
  void check_capacity() const;

 private:
  friend class Buffer;
  std::unique_ptr<HtHandleState> state_;
};

class Buffer {
 public:
  // Collective over the communicator's ranks (same sizes everywhere). The window holds two disjoint
  // regions: `ht_bytes` for the high-throughput path and `ll_bytes` for the low-latency path, so HT and
  // LL calls may interleave freely; and, when `ht_recv_bytes` > 0, a third: the receive region of direct
  // dispatch (ht_window_recv_x; intranode only: ranks on several nodes have no window, and no region).
  Buffer(const Communicator& comm, size_t ht_bytes, size_t ll_bytes = 0, RuntimeOptions options = {},
         size_t ht_recv_bytes = 0);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // HT bytes a workload needs: up to `max_tokens_per_rank` tokens of `hidden` channels per rank, `topk`
  // experts per token, BF16 or FP8 (the BF16 figure covers both).
  static size_t ht_size_hint(int num_ranks, int64_t max_tokens_per_rank, int64_t hidden, int topk);
  // ht_recv_bytes for direct dispatch of the same workload: every token of every rank may come here.
  static size_t ht_recv_size_hint(int num_ranks, int64_t max_tokens_per_rank, int64_t hidden);

  // Direct dispatch: a dense [rows, hidden] view of dtype (BF16 or FP8 e4m3) over the receive region,
  // with as many rows as the region holds (slice it to the capacity or count you need, keeping its start
  // and row stride). Given as ht_dispatch's recv_x, the senders write every row straight into its final
  // place here instead of into the receiving area, and the receiving side copies out only the small data
  // (scales, top-k, weights): a third less data moved by the SMs. Given as ht_combine's x (BF16, the
  // expert outputs written over the received rows), the combine is direct too: every source reads its
  // rows from the holders' regions and sums them, nothing is sent (top-k weights for
  // combined_topk_weights are first copied into this rank's window, where the sources read them: that
  // needs the HT region's combine half to hold N_recv x topk floats; ht_window_recv_topk_weights avoids
  // the copy).
  // Every rank must do the same in each call (a rank that does not makes the call fail on all ranks,
  // naming the disagreement). The rows stay valid until the next ht_dispatch on this Buffer; read and
  // write them on the calls' stream (or order that before the next dispatch); after a direct combine,
  // peers may read them until the next dispatch, so do not write them before it. Refused without a
  // receive region (ht_recv_bytes = 0) or across nodes.
  TensorView ht_window_recv_x(DType dtype, int64_t hidden) const;
  // Direct combine's top-k weights in place: a contiguous f32 [rows, topk] view of this rank's window
  // (the HT region's combine half), where a direct combine's peers read this rank's weights. Given as
  // ht_dispatch's recv_topk_weights, the received weights land there; given (sliced to x's rows) as a
  // direct ht_combine's topk_weights, they are read in place instead of being copied there first (one
  // kernel less per combine). Valid until the next HT call on this Buffer other than that combine; a
  // combine that sends rows (x not the receive region's view) refuses it as topk_weights, since it
  // writes its rows over it. Refused without a receive region or across nodes.
  TensorView ht_window_recv_topk_weights(int topk) const;

  int rank() const;
  int num_ranks() const;
  size_t ht_bytes() const;
  size_t ll_bytes() const;
  size_t window_bytes() const;  // symmetric bytes this rank holds (both regions + control)
  // SMs the HT kernels use when a call asks for 0: enough blocks for NVLink to be full (one SM writes
  // ~46 GB/s to a peer; ~8 fill NV18) plus as many again for the local share and the copy-out.
  int default_ht_sms() const;

  // Topology, found from the communicator's hosts at construction ($NCCL_HOSTID honoured, ranks
  // node-major, the same number of ranks on every node). One node: the NVLink (symmetric window) path.
  // Several: the internode paths, same calls and results (docs/internode.md). HT is hierarchical
  // (ht_notify always syncs the host once). LL is flat: fixed-size, capacity-sized messages between every
  // pair of ranks over grouped ncclSend/ncclRecv, no host sync, CUDA-graph capturable; its staging is
  // device memory of 2 x ll_bytes (send and receive sides, allocated here), the same ll_size_hint covers
  // it. No symmetric window, so window_bytes() is 0.
  int num_nodes() const;
  int num_local_ranks() const;
  size_t internode_staging_bytes() const;  // device staging of the internode paths, HT + LL (0 intranode)

  void get_dispatch_layout(const TensorView& topk_idx, int num_experts, const TensorView& num_tokens_per_rank,
                           const TensorView& num_tokens_per_expert, const TensorView& is_token_in_rank,
                           cudaStream_t stream);
  void ht_notify(const HtDispatchArgs& args, HtHandle& handle, Sizing sizing, int64_t capacity,
                 cudaStream_t stream);
  void ht_dispatch(const HtDispatchArgs& args, HtHandle& handle, const HtDispatchOutputs& out,
                   cudaStream_t stream);
  void ht_combine(const HtCombineArgs& args, const HtHandle& handle, const HtCombineOutputs& out,
                  cudaStream_t stream);

  // The same four calls under StreamOrder (DeepEP's previous_event and async_finish; DeepEP's calls always
  // run on its comm stream: use_comm_stream = true). ht_notify with Sizing::kExact still waits on the
  // host, for the stream it ran on.
  Event get_dispatch_layout(const TensorView& topk_idx, int num_experts,
                            const TensorView& num_tokens_per_rank, const TensorView& num_tokens_per_expert,
                            const TensorView& is_token_in_rank, const StreamOrder& order);
  Event ht_notify(const HtDispatchArgs& args, HtHandle& handle, Sizing sizing, int64_t capacity,
                  const StreamOrder& order);
  Event ht_dispatch(const HtDispatchArgs& args, HtHandle& handle, const HtDispatchOutputs& out,
                    const StreamOrder& order);
  Event ht_combine(const HtCombineArgs& args, const HtHandle& handle, const HtCombineOutputs& out,
                   const StreamOrder& order);

  // Bounded host wait on `stream`; raises a device-side failure (timeout naming the peer, ranks that
  // disagreed) as an Error.
  void synchronize(cudaStream_t stream);
  // Stream-ordered barrier across all ranks.
  void barrier(cudaStream_t stream);

  // ---- rank masking (fault tolerance) ----
  // Marks `rank` dead for every later call on this buffer (HT, LL, barrier): nothing is sent to it,
  // waited for from it or read from its writes, and top-k picks of its experts count as -1 - so tokens
  // routed only there are dropped from dispatch and contribute nothing to combine (LL: its experts'
  // weighted outputs are left out of the sum; HT: its rows are left out). Every live rank must mask the
  // same ranks between the same two calls. Host-synchronous: waits for the device (a call stuck on the
  // dead rank ends at the timeout), clears the recorded timeout and moves the live ranks' round counters
  // past anything the aborted call left behind, so this buffer can go on after `synchronize` reported the
  // rank. Handles and hooks made before masking must not be reused (make new ones); CUDA graphs captured
  // before must be captured again. Single node only (the internode path raises kUnsupported).
  void mask_rank(int rank);
  bool is_rank_masked(int rank) const;

  // ---- low-latency (LL) path: declared in this section, implemented in src/ll/ ----
  // Arguments, outputs, handle and hook: low_latency.hpp. One kernel per call (or per half in split
  // mode) on all SMs; no host synchronisation, no allocation (except get_next_ll_combine_buffer's first
  // use); CUDA-graph capturable once the handle has been used. The LL region needs no cleaning: its
  // signals are monotonically increasing use counts.

  // LL bytes (the `ll_bytes` of the constructor) for up to N tokens per rank of `hidden` channels, any
  // top-k <= 16, BF16 or FP8. Two dispatch and two combine areas of R * N rows each, plus per-message
  // flags at fixed offsets (~0.27 MB per rank and area).
  static size_t ll_size_hint(int num_ranks, int64_t num_max_dispatch_tokens_per_rank, int64_t hidden,
                             int num_experts);
  // Dispatch. Fills `handle` (for the combine) and the outputs; with options.return_recv_hook returns
  // the hook that launches the receive half (outputs and handle are written by it), else an empty hook.
  LlRecvHook ll_dispatch(const LlDispatchArgs& args, LlHandle& handle, const LlDispatchOutputs& out,
                         cudaStream_t stream);
  // Combine along a dispatch's handle (its receive half must have been launched).
  LlRecvHook ll_combine(const LlCombineArgs& args, const LlHandle& handle, const LlCombineOutputs& out,
                        cudaStream_t stream);
  // Both under StreamOrder (see LlOrdered for split mode).
  LlOrdered ll_dispatch(const LlDispatchArgs& args, LlHandle& handle, const LlDispatchOutputs& out,
                        const StreamOrder& order);
  LlOrdered ll_combine(const LlCombineArgs& args, const LlHandle& handle, const LlCombineOutputs& out,
                       const StreamOrder& order);
  // BF16 [E_local, R*N, H] device buffer (not symmetric; allocated on first use per parity) that the
  // next ll_combine reads when called with zero_copy: expert outputs written here need no staging.
  TensorView get_next_ll_combine_buffer(const LlHandle& handle);
  // Nothing to clean (signals only grow); checks that no split call is waiting for its hook.
  void ll_clean(cudaStream_t stream);
  // SMs (blocks) every LL kernel holds.
  int ll_sms() const;

  // Internal: the window and the offsets of the two regions within its data region, for tests.
  SymmetricMemory& window();
  size_t ll_offset() const;       // LL region = [ll_offset, ll_offset + ll_bytes) of the data region
  size_t ht_recv_offset() const;  // direct-dispatch receive region, ht_recv_bytes from there

  struct State;

 private:
  std::unique_ptr<State> s_;
};

}  // namespace expertlink
