#include "nccl_baseline.hpp"

#include <algorithm>

#include "check.hpp"
#include "nccl_baseline_kernels.hpp"
#include "timing.hpp"

namespace expertlink::bench {

int64_t NcclBaseline::row_bytes(Op op) const {
  const int64_t h = data_->inputs().hidden;
  switch (op) {
    case Op::kHtDispatchFp8:
      return fp8_row_bytes(h);
    case Op::kLlDispatchFp8:
    case Op::kLlRoundtrip:
      return ll_dispatch_row_bytes(h);
    default:
      return bf16_row_bytes(h);
  }
}

void NcclBaseline::setup(const CaseData& data, ncclComm_t comm, cudaStream_t stream) {
  data_ = &data;
  comm_ = comm;
  const Inputs& in = data.inputs();
  num_ranks_ = in.num_ranks;
  EL_CHECK(num_ranks_ <= kBaselineMaxRanks, "num_ranks = %d: the NCCL baseline handles at most %d",
           num_ranks_, kBaselineMaxRanks);
  per_selection_ = in.family == Family::kLl;
  items_ = per_selection_ ? in.tokens * in.topk : in.tokens;
  const size_t r = static_cast<size_t>(num_ranks_);

  mask_ = DeviceBuffer(static_cast<size_t>(items_) * sizeof(uint32_t));
  pos_ = DeviceBuffer(static_cast<size_t>(items_) * r * sizeof(int32_t));
  counts_ = DeviceBuffer(2 * r * sizeof(int32_t));
  displ_ = DeviceBuffer(r * sizeof(int32_t));
  host_counts_ = PinnedBuffer(2 * r * sizeof(int32_t));
  if (counts_ready_ == nullptr)
    EL_CUDA_CHECK(cudaEventCreateWithFlags(&counts_ready_, cudaEventDisableTiming));

  // Sized for any routing, as a user must: each item goes to at most min(ranks, topk) ranks (HT) or one
  // (LL), and a rank receives at most every item of every rank.
  const int64_t fanout = per_selection_ ? 1 : std::min<int64_t>(num_ranks_, in.topk);
  const int64_t max_send = items_ * fanout, max_recv = items_ * num_ranks_;
  const int64_t max_row = per_selection_ ? ll_dispatch_row_bytes(in.hidden) : bf16_row_bytes(in.hidden);
  const int64_t bf16_row = bf16_row_bytes(in.hidden);
  send_ = DeviceBuffer(static_cast<size_t>(max_send * max_row));
  recv_ = DeviceBuffer(static_cast<size_t>(max_recv * max_row));
  combine_in_ = DeviceBuffer(static_cast<size_t>(max_recv * bf16_row));
  returned_ = DeviceBuffer(static_cast<size_t>(max_send * bf16_row));
  out_ = DeviceBuffer(static_cast<size_t>(in.tokens * bf16_row));
  send_counts_.assign(r, 0);
  recv_counts_.assign(r, 0);
  send_displ_.assign(r, 0);
  recv_displ_.assign(r, 0);
  total_recv_ = 0;
}

void NcclBaseline::dispatch(Op op, cudaStream_t stream) {
  const Inputs& in = data_->inputs();
  const int R = num_ranks_;
  auto* counts = counts_.as<int32_t>();
  launch_route_count(in.topk_idx, in.tokens, in.topk, in.num_experts / R, R, per_selection_,
                     mask_.as<uint32_t>(), pos_.as<int32_t>(), counts, displ_.as<int32_t>(), stream);
  EL_NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < R; ++r) {
    EL_NCCL_CHECK(ncclSend(counts + r, 1, ncclInt32, r, comm_, stream));
    EL_NCCL_CHECK(ncclRecv(counts + R + r, 1, ncclInt32, r, comm_, stream));
  }
  EL_NCCL_CHECK(ncclGroupEnd());
  EL_CUDA_CHECK(
      cudaMemcpyAsync(host_counts_.as(), counts, 2 * sizeof(int32_t) * R, cudaMemcpyDeviceToHost, stream));
  wait_stream(stream, counts_ready_, wait_timeout_s_, "the NCCL baseline's count exchange");

  const int32_t* hc = host_counts_.as<int32_t>();
  int64_t send_off = 0, recv_off = 0;
  for (int r = 0; r < R; ++r) {
    send_counts_[r] = hc[r];
    recv_counts_[r] = hc[R + r];
    send_displ_[r] = send_off;
    recv_displ_[r] = recv_off;
    send_off += hc[r];
    recv_off += hc[R + r];
  }
  total_recv_ = recv_off;

