// What el_bench reports: one Record per (workload, library, routing, tokens), the run's facts, the JSON
// file of WORKLOADS.md and the table on stdout. CUDA-free and tested on CI.
#pragma once

#include <cstdint>
#include <ctime>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace expertlink::bench {

struct Record {
  std::string workload;  // op_name()
  std::string library;   // Impl::name()
  std::string routing;   // "uniform" / "skewed"
  int64_t tokens = 0;    // tokens per rank
  double us = 0;         // slowest rank's median
  double gbps = 0;       // bytes / us
  std::optional<double> floor_us;
  std::optional<int> sms;               // SMs the kernels hold; null for NCCL
  std::optional<int64_t> buffer_bytes;  // symmetric buffer bytes per GPU; null for NCCL
  int64_t bytes = 0;                    // logical bytes of the busiest rank (workloads.hpp: OpBytes)
  int64_t remote_bytes = 0;             // what floor_us divides
  std::vector<double> rank_us;          // every rank's median
  std::optional<double>
      kernel_us;  // kernel time (kernel_clock.hpp), slowest rank's median; null if not timed
  std::vector<double> rank_kernel_us;  // every rank's kernel-time median
  bool verified = false;               // the output was checked against the expected rows and sums
};

struct RunInfo {
  std::string card;
  int gpus = 0;
  std::string driver;
  std::string commit;
  std::string date;  // UTC YYYY-MM-DD
  std::optional<double> peer_copy_gbps;
  std::optional<double> d2d_copy_gbps;
  uint64_t seed = 0;
  int iters = 0;
  int warmup = 0;
  int nccl_version = 0;
  int sm_count = 0;
};

nlohmann::json record_to_json(const Record& r);
Record record_from_json(const nlohmann::json& j);

// {"card", "gpus", "driver", "commit", "date", "peer_copy_gbps", "d2d_copy_gbps", "records": [...]} plus
// "seed", "iters", "warmup", "nccl_version", "sm_count".
nlohmann::json make_report(const RunInfo& info, const std::vector<Record>& records);

std::string utc_date(std::time_t t);
// "NVIDIA H200" -> "NVIDIA-H200"; anything but [A-Za-z0-9._-] becomes '-'.
std::string sanitize_card(const std::string& card);
// "<date>_<card>x<gpus>.json"
std::string result_filename(const RunInfo& info);

// NCCL's time for the same workload, routing and tokens (for a variant "<workload>_<suffix>", the
// workload's); nullopt if it was not run.
std::optional<double> baseline_us(const std::vector<Record>& records, const Record& r);

// One line per record: workload, library, routing, tokens, us, GB/s, floor us, us/floor, SMs, buffer MB,
// NCCL us, speed-up over NCCL, kernel us, check.
std::string format_table(const std::vector<Record>& records);
std::string format_row(const std::vector<Record>& records, const Record& r);
std::string table_header();

}  // namespace expertlink::bench
