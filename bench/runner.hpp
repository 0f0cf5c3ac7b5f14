// One rank's part of el_bench: for each family, token count and routing, make the case's inputs, then
// for each implementation, workload and variant: prepare, time, check, and (rank 0) turn the result into a
// Record.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "impl.hpp"
#include "multiproc.hpp"
#include "options.hpp"
#include "report.hpp"

namespace expertlink::bench {

struct RankOutput {
  std::vector<Record> records;  // rank 0 only
  long long failures = 0;       // checks that failed, over all ranks
  std::string card;
  int sm_count = 0;
  int nccl_version = 0;
};

// The implementations named (empty: all), the NCCL baseline first; `sms`: the SM counts ExpertLink is
// measured at (--sms).
std::vector<std::unique_ptr<Impl>> make_impls(const std::vector<std::string>& names, double wait_timeout_s,
                                              const std::vector<int>& sms);

// Collective over every rank of the launch. Rank 0 prints each record as it is measured.
RankOutput run_rank(const Options& options, std::optional<double> peer_gbps,
                    const multiproc::RankContext& ctx);

}  // namespace expertlink::bench
