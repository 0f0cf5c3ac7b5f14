// An implementation of the workloads: the NCCL baseline (nccl_baseline.hpp) is the first; ExpertLink's
// own kernels plug in as another (expertlink_impl.hpp). The harness (runner.cpp) calls, per case:
//   setup(data) -> for each op, for each of its variants: select(op, variant) -> prepare(op) [untimed]
//   -> many times: before_run(op) [untimed], run(op) [timed], after_run(op) [untimed]
//   -> views and check_own(op) [checked] -> teardown().
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <nccl.h>

#include "case_data.hpp"
#include "workloads.hpp"

namespace expertlink::bench {

enum class RowFormat { kBf16, kFp8 };

// Where a dispatch's received rows are, for the check: row j holds ids[j]'s token.
struct DispatchView {
  int64_t rows_received = 0;  // how many rows the implementation says arrived (checked against ids.size())
  RowFormat format = RowFormat::kBf16;
  const uint8_t* data = nullptr;  // row j's BF16 or e4m3 values at data + j * data_stride
  int64_t data_stride = 0;        // bytes
  const float* scales = nullptr;  // kFp8: row j's hidden/128 scales at scales + j * scales_stride
  int64_t scales_stride = 0;      // floats
  // Optional per-row source info {token, slot, expert, src_rank} (int32 x 4) at meta + j * meta_stride
  // bytes, compared with ids[j] when set.
  const uint8_t* meta = nullptr;
  int64_t meta_stride = 0;
  std::vector<RowId> ids;
  // Optional, for layouts with gaps (LL's expert-major slots): ids[j]'s row is row positions[j] of data,
  // scales and meta (strides as above) instead of row j. Empty: row j.
  std::vector<int64_t> positions;
};

// The rows a combine sends back, [ids.size(), hidden] BF16 on the device; the harness writes the expert
// outputs of ids[j] into row j before timing.
struct ExpertOutputs {
  uint16_t* rows = nullptr;
  std::vector<RowId> ids;
  std::vector<int64_t> positions;  // optional: ids[j]'s row is row positions[j] of `rows`; empty: row j
};

// One configuration of an op measured as its own record (another SM count, another sizing mode). The
// record's workload is op_name(op) + suffix; sms() and buffer_bytes() are read after select().
struct Variant {
  int id = 0;          // the implementation's own index
  std::string suffix;  // appended to the workload name, e.g. "_exact"; "" for the op as WORKLOADS.md names it
};

class Impl {
 public:
  virtual ~Impl() = default;
  virtual std::string name() const = 0;  // the JSON "library"
  virtual bool supports(Op op) const = 0;
  virtual std::optional<int> sms(Op op) const = 0;               // SMs its kernels hold; nullopt for NCCL
  virtual std::optional<int64_t> buffer_bytes(Op op) const = 0;  // symmetric bytes per GPU; nullopt for NCCL

  // Untimed: allocate what the case needs (collective).
  virtual void setup(const CaseData& data, ncclComm_t comm, cudaStream_t stream) = 0;
  // The configurations of `op` to measure, one record each (default: one). The same on every rank.
  virtual std::vector<Variant> variants(Op) const { return {Variant{}}; }
  // Untimed, before prepare(op): the configuration that prepare, run and sms use until the next select.
  virtual void select(Op, const Variant&) {}
  // Untimed, before timing `op` (collective): what a user does once, e.g. a dispatch that a combine needs.
  // For an op with a combine, returns the rows it will send back.
  virtual ExpertOutputs prepare(Op op, cudaStream_t stream) = 0;
  // Timed (collective): enqueue one `op` on `stream`; may wait on the host where the method must.
  virtual void run(Op op, cudaStream_t stream) = 0;
  // Untimed, around every run(op), warm-up included (collective): before_run is enqueued before the L2
  // flush and the ranks' line-up, after_run after the run's end event. For what a figure leaves out (the
  // other half of a split call) and for re-poisoning outputs so that the checked run wrote them itself.
  virtual void before_run(Op, cudaStream_t) {}
  virtual void after_run(Op, cudaStream_t) {}
  // After run(op): its dispatch's received rows (op_has_dispatch) and its combined [tokens, hidden] BF16
  // output (op_has_combine).
  virtual DispatchView dispatch_view(Op op) = 0;
  virtual const uint16_t* combine_output(Op op) = 0;
  // After the harness's checks of run(op): checks of the implementation's own outputs (its routing
  // metadata, flags, weights); the first problem found, or "" when none.
  virtual std::string check_own(Op) { return {}; }
  virtual void teardown() = 0;
};

}  // namespace expertlink::bench
