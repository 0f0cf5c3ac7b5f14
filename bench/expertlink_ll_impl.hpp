// ExpertLink's low-latency (LL) path (include/expertlink/low_latency.hpp, Buffer::ll_dispatch /
// ll_combine) as an el_bench implementation; its records are the library "expertlink", beside the HT ones
// of expertlink_impl.hpp.
//
// Per capacity N = ll_capacity(T) (num_max_dispatch_tokens_per_rank: 128, or T where T is larger) one
// Buffer with no HT region and ll_bytes = Buffer::ll_size_hint(R, N, H, E), made once and kept across
// routings and token counts of the same N; its window_bytes() is the records' buffer_bytes and its
// ll_sms() (every SM of the GPU: the LL kernels are cooperative, one block per SM) their sms.
// Dispatch: x BF16 [T, H] and topk_idx I64 [T, K] -> FP8 e4m3 recv_x [E_local, R*N, H] with float32
// scales [E_local, R*N, H/128] (row-major; cast inside the kernel, round_scale and use_ue8m0 off),
// recv_count, src_info and layout_range (DeepEP's I64 packing), as a model asks for them.
// Combine: expert outputs BF16 [E_local, R*N, H] (the harness writes the valid slots; the rest is NaN) ->
// out [T, H], weighted by topk_weights, along the handle of an untimed dispatch made in prepare.
//
//   ll_dispatch_fp8, ll_combine_bf16   timed: one whole call (send and receive in one kernel)
//   ll_roundtrip                       timed: a whole dispatch then a whole combine
//   <op>_send                          timed: the send half of a split call (return_recv_hook); the hook
//                                      (receive half) runs after the timed region, untimed
//   <op>_recv                          timed: the hook alone; the send half runs untimed before the L2
//                                      flush and the ranks' line-up, so its data has landed
// Outputs are poisoned (0xff) before every run, so the checked (last) run wrote what is checked. Besides
// the harness's checks (every valid row within e4m3 rounding of its source; combine sums), check_own
// compares recv_count, layout_range and src_info with the routing, requires the FP8 rows and scales to
// be bit-exact with the oracle's cast (reference::quantize_row_fp8), the slot after each expert's valid
// prefix to be untouched, and the handle's shape.
#pragma once

#include <memory>
#include <vector>

#include "device_buffer.hpp"
#include "expertlink/buffer.hpp"
#include "impl.hpp"

namespace expertlink::bench {

class ExpertLinkLlImpl final : public Impl {
 public:
  ExpertLinkLlImpl();
  ~ExpertLinkLlImpl() override;

  std::string name() const override { return "expertlink"; }
  bool supports(Op op) const override { return op_family(op) == Family::kLl; }
  std::optional<int> sms(Op) const override;
  std::optional<int64_t> buffer_bytes(Op) const override;

  void setup(const CaseData& data, ncclComm_t comm, cudaStream_t stream) override;
  std::vector<Variant> variants(Op op) const override;
  void select(Op op, const Variant& variant) override;
  ExpertOutputs prepare(Op op, cudaStream_t stream) override;
  void before_run(Op op, cudaStream_t stream) override;
  void run(Op op, cudaStream_t stream) override;
  void after_run(Op op, cudaStream_t stream) override;
  DispatchView dispatch_view(Op op) override;
  const uint16_t* combine_output(Op) override { return out_.as<uint16_t>(); }
  std::string check_own(Op op) override;
  void teardown() override;

 private:
  enum class Mode { kWhole, kSend, kRecv };

  void dispatch(bool split, cudaStream_t stream);
  void combine(bool split, cudaStream_t stream);
  void receive(cudaStream_t stream);  // the pending hook's receive half
  void poison_outputs(Op op, cudaStream_t stream);
  std::string check_dispatch_own();
  std::string check_rows_exact(const std::vector<int32_t>& counts);
  void make_reference_fp8();  // fills ref_q_ / ref_sf_ once per case

  Mode mode_ = Mode::kWhole;
  int sms_ = 0;

  const CaseData* data_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int64_t capacity_ = 0;  // N
  int64_t slots_ = 0;     // R * N slots per local expert
  int local_experts_ = 0;
  LlLayout layout_;  // this rank's expected expert-major output

  // Declared in the order they must outlive each other (destroyed bottom up).
  std::unique_ptr<Communicator> comm_;  // an ncclCommSplit of the bench's communicator
  std::unique_ptr<Buffer> buffer_;
  int64_t buffer_capacity_ = -1;  // the N buffer_ was sized for
  LlHandle handle_;
  LlRecvHook hook_;  // the receive half of the split call in flight, if any

  DeviceBuffer recv_x_, recv_scales_, recv_count_, src_info_, layout_range_;
  DeviceBuffer expert_y_, out_;
  // Every rank's x cast by the oracle: e4m3 [R * T, H] and scales [R * T, H / 128].
  std::vector<uint8_t> ref_q_;
  std::vector<float> ref_sf_;
};

}  // namespace expertlink::bench
