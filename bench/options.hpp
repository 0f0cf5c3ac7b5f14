// el_bench's command line (CLI11). Parsing is CUDA-free and tested on CI.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "workloads.hpp"

namespace expertlink::bench {

struct Options {
  int gpus = 0;  // 0: every visible GPU
  int iters = 50;
  int warmup = 10;
  uint64_t seed = 0;
  bool seed_given = false;  // else a fresh seed is drawn and printed
  std::string routing = "both";
  std::vector<std::string> workloads;  // empty: all
  std::vector<std::string> libraries;  // empty: all
  std::vector<int> sms = {24, 8};      // SM counts of ExpertLink's kernels, one record each
  std::string out;
  std::string commit;
  bool sweep = false;
  bool quick = false;
  bool plot = true;
  double timeout_s = 600.0;
  // > 1: each rank gets NCCL_HOSTID of node rank / (R / n) and NCCL's P2P/SHM transports are off, so the
  // communicator spans n "nodes" of this host (ExpertLink then takes its internode path; docs/internode.md).
  int emulate_nodes = 1;
  // How the L2 is emptied before each timed run: "write" (WORKLOADS.md, the only recorded way), "read"
  // (the same 256 MiB read, so the L2 holds clean lines) or "off"; the other two are for diagnosis.
  std::string l2_flush = "write";
  // Kernel time (kernel_clock.hpp) beside the event time: "auto" (when el_bench has CUPTI), "on" or "off".
  std::string kernel_time = "auto";

  // Derived from the above by parse_options.
  std::vector<Op> ops;
  std::vector<workload::Routing> routings;
  // WORKLOADS.md: figures are medians of >= 50, with the L2 flushed by writing.
  bool recorded() const { return iters >= 50 && !quick && l2_flush == "write"; }
};

inline constexpr const char* kDefaultOutDir = EL_BENCH_DEFAULT_OUT;
inline constexpr const char* kPlotScript = EL_BENCH_PLOT_SCRIPT;

// Fills `options` from argv. Returns -1 to go on, or the exit code to leave with (0 after --help; the
// parse error has been printed otherwise). `commit_env` is EL_COMMIT's value (nullptr: unset).
int parse_options(int argc, const char* const* argv, const char* commit_env, Options& options);

// Tokens per rank to run for `family`: the nominal shape, or the sweep.
std::vector<int64_t> token_list(const Options& options, Family family);

}  // namespace expertlink::bench
