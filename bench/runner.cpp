#include "runner.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "check.hpp"
#include "expertlink/communicator.hpp"
#include "expertlink_impl.hpp"
#include "expertlink_ll_impl.hpp"
#include "kernel_clock.hpp"
#include "nccl_baseline.hpp"
#include "timing.hpp"
#include "verify.hpp"

namespace expertlink::bench {
namespace {

constexpr double kWaitTimeoutS = 120.0;  // any one host wait; the whole run is bounded by run_ranks

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { EL_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

// Times and checks one workload of one implementation; returns its record (meaningful on rank 0).
Record measure(Impl& impl, Op op, const Variant& variant, const CaseData& data, Timer& timer,
               cudaStream_t stream, std::optional<double> peer_gbps, long long& failures) {
  const std::string workload = op_name(op) + variant.suffix;
  impl.select(op, variant);
  const Inputs& in = data.inputs();
  ExpertOutputs outputs = impl.prepare(op, stream);
  if (op_has_combine(op)) fill_expert_outputs(outputs, data, stream);
  wait_stream(stream, kWaitTimeoutS, "the preparation");

  Timed t = timer.time([&] { impl.run(op, stream); }, [&] { impl.before_run(op, stream); },
                       [&] { impl.after_run(op, stream); });

  // The last timed run's output is what gets checked.
  std::vector<std::string> problems;
  if (op_has_dispatch(op)) {
    CheckResult c = check_dispatch(op, impl.dispatch_view(op), data, stream, kWaitTimeoutS);
    if (!c.ok)
      problems.push_back("dispatch: " + std::to_string(c.mismatches) + " mismatches; first: " + c.first);
  }
  if (op_has_combine(op)) {
    CheckResult c = check_combine(op, impl.combine_output(op), data, stream, kWaitTimeoutS);
    if (!c.ok)
      problems.push_back("combine: " + std::to_string(c.mismatches) + " mismatches; first: " + c.first);
    else if (c.inexact > 0 && in.rank == 0)
      std::fprintf(stderr,
                   "note: %s %s: %lld combined values of rank 0 are within tolerance but not bitwise equal "
                   "to the host's float32 sum in the oracle's order\n",
                   impl.name().c_str(), workload.c_str(), c.inexact);
  }
  if (std::string own = impl.check_own(op); !own.empty()) problems.push_back(own);
  const std::optional<int> sms = impl.sms(op);
  const std::string sms_text = sms ? ", " + std::to_string(*sms) + " SMs" : "";
  for (const std::string& p : problems)
    std::fprintf(stderr, "[rank %d] CHECK FAILED %s %s %s routing, %lld tokens%s: %s\n", in.rank,
                 impl.name().c_str(), workload.c_str(), routing_label(data.routing()),
                 static_cast<long long>(in.tokens), sms_text.c_str(), p.c_str());
  const long long bad = timer.allreduce_sum(problems.empty() ? 0 : 1);
  failures += bad;

  const OpBytes ob = op_bytes(op, data.traffic(), in.hidden);
  Record r;
  r.workload = workload;
  r.library = impl.name();
  r.routing = routing_label(data.routing());
  r.tokens = in.tokens;
  r.us = t.us;
  r.gbps = gbps(ob.bytes, t.us);
  r.floor_us = floor_us(ob.remote_bytes, peer_gbps);
  r.sms = sms;
  r.buffer_bytes = impl.buffer_bytes(op);
  r.bytes = ob.bytes;
  r.remote_bytes = ob.remote_bytes;
  r.rank_us = t.rank_us;
  r.kernel_us = t.kernel_us;
  r.rank_kernel_us = t.rank_kernel_us;
  r.verified = bad == 0;
  return r;
}

}  // namespace

std::vector<std::unique_ptr<Impl>> make_impls(const std::vector<std::string>& names, double wait_timeout_s,
                                              const std::vector<int>& sms) {
  std::vector<std::unique_ptr<Impl>> impls;
  auto wanted = [&](const char* n) {
    return names.empty() || std::find(names.begin(), names.end(), n) != names.end();
  };
  if (wanted("nccl")) impls.push_back(std::make_unique<NcclBaseline>(wait_timeout_s));
  if (wanted("expertlink")) {
    impls.push_back(std::make_unique<ExpertLinkImpl>(sms));  // HT
    impls.push_back(std::make_unique<ExpertLinkLlImpl>());   // LL, same library name
  }
  return impls;
}

RankOutput run_rank(const Options& options, std::optional<double> peer_gbps,
                    const multiproc::RankContext& ctx) {
  if (options.emulate_nodes > 1) {
    EL_CHECK(ctx.num_ranks % options.emulate_nodes == 0, "--emulate-nodes %d does not divide the %d GPUs",
             options.emulate_nodes, ctx.num_ranks);
    const int node = ctx.rank / (ctx.num_ranks / options.emulate_nodes);
    setenv("NCCL_HOSTID", ("el-bench-emulated-node-" + std::to_string(node)).c_str(), 1);
    setenv("NCCL_P2P_DISABLE", "1", 0);
    setenv("NCCL_SHM_DISABLE", "1", 0);
    setenv("NCCL_IB_DISABLE", "1", 0);  // sockets: the same NET transport on every host
    setenv("NCCL_SOCKET_IFNAME", "lo", 0);
  }
  Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  RankOutput out;
  cudaDeviceProp prop{};
  EL_CUDA_CHECK(cudaGetDeviceProperties(&prop, ctx.device));
  out.card = prop.name;
  out.sm_count = prop.multiProcessorCount;
  EL_NCCL_CHECK(ncclGetVersion(&out.nccl_version));

  Stream stream;
  Timer timer(comm.nccl(), stream.s, options.warmup, options.iters, kWaitTimeoutS, options.l2_flush,
              options.kernel_time == "on" || (options.kernel_time == "auto" && KernelClock::available()));
  std::vector<std::unique_ptr<Impl>> impls = make_impls(options.libraries, kWaitTimeoutS, options.sms);
  const bool lead = ctx.rank == 0;
  if (lead) {
    std::printf("\n%s\n", table_header().c_str());
    std::fflush(stdout);
  }

  for (Family family : {Family::kHt, Family::kLl}) {
    std::vector<Op> ops;
    for (Op op : options.ops)
      if (op_family(op) == family) ops.push_back(op);
    if (ops.empty()) continue;
    for (int64_t tokens : token_list(options, family)) {
      for (workload::Routing routing : options.routings) {
        CaseData data(family, tokens, routing, options.seed, ctx.rank, ctx.num_ranks, comm.nccl(), stream.s,
                      kWaitTimeoutS);
        for (auto& impl : impls) {
          if (std::none_of(ops.begin(), ops.end(), [&](Op op) { return impl->supports(op); })) continue;
          impl->setup(data, comm.nccl(), stream.s);
          for (Op op : ops) {
            if (!impl->supports(op)) continue;
            for (const Variant& v : impl->variants(op)) {
              Record r = measure(*impl, op, v, data, timer, stream.s, peer_gbps, out.failures);
              if (lead) {
                out.records.push_back(r);
                std::printf("%s\n", format_row(out.records, r).c_str());
                std::fflush(stdout);
              }
            }
          }
          impl->teardown();
        }
      }
    }
  }
  wait_stream(stream.s, kWaitTimeoutS, "the last operations");
  return out;
}

}  // namespace expertlink::bench
