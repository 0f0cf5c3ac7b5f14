#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "harness.hpp"

namespace expertlink::test {

std::vector<GpuCase>& registry() {
  static std::vector<GpuCase> cases;
  return cases;
}

}  // namespace expertlink::test

int main(int argc, char** argv) {
  using namespace expertlink;
  CLI::App app{"ExpertLink multi-GPU tests: one process per GPU"};
  std::string name;
  int ranks = 0;
  bool list = false;
  app.add_option("case", name, "test case to run");
  app.add_option("--ranks", ranks, "number of ranks (default: all visible GPUs)")->check(CLI::Range(1, 64));
  app.add_flag("--list", list, "list the cases");
  CLI11_PARSE(app, argc, argv);

  auto& cases = test::registry();
  if (list || name.empty()) {
    for (const auto& c : cases) std::printf("%s (>= %d GPUs)\n", c.name, c.min_ranks);
    return name.empty() && !list ? 2 : 0;
  }
  auto it = std::find_if(cases.begin(), cases.end(), [&](const test::GpuCase& c) { return name == c.name; });
  if (it == cases.end()) {
    std::fprintf(stderr, "no GPU test case named '%s' (--list shows them)\n", name.c_str());
    return 2;
  }
  const int gpus = multiproc::visible_gpu_count();
  if (gpus == 0 || gpus < it->min_ranks) {
    std::printf("SKIP %s: needs %d CUDA GPU(s), found %d\n", it->name, it->min_ranks, gpus);
    return multiproc::kSkipExitCode;
  }
  if (ranks == 0) ranks = gpus;
  if (ranks > gpus || ranks < it->min_ranks) {
    std::fprintf(stderr, "--ranks %d: this case needs %d to %d ranks here (one per GPU)\n", ranks,
                 it->min_ranks, gpus);
    return 2;
  }
  std::printf("RUN  %s on %d rank(s), %d GPU(s)\n", it->name, ranks, gpus);
  std::fflush(stdout);
  auto t0 = std::chrono::steady_clock::now();
  int rc = multiproc::run_ranks(ranks, it->timeout_s, it->body);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s %s (%.2f s)\n", rc == 0 ? "PASS" : "FAIL", it->name, s);
  return rc == 0 ? 0 : 1;
}
