// The StreamOrder overloads of Buffer (buffer.hpp) and their completion Event. The cudaStream_t calls do
// the work; around each, `begin` checks the order, picks the stream the call runs on and makes it wait for
// what it must, and `finish` records the completion event (async_finish) or makes the caller's stream wait
// for the comm stream. Nothing here allocates unless the caller asked for an Event (one cudaEvent_t) or
// uses the comm stream for the first time.
#include <utility>

#include "api_checks.hpp"
#include "buffer_state.hpp"
#include "check.hpp"

namespace expertlink {
namespace {

// Streams and events belong to the device current when they are created: the buffer's, whatever the
// calling thread has current; the caller's device is restored on the way out.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    EL_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) EL_CUDA_CHECK(cudaSetDevice(device));
    changed_ = previous_ != device;
  }
  ~DeviceScope() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

Buffer::State::CommStream& comm_stream(Buffer::State& s) {
  Buffer::State::CommStream& cs = s.comm_stream;
  if (cs.stream != nullptr) return cs;
  DeviceScope scope(s.comm.device());
  // Non-blocking: the comm stream must not serialise with the legacy default stream behind the caller's
  // back; every ordering it has is an explicit event wait below.
  if (cs.handoff == nullptr) EL_CUDA_CHECK(cudaEventCreateWithFlags(&cs.handoff, cudaEventDisableTiming));
  EL_CUDA_CHECK(cudaStreamCreateWithFlags(&cs.stream, cudaStreamNonBlocking));
  return cs;
}

struct Begun {
  cudaStream_t stream;  // where the call runs
  bool captured;        // `order.stream` is capturing (then the call runs on it)
};

// Refuses a bad order before anything is enqueued, then orders the call's stream after previous_event,
// or (comm stream only) after the work on order.stream so far.
Begun begin(Buffer::State& s, const StreamOrder& order) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  EL_CUDA_CHECK(cudaStreamIsCapturing(order.stream, &capture));
  const bool captured = capture != cudaStreamCaptureStatusNone;
  if (captured) {
    // A second stream joins a capture only through an event recorded in it, and the comm stream would
    // then stay captured until joined back; DeepEP does not capture with it either.
    EL_CHECK(!order.use_comm_stream,
             "order.use_comm_stream = true while order.stream is capturing a CUDA graph: the comm stream is "
             "not part of the capture (run the call on order.stream)");
  } else {
    // Asking the runtime about a capturing stream's device would invalidate the capture (api_checks.cpp).
    int stream_device = -1;
    EL_CUDA_CHECK(cudaStreamGetDevice(order.stream, &stream_device));
    checks::stream_device(stream_device, s.comm.device());
  }
  if (!order.use_comm_stream) {
    if (order.previous_event != nullptr)
      EL_CUDA_CHECK(cudaStreamWaitEvent(order.stream, order.previous_event, 0));
    return {order.stream, captured};
  }
  Buffer::State::CommStream& cs = comm_stream(s);
  if (order.previous_event != nullptr) {
    EL_CUDA_CHECK(cudaStreamWaitEvent(cs.stream, order.previous_event, 0));
  } else {
    EL_CUDA_CHECK(cudaEventRecord(cs.handoff, order.stream));
    EL_CUDA_CHECK(cudaStreamWaitEvent(cs.stream, cs.handoff, 0));
  }
  return {cs.stream, false};
}

// After the call on `ran_on`: a fresh event recorded there (async_finish), else, on the comm stream,
// order.stream waits for it. Returns the event, or null when none was asked for.
cudaEvent_t finish(Buffer::State& s, const StreamOrder& order, cudaStream_t ran_on) {
  if (order.async_finish) {
    cudaEvent_t event = nullptr;
    {
      DeviceScope scope(s.comm.device());
      EL_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    }
    const cudaError_t recorded = cudaEventRecord(event, ran_on);
    if (recorded != cudaSuccess) cudaEventDestroy(event);
    EL_CUDA_CHECK(recorded);
    return event;
  }
  if (order.use_comm_stream) {
    EL_CUDA_CHECK(cudaEventRecord(s.comm_stream.handoff, ran_on));
    EL_CUDA_CHECK(cudaStreamWaitEvent(order.stream, s.comm_stream.handoff, 0));
  }
  return nullptr;
}

