// el_bench: the workloads of shared/WORKLOADS.md on every local GPU (one process each), the NCCL
// baseline and the NVLink floor measured in the same run; a table on stdout, a JSON file and a plot.
//
// Process layout: this parent never initialises CUDA (children of a CUDA-initialised process cannot use
// CUDA). It forks a short-lived process that owns all GPUs to measure the floor (floor.hpp), then one
// process per GPU (multiproc::run_ranks); rank 0 passes its records back through an anonymous shared
// page as JSON text; the parent writes the table, the JSON file and runs bench/plot.py.
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "floor.hpp"
#include "multiproc.hpp"
#include "options.hpp"
#include "report.hpp"
#include "runner.hpp"

namespace el = expertlink;
namespace eb = expertlink::bench;

namespace {

// Rank 0 -> parent: length-prefixed JSON text in a MAP_SHARED page made before the fork.
class SharedBlob {
 public:
  explicit SharedBlob(size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    base_ = p == MAP_FAILED ? nullptr : static_cast<char*>(p);
    if (base_ != nullptr) std::memset(base_, 0, sizeof(size_t));
  }
  ~SharedBlob() {
    if (base_ != nullptr) munmap(base_, bytes_);
  }
  SharedBlob(const SharedBlob&) = delete;
  SharedBlob& operator=(const SharedBlob&) = delete;
  bool ok() const { return base_ != nullptr; }
  bool write(const std::string& s) {
    if (s.size() + sizeof(size_t) > bytes_) return false;
    std::memcpy(base_ + sizeof(size_t), s.data(), s.size());
    size_t n = s.size();
    std::memcpy(base_, &n, sizeof n);
    return true;
  }
  std::string read() const {
    size_t n = 0;
    std::memcpy(&n, base_, sizeof n);
    return n + sizeof(size_t) <= bytes_ ? std::string(base_ + sizeof(size_t), n) : std::string();
  }

 private:
  char* base_ = nullptr;
  size_t bytes_;
};

std::string driver_version() {
  FILE* p = popen("nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null", "r");
  if (p == nullptr) return "unknown";
  char line[128] = {};
  bool got = std::fgets(line, sizeof line, p) != nullptr;
  pclose(p);
  std::string s = got ? line : "";
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s.empty() ? "unknown" : s;
}

std::string fmt_gbps(const std::optional<double>& v) {
  if (!v) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GB/s", *v);
  return buf;
}

int plot(const std::string& json_path) {
  if (std::system("python3 -c 'import matplotlib' >/dev/null 2>&1") != 0) {
    std::printf("plot: skipped (python3 with matplotlib not found); later: python3 %s %s\n", eb::kPlotScript,
                json_path.c_str());
    return 0;
  }
  std::string cmd = std::string("python3 '") + eb::kPlotScript + "' '" + json_path + "'";
  int rc = std::system(cmd.c_str());
  if (rc != 0) std::printf("plot: %s failed (status %d)\n", cmd.c_str(), rc);
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  eb::Options opts;
  int rc = eb::parse_options(argc, argv, std::getenv("EL_COMMIT"), opts);
  if (rc >= 0) return rc;
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);  // DESIGN.md: NVLink multicast stays off

