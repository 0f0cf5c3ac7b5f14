// ExpertLink's own HT path (include/expertlink/buffer.hpp) as an el_bench implementation.
//
// Per shape (tokens per rank) one Buffer of Buffer::ht_size_hint(R, T, H, K) bytes, made once and kept
// across routings; its window_bytes() is the records' buffer_bytes. Per SM count of --sms:
//   ht_dispatch_{fp8,bf16}        timed: ht_notify(Sizing::kCapacity, R * T) + ht_dispatch into outputs
//                                 preallocated for R * T rows (the worst case): no host sync
//   ht_dispatch_{fp8,bf16}_exact  timed: ht_notify(Sizing::kExact) (one host sync for the counts) +
//                                 ht_dispatch into the same outputs
//   ht_combine_bf16               untimed: an exact BF16 dispatch; the harness writes the expert outputs
//                                 over its received rows; timed: ht_combine of those rows and their
//                                 received top-k weights into combined_x [T, H] and combined weights [T, K]
// Dispatch passes topk_idx and topk_weights and asks for recv_topk_idx, recv_topk_weights and the
// per-expert counts, as a model does (the NCCL baseline moves the rows alone). num_sms is the SM count of
// the dispatch / combine kernel; notify is one more block.
// Besides the harness's checks of rows and sums, check_own compares the handle (rank_prefix,
// recv_src_token, capacity flag, per-expert counts), recv_topk_idx / recv_topk_weights and the combined
// weights with the routing on the host.
#pragma once

#include <memory>
#include <vector>

#include "device_buffer.hpp"
#include "expertlink/buffer.hpp"
#include "impl.hpp"

namespace expertlink::bench {

class ExpertLinkImpl final : public Impl {
 public:
  // `sms`: the SM counts to measure (num_sms of the HT calls), one record each.
  explicit ExpertLinkImpl(std::vector<int> sms);
  ~ExpertLinkImpl() override;

  std::string name() const override { return "expertlink"; }
  bool supports(Op op) const override { return op_family(op) == Family::kHt; }
  std::optional<int> sms(Op) const override { return sms_; }
  std::optional<int64_t> buffer_bytes(Op) const override;

  void setup(const CaseData& data, ncclComm_t comm, cudaStream_t stream) override;
  std::vector<Variant> variants(Op op) const override;
  void select(Op op, const Variant& variant) override;
  ExpertOutputs prepare(Op op, cudaStream_t stream) override;
  void run(Op op, cudaStream_t stream) override;
  DispatchView dispatch_view(Op op) override;
  const uint16_t* combine_output(Op) override { return combined_x_.as<uint16_t>(); }
  std::string check_own(Op op) override;
  void teardown() override;

 private:
  HtDispatchArgs dispatch_args(bool fp8) const;
  HtDispatchOutputs dispatch_outputs(bool fp8) const;
  void dispatch(bool fp8, Sizing sizing, cudaStream_t stream);
  void combine(cudaStream_t stream);
  // Where the dispatch's rows go: recv_x_, or with direct dispatch the Buffer's receive region.
  void* recv_x_rows(bool fp8) const;
  // The received top-k weights: in the window for the direct variants (ht_window_recv_topk_weights), so
  // direct combine reads them in place.
  float* recv_weights() const;
  std::string check_dispatch_meta(bool fp8);
  std::string check_combined_weights();

  std::vector<int> sms_list_;
  int sms_ = 0;
  bool exact_ = false;
  bool direct_ = false;     // the "_direct" variants: recv_x is Buffer::ht_window_recv_x
  size_t recv_region_ = 0;  // ht_recv_bytes of buffer_ (not counted for the other variants)

  const CaseData* data_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Communicator> comm_;  // an ncclCommSplit of the bench's communicator
  std::unique_ptr<Buffer> buffer_;
  int64_t buffer_tokens_ = -1;  // the shape buffer_ was sized for
  HtHandle handle_;
  int64_t capacity_ = 0;  // rows of the dispatch outputs: R * T
  int64_t combine_rows_ = 0;

  // recv_x_ holds BF16 or FP8 rows ([capacity, H]); the combine's expert outputs are written over it.
  DeviceBuffer recv_x_, recv_scales_, recv_topk_idx_, recv_topk_weights_, recv_expert_count_;
  DeviceBuffer combined_x_, combined_weights_;
};

}  // namespace expertlink::bench