// Owns the private stream of one Event::synchronize.
struct WaiterStream {
  cudaStream_t stream = nullptr;
  WaiterStream() { EL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); }
  ~WaiterStream() { cudaStreamDestroy(stream); }
  WaiterStream(const WaiterStream&) = delete;
  WaiterStream& operator=(const WaiterStream&) = delete;
};

}  // namespace

Event::~Event() {
  if (event_ != nullptr) cudaEventDestroy(event_);
}

Event::Event(Event&& other) noexcept
    : event_(std::exchange(other.event_, nullptr)),
      buffer_(other.buffer_),
      device_(other.device_),
      captured_(other.captured_) {}

Event& Event::operator=(Event&& other) noexcept {
  if (this == &other) return *this;
  if (event_ != nullptr) cudaEventDestroy(event_);
  event_ = std::exchange(other.event_, nullptr);
  buffer_ = other.buffer_;
  device_ = other.device_;
  captured_ = other.captured_;
  return *this;
}

void Event::wait(cudaStream_t stream) const {
  EL_CHECK(valid(),
           "Event::wait on an empty event (the call was made without order.async_finish, or the "
           "event was moved from)");
  EL_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0));
}

void Event::synchronize() const {
  EL_CHECK(valid(),
           "Event::synchronize on an empty event (the call was made without order.async_finish, or "
           "the event was moved from)");
  EL_CHECK(!captured_,
           "Event::synchronize: the event was recorded while order.stream was capturing a CUDA graph; "
           "the host cannot wait for it (wait() on it from a stream of the capture)");
  // The bounded host wait (Buffer::synchronize: the buffer's timeout, the device's wait record) polls a
  // stream; a private one holding only this event's wait keeps later work on the call's stream out of it.
  DeviceScope scope(device_);
  WaiterStream waiter;
  EL_CUDA_CHECK(cudaStreamWaitEvent(waiter.stream, event_, 0));
  buffer_->synchronize(waiter.stream);
}

Event Buffer::get_dispatch_layout(const TensorView& topk_idx, int num_experts,
                                  const TensorView& num_tokens_per_rank,
                                  const TensorView& num_tokens_per_expert, const TensorView& is_token_in_rank,
                                  const StreamOrder& order) {
  const Begun b = begin(*s_, order);
  get_dispatch_layout(topk_idx, num_experts, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank,
                      b.stream);
  return Event(finish(*s_, order, b.stream), this, s_->comm.device(), b.captured);
}

Event Buffer::ht_notify(const HtDispatchArgs& args, HtHandle& handle, Sizing sizing, int64_t capacity,
                        const StreamOrder& order) {
  const Begun b = begin(*s_, order);
  ht_notify(args, handle, sizing, capacity, b.stream);
  return Event(finish(*s_, order, b.stream), this, s_->comm.device(), b.captured);
}

Event Buffer::ht_dispatch(const HtDispatchArgs& args, HtHandle& handle, const HtDispatchOutputs& out,
                          const StreamOrder& order) {
  const Begun b = begin(*s_, order);
  ht_dispatch(args, handle, out, b.stream);
  return Event(finish(*s_, order, b.stream), this, s_->comm.device(), b.captured);
}

Event Buffer::ht_combine(const HtCombineArgs& args, const HtHandle& handle, const HtCombineOutputs& out,
                         const StreamOrder& order) {
  const Begun b = begin(*s_, order);
  ht_combine(args, handle, out, b.stream);
  return Event(finish(*s_, order, b.stream), this, s_->comm.device(), b.captured);
}

LlOrdered Buffer::ll_dispatch(const LlDispatchArgs& args, LlHandle& handle, const LlDispatchOutputs& out,
                              const StreamOrder& order) {
  const Begun b = begin(*s_, order);
  LlOrdered r;
  r.hook = ll_dispatch(args, handle, out, b.stream);
  r.event = Event(finish(*s_, order, b.stream), this, s_->comm.device(), b.captured);
  return r;
}

LlOrdered Buffer::ll_combine(const LlCombineArgs& args, const LlHandle& handle, const LlCombineOutputs& out,
                             const StreamOrder& order) {
  const Begun b = begin(*s_, order);
  LlOrdered r;
  r.hook = ll_combine(args, handle, out, b.stream);
  r.event = Event(finish(*s_, order, b.stream), this, s_->comm.device(), b.captured);
  return r;
}

}  // namespace expertlink