  const int visible = el::multiproc::visible_gpu_count();
  if (visible == 0) {
    std::printf(
        "el_bench: needs CUDA GPUs; found 0 (no CUDA driver or no visible device): nothing measured\n");
    return 0;
  }
  const int gpus = opts.gpus > 0 ? opts.gpus : visible;
  if (gpus > visible) {
    std::fprintf(stderr, "el_bench: --gpus %d but only %d GPUs are visible\n", gpus, visible);
    return 2;
  }
  if (!opts.seed_given)
    opts.seed = (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();

  eb::RunInfo info;
  info.gpus = gpus;
  info.driver = driver_version();
  info.commit = opts.commit;
  info.date = eb::utc_date(std::time(nullptr));
  info.seed = opts.seed;
  info.iters = opts.iters;
  info.warmup = opts.warmup;

  eb::FloorResult floor = eb::measure_floor(180.0);
  info.peer_copy_gbps = floor.peer_gbps;
  info.d2d_copy_gbps = floor.d2d_gbps;
  std::printf(
      "el_bench: %d x %s (%d visible, %d SMs), driver %s, commit %s, seed %llu, %d iterations after %d "
      "warm-up\n",
      gpus, floor.card.empty() ? "?" : floor.card.c_str(), visible, floor.sm_count, info.driver.c_str(),
      info.commit.c_str(), static_cast<unsigned long long>(opts.seed), opts.iters, opts.warmup);
  std::printf(
      "floor: peer copy GPU0->GPU1 %s (cudaMemcpyPeerAsync of 1 GiB, bytes counted once); "
      "D2D copy on GPU0 %s (bytes copied per second; each is read and written once)%s%s\n",
      fmt_gbps(floor.peer_gbps).c_str(), fmt_gbps(floor.d2d_gbps).c_str(), floor.note.empty() ? "" : "; ",
      floor.note.c_str());
  if (gpus == 1)
    std::printf("one rank: every row is local, no peer traffic; floor_us and /floor are not defined\n");
  std::printf(
      "bytes: HT = rows received x row bytes, LL = selections sent x row bytes, of the busiest rank; "
      "us = slowest rank's median; floor = remote bytes / peer copy GB/s\n");
  std::fflush(stdout);

  SharedBlob blob(size_t{64} << 20);
  if (!blob.ok()) {
    std::perror("el_bench: mmap");
    return 1;
  }
  std::optional<double> peer = gpus >= 2 ? floor.peer_gbps : std::nullopt;
  rc = el::multiproc::run_ranks(gpus, opts.timeout_s, [&](const el::multiproc::RankContext& ctx) {
    eb::RankOutput out = eb::run_rank(opts, peer, ctx);
    if (ctx.rank == 0) {
      nlohmann::json j{{"card", out.card},
                       {"sm_count", out.sm_count},
                       {"nccl_version", out.nccl_version},
                       {"failures", out.failures},
                       {"records", nlohmann::json::array()}};
      for (const eb::Record& r : out.records) j["records"].push_back(eb::record_to_json(r));
      if (!blob.write(j.dump())) std::fprintf(stderr, "el_bench: the records do not fit the shared page\n");
    }
    return out.failures == 0 ? 0 : 3;
  });

  std::vector<eb::Record> records;
  long long failures = 0;
  const std::string text = blob.read();
  if (!text.empty()) {
    nlohmann::json j = nlohmann::json::parse(text);
    info.card = j.at("card").get<std::string>();
    info.sm_count = j.at("sm_count").get<int>();
    info.nccl_version = j.at("nccl_version").get<int>();
    failures = j.at("failures").get<long long>();
    for (const auto& r : j.at("records")) records.push_back(eb::record_from_json(r));
  }
  if (info.card.empty()) info.card = floor.card.empty() ? "unknown" : floor.card;
  if (info.sm_count == 0) info.sm_count = floor.sm_count;

  if (!records.empty())
    std::printf("\nsummary (NCCL %d):\n%s", info.nccl_version, eb::format_table(records).c_str());
  if (rc != 0 || failures != 0 || text.empty()) {
    std::printf("el_bench: FAILED (ranks' exit status %d, %lld failed checks): nothing recorded\n", rc,
                failures);
    return rc != 0 ? rc : 1;
  }
  if (!opts.recorded()) {
    std::printf("el_bench: not recorded (%s): figures need --iters >= 50 and --l2-flush write\n",
                opts.quick        ? "--quick"
                : opts.iters < 50 ? "--iters < 50"
                                  : "--l2-flush not write");
    return 0;
  }
  std::error_code ec;
  std::filesystem::create_directories(opts.out, ec);
  const std::string path = (std::filesystem::path(opts.out) / eb::result_filename(info)).string();
  std::ofstream f(path);
  f << eb::make_report(info, records).dump(1) << "\n";
  f.close();
  if (!f) {
    std::fprintf(stderr, "el_bench: could not write %s\n", path.c_str());
    return 1;
  }
  std::printf("wrote %s\n", path.c_str());
  if (opts.plot) plot(path);
  return 0;
}
