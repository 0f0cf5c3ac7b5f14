// The checks that keep every figure honest: the rows a dispatch delivered are the rows that should have
// arrived (all of them, every element), and a combine's sums are the sums of the expert outputs the
// harness wrote (expert_output_factor), computed on the host from this rank's own inputs.
#pragma once

#include <string>

#include <cuda_runtime.h>

#include "case_data.hpp"
#include "impl.hpp"

namespace expertlink::bench {

struct CheckResult {
  bool ok = true;
  long long mismatches = 0;
  std::string first;  // the first mismatch: row, column, expected, got
  // Combine: values within the tolerance that still differ bitwise from the host's float32 sum (HT:
  // ascending destination rank, the oracle's order; LL: top-k slot order). Informational.
  long long inexact = 0;
};

// Writes the expert outputs of out.ids into out.rows (device) on `stream`.
void fill_expert_outputs(const ExpertOutputs& out, const CaseData& data, cudaStream_t stream);

CheckResult check_dispatch(Op op, const DispatchView& view, const CaseData& data, cudaStream_t stream,
                           double wait_timeout_s);
CheckResult check_combine(Op op, const uint16_t* out, const CaseData& data, cudaStream_t stream,
                          double wait_timeout_s);

}  // namespace expertlink::bench
