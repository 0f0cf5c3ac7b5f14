#include "multiproc.hpp"

#include <execinfo.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

namespace expertlink::multiproc {
namespace {

using Clock = std::chrono::steady_clock;

// Lives in a MAP_SHARED page: rank 0 writes `id`, then publishes `ready` with release order.
struct SharedId {
  std::atomic<int> ready;
  ncclUniqueId id;
};

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int crash_rank = -1;

// A rank that crashes prints its stack (function names: executables link with -rdynamic) before dying
// of the same signal, so a crash on the GPU machine can be read from the log alone.
void on_fatal_signal(int sig) {
  char line[96];
  const int n = std::snprintf(line, sizeof(line), "[rank %d] fatal signal %d (%s); stack:\n", crash_rank, sig,
                              strsignal(sig));
  if (n > 0) (void)!write(STDERR_FILENO, line, static_cast<size_t>(n));
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), STDERR_FILENO);
  signal(sig, SIG_DFL);
  raise(sig);
}

int child_main(SharedId* shared, int rank, int num_ranks, double timeout_s,
               const std::function<int(const RankContext&)>& body) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the launcher
  crash_rank = rank;
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) signal(sig, on_fatal_signal);
  try {
    RankContext ctx{};
    ctx.rank = rank;
    ctx.num_ranks = num_ranks;
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      std::fprintf(stderr, "[rank %d] no CUDA device visible\n", rank);
      return 1;
    }
    ctx.device = rank % devices;
    if (rank == 0) {
      ncclResult_t res = ncclGetUniqueId(&shared->id);
      if (res != ncclSuccess) {
        std::fprintf(stderr, "[rank 0] ncclGetUniqueId failed: %s\n", ncclGetErrorString(res));
        shared->ready.store(-1, std::memory_order_release);
        return 1;
      }
      shared->ready.store(1, std::memory_order_release);
    } else {
      auto t0 = Clock::now();
      int state = 0;
      while ((state = shared->ready.load(std::memory_order_acquire)) == 0) {
        if (seconds_since(t0) > timeout_s) {
          std::fprintf(stderr, "[rank %d] timed out after %.1f s waiting for rank 0's NCCL unique id\n", rank,
                       timeout_s);
          return 1;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      if (state < 0) return 1;
    }
    ctx.id = shared->id;
    return body(ctx);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] %s\n", rank, e.what());
    return 1;
  }
}

}  // namespace

int visible_gpu_count() {
  int fds[2];
  if (pipe(fds) != 0) return 0;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    ssize_t w = write(fds[1], &n, sizeof n);
    _exit(w == sizeof n ? 0 : 1);
  }
  close(fds[1]);
  int n = 0;
  if (pid < 0 || read(fds[0], &n, sizeof n) != sizeof n) n = 0;
  close(fds[0]);
  if (pid > 0) waitpid(pid, nullptr, 0);
  return n;
}

int run_ranks(int num_ranks, double timeout_s, const std::function<int(const RankContext&)>& body,
              double grace_s) {
  void* page = mmap(nullptr, sizeof(SharedId), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) {
    std::perror("mmap");
    return 1;
  }
  auto* shared = new (page) SharedId();
  std::fflush(stdout);
  std::fflush(stderr);

  std::vector<pid_t> pids(num_ranks, -1);
  for (int r = 0; r < num_ranks; ++r) {
    pid_t pid = fork();
    if (pid == 0) {
      int rc = child_main(shared, r, num_ranks, timeout_s, body);
      std::fflush(stdout);
      std::fflush(stderr);
      _exit(rc);
    }
    if (pid < 0) {
      std::perror("fork");
      for (pid_t p : pids)
        if (p > 0) kill(p, SIGKILL);
      return 1;
    }
    pids[r] = pid;
  }

  // Reap children; after the first failure the others get `grace_s` to notice (their own bounded waits
  // should make them fail fast), then everyone left is killed and named.
  std::vector<int> status(num_ranks, -1);
  int remaining = num_ranks, first_error = 0;
  auto t0 = Clock::now();
  double deadline = timeout_s;
  while (remaining > 0) {
    int st = 0;
    pid_t pid = waitpid(-1, &st, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < num_ranks; ++r) {
        if (pids[r] != pid) continue;
        --remaining;
        int rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
        status[r] = rc;
        if (WIFSIGNALED(st)) std::fprintf(stderr, "[launcher] rank %d died of signal %d\n", r, WTERMSIG(st));
        if (rc != 0 && first_error == 0) {
          first_error = rc;
          deadline = std::min(deadline, seconds_since(t0) + grace_s);
        }
      }
      continue;
    }
    if (seconds_since(t0) > deadline) {
      for (int r = 0; r < num_ranks; ++r) {
        if (status[r] != -1) continue;
        std::fprintf(stderr, "[launcher] rank %d did not finish within %.1f s: killed\n", r, deadline);
        kill(pids[r], SIGKILL);
        waitpid(pids[r], nullptr, 0);
        status[r] = 124;
        --remaining;
      }
      if (first_error == 0) first_error = 124;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  munmap(page, sizeof(SharedId));
  return first_error;
}

}  // namespace expertlink::multiproc