  const int64_t row = row_bytes(op);
  auto* send = send_.as<uint8_t>();
  if (per_selection_) {
    launch_pack_ll(in.tokens, in.topk, R, in.rank, in.topk_idx, mask_.as<uint32_t>(), pos_.as<int32_t>(),
                   displ_.as<int32_t>(), in.x_bf16, in.hidden, send, row, stream);
  } else if (op == Op::kHtDispatchFp8) {
    launch_pack_rows(in.tokens, R, mask_.as<uint32_t>(), pos_.as<int32_t>(), displ_.as<int32_t>(), in.x_fp8,
                     in.hidden, reinterpret_cast<const uint8_t*>(in.x_scales), 4 * (in.hidden / 128), send,
                     row, stream);
  } else {
    launch_pack_rows(in.tokens, R, mask_.as<uint32_t>(), pos_.as<int32_t>(), displ_.as<int32_t>(),
                     reinterpret_cast<const uint8_t*>(in.x_bf16), 2 * in.hidden, nullptr, 0, send, row,
                     stream);
  }
  auto* recv = recv_.as<uint8_t>();
  EL_NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < R; ++r) {
    // Both sides know each pair's size from the exchanged counts: empty pairs are skipped on both.
    if (send_counts_[r] > 0)
      EL_NCCL_CHECK(ncclSend(send + send_displ_[r] * row, static_cast<size_t>(send_counts_[r] * row),
                             ncclInt8, r, comm_, stream));
    if (recv_counts_[r] > 0)
      EL_NCCL_CHECK(ncclRecv(recv + recv_displ_[r] * row, static_cast<size_t>(recv_counts_[r] * row),
                             ncclInt8, r, comm_, stream));
  }
  EL_NCCL_CHECK(ncclGroupEnd());
  last_dispatch_ = op;
}

void NcclBaseline::combine(cudaStream_t stream) {
  const Inputs& in = data_->inputs();
  const int64_t row = bf16_row_bytes(in.hidden);
  auto* back = combine_in_.as<uint8_t>();
  auto* returned = returned_.as<uint8_t>();
  EL_NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < num_ranks_; ++r) {
    if (recv_counts_[r] > 0)
      EL_NCCL_CHECK(ncclSend(back + recv_displ_[r] * row, static_cast<size_t>(recv_counts_[r] * row),
                             ncclInt8, r, comm_, stream));
    if (send_counts_[r] > 0)
      EL_NCCL_CHECK(ncclRecv(returned + send_displ_[r] * row, static_cast<size_t>(send_counts_[r] * row),
                             ncclInt8, r, comm_, stream));
  }
  EL_NCCL_CHECK(ncclGroupEnd());
  launch_combine_reduce(in.tokens, in.topk, num_ranks_, per_selection_, mask_.as<uint32_t>(),
                        pos_.as<int32_t>(), displ_.as<int32_t>(), in.topk_weights, returned_.as<uint16_t>(),
                        in.hidden, out_.as<uint16_t>(), stream);
}

ExpertOutputs NcclBaseline::prepare(Op op, cudaStream_t stream) {
  if (!op_has_combine(op)) return {};
  // The combine returns the rows of a dispatch: run one (BF16 for HT, whose experts get BF16 rows).
  dispatch(op_family(op) == Family::kHt ? Op::kHtDispatchBf16 : Op::kLlDispatchFp8, stream);
  wait_stream(stream, wait_timeout_s_, "the NCCL baseline's preparatory dispatch");
  ExpertOutputs eo;
  eo.rows = combine_in_.as<uint16_t>();
  eo.ids = received_rows(op_family(op), data_->routings(), data_->inputs().rank);
  if (static_cast<int64_t>(eo.ids.size()) != total_recv_)
    EL_FAIL(ErrorCode::kInternal, "the NCCL baseline's dispatch received %lld rows, the routing says %zu",
            static_cast<long long>(total_recv_), eo.ids.size());
  return eo;
}

void NcclBaseline::run(Op op, cudaStream_t stream) {
  switch (op) {
    case Op::kHtDispatchFp8:
    case Op::kHtDispatchBf16:
    case Op::kLlDispatchFp8:
      dispatch(op, stream);
      break;
    case Op::kHtCombineBf16:
    case Op::kLlCombineBf16:
      combine(stream);
      break;
    case Op::kLlRoundtrip:
      dispatch(op, stream);
      combine(stream);
      break;
  }
}

DispatchView NcclBaseline::dispatch_view(Op op) {
  const Inputs& in = data_->inputs();
  DispatchView v;
  const int64_t row = row_bytes(op);
  v.rows_received = total_recv_;
  v.format = op == Op::kHtDispatchBf16 ? RowFormat::kBf16 : RowFormat::kFp8;
  v.data = recv_.as<uint8_t>();
  v.data_stride = row;
  if (v.format == RowFormat::kFp8) {
    v.scales = reinterpret_cast<const float*>(recv_.as<uint8_t>() + in.hidden);
    v.scales_stride = row / static_cast<int64_t>(sizeof(float));
  }
  if (per_selection_) {
    v.meta = recv_.as<uint8_t>() + fp8_row_bytes(in.hidden);
    v.meta_stride = row;
  }
  v.ids = received_rows(in.family, data_->routings(), in.rank);
  return v;
}

void NcclBaseline::teardown() {
  mask_ = DeviceBuffer();
  pos_ = DeviceBuffer();
  counts_ = DeviceBuffer();
  displ_ = DeviceBuffer();
  host_counts_ = PinnedBuffer();
  send_ = DeviceBuffer();
  recv_ = DeviceBuffer();
  combine_in_ = DeviceBuffer();
  returned_ = DeviceBuffer();
  out_ = DeviceBuffer();
  if (counts_ready_ != nullptr) cudaEventDestroy(counts_ready_);
  counts_ready_ = nullptr;
  data_ = nullptr;
}

}  // namespace expertlink::bench
