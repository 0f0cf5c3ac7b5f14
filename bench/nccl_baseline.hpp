// The baseline of WORKLOADS.md: what a user writes without an EP library, on NCCL alone.
//   dispatch: route_count kernel (rows per destination rank, each row's place in the send buffer)
//             -> grouped ncclSend/ncclRecv of the counts -> host sync to read them -> pack kernel
//             -> grouped ncclSend/ncclRecv of exactly the rows each destination needs.
//   combine:  grouped ncclSend/ncclRecv returning every received row to its source (sizes known from
//             the dispatch) -> reduction kernel summing each token's rows in float32 into BF16 [T, H].
// LL uses the same path with one row per (token, expert) selection, the FP8 cast inside the pack kernel
// and 16 bytes of source info per row, so that its bytes are LL's. The received LL rows are grouped by
// source rank, not expert-major as LL dispatch's output is: the permutation a user would still need is
// not included, which flatters the baseline.
#pragma once

#include "device_buffer.hpp"
#include "impl.hpp"

namespace expertlink::bench {

class NcclBaseline final : public Impl {
 public:
  explicit NcclBaseline(double wait_timeout_s) : wait_timeout_s_(wait_timeout_s) {}
  ~NcclBaseline() override { teardown(); }

  std::string name() const override { return "nccl"; }
  bool supports(Op) const override { return true; }
  std::optional<int> sms(Op) const override { return std::nullopt; }
  std::optional<int64_t> buffer_bytes(Op) const override { return std::nullopt; }

  void setup(const CaseData& data, ncclComm_t comm, cudaStream_t stream) override;
  ExpertOutputs prepare(Op op, cudaStream_t stream) override;
  void run(Op op, cudaStream_t stream) override;
  DispatchView dispatch_view(Op op) override;
  const uint16_t* combine_output(Op) override { return out_.as<uint16_t>(); }
  void teardown() override;

 private:
  void dispatch(Op op, cudaStream_t stream);
  void combine(cudaStream_t stream);
  int64_t row_bytes(Op op) const;

  double wait_timeout_s_;
  const CaseData* data_ = nullptr;
  ncclComm_t comm_ = nullptr;
  int num_ranks_ = 0;
  int64_t items_ = 0;
  bool per_selection_ = false;

  DeviceBuffer mask_, pos_, counts_, displ_;  // route_count's outputs; counts_ = [send R | recv R]
  PinnedBuffer host_counts_;
  cudaEvent_t counts_ready_ = nullptr;  // the host waits on it for the exchanged counts
  DeviceBuffer send_, recv_, combine_in_, returned_, out_;
  std::vector<int64_t> send_counts_, recv_counts_, send_displ_, recv_displ_;
  int64_t total_recv_ = 0;
  Op last_dispatch_ = Op::kHtDispatchBf16;
};

}  // namespace expertlink::bench
