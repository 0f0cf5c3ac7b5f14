#include "options.hpp"

#include <algorithm>

#include <CLI/CLI.hpp>

namespace expertlink::bench {

int parse_options(int argc, const char* const* argv, const char* commit_env, Options& o) {
  CLI::App app{
      "el_bench: ExpertLink's MoE dispatch/combine workloads (shared/WORKLOADS.md) against an NCCL "
      "baseline and the NVLink floor; prints a table, writes <out>/<date>_<card>x<gpus>_<commit>.json and a "
      "plot",
      "el_bench"};
  std::vector<std::string> known;
  for (Op op : kAllOps) known.push_back(op_name(op));
  std::vector<std::string> workload_choices = known;
  workload_choices.push_back("ht");
  workload_choices.push_back("ll");

  app.add_option("--gpus", o.gpus, "GPUs (one process each); default: every visible GPU")
      ->check(CLI::Range(1, 32));
  app.add_option("--iters", o.iters, "timed runs per figure (median); figures are recorded only with >= 50")
      ->check(CLI::Range(1, 100000));
  app.add_option("--warmup", o.warmup, "untimed runs before timing")->check(CLI::Range(0, 100000));
  app.add_option("--seed", o.seed, "routing and data seed; default: a fresh one, printed");
  app.add_option("--routing", o.routing, "uniform, skewed or both")
      ->check(CLI::IsMember({"uniform", "skewed", "both"}));
  app.add_option("--workloads", o.workloads,
                 "subset, comma separated: " + CLI::detail::join(workload_choices))
      ->delimiter(',')
      ->check(CLI::IsMember(workload_choices));
  app.add_option("--libraries", o.libraries,
                 "subset of the implementations, comma separated: nccl (the baseline), expertlink")
      ->delimiter(',')
      ->check(CLI::IsMember({"nccl", "expertlink"}));
  app.add_option("--sms", o.sms,
                 "SM counts of ExpertLink's kernels (num_sms), comma separated; one record each")
      ->delimiter(',')
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  o.out = kDefaultOutDir;
  app.add_option("--out", o.out, "folder for the JSON and the plot")->capture_default_str();
  o.commit = commit_env != nullptr && *commit_env != '\0' ? commit_env : "unknown";
  app.add_option("--commit", o.commit, "commit recorded in the JSON (default: $EL_COMMIT, else unknown)");
  app.add_flag("--sweep", o.sweep, "token sweep for the plot: HT 256..8192, LL 1..256 tokens per rank");
  app.add_flag("--quick", o.quick,
               "smoke run: 10 iterations, 2 warm-up, uniform routing unless given; nothing recorded");
  bool no_plot = false;
  app.add_flag("--no-plot", no_plot, "do not run bench/plot.py on the JSON");
  app.add_option("--emulate-nodes", o.emulate_nodes,
                 "split the GPUs into this many emulated nodes (NCCL_HOSTID per rank, NET transport): the "
                 "internode path on one host; use another --out than the intranode run")
      ->check(CLI::Range(1, 64));
  app.add_option("--l2-flush", o.l2_flush,
                 "how the L2 is emptied before each run: write (WORKLOADS.md; the only way recorded), read "
                 "(clean lines left) or off; read and off are for diagnosis")
      ->check(CLI::IsMember({"write", "read", "off"}))
      ->capture_default_str();
  app.add_option("--kernel-time", o.kernel_time,
                 "also time every operation in kernel time (CUPTI: how long the GPU ran what it enqueued, as "
                 "DeepEP's kineto figures), in runs of its own after the event-timed ones: auto (when built "
                 "with CUPTI), on or off")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
  app.add_option("--timeout", o.timeout_s, "seconds the whole run may take before every rank is killed")
      ->check(CLI::Range(10.0, 86400.0));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  o.plot = !no_plot;
  o.seed_given = app.count("--seed") > 0;
  if (o.quick) {
    if (app.count("--iters") == 0) o.iters = 10;
    if (app.count("--warmup") == 0) o.warmup = 2;
    if (app.count("--routing") == 0) o.routing = "uniform";
  }

  std::vector<int> sms;  // without repeats, in the order given
  for (int v : o.sms)
    if (std::find(sms.begin(), sms.end(), v) == sms.end()) sms.push_back(v);
  o.sms = sms;

  o.ops.clear();
  for (Op op : kAllOps) {
    bool wanted = o.workloads.empty();
    for (const std::string& w : o.workloads) {
      if (w == op_name(op) || (w == "ht" && op_family(op) == Family::kHt) ||
          (w == "ll" && op_family(op) == Family::kLl))
        wanted = true;
    }
    if (wanted) o.ops.push_back(op);
  }
  o.routings.clear();
  if (o.routing != "skewed") o.routings.push_back(workload::Routing::kUniform);
  if (o.routing != "uniform") o.routings.push_back(workload::Routing::kSkewed);
  return -1;
}

std::vector<int64_t> token_list(const Options& o, Family family) {
  if (o.sweep && !o.quick) return sweep_tokens(family);
  return {nominal_tokens(family)};
}

}  // namespace expertlink::bench
