#include "floor.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include <cuda_runtime.h>

#include "workloads.hpp"

namespace expertlink::bench {
namespace {

constexpr size_t kCopyBytes = size_t{1} << 30;
constexpr int kWarmup = 2;
constexpr int kTimed = 10;

// Crosses the pipe as raw bytes: plain data only.
struct Wire {
  int gpus;
  int sm_count;
  double peer_gbps;  // < 0: not measured
  double d2d_gbps;
  char card[128];
  char note[384];
};

void append_note(Wire& w, const char* what, cudaError_t err) {
  size_t used = std::strlen(w.note);
  std::snprintf(w.note + used, sizeof w.note - used, "%s%s: %s", used ? "; " : "", what,
                cudaGetErrorString(err));
}

// Median GB/s of kTimed copies made by `copy` on `stream` (events on the stream's device).
template <typename Copy>
cudaError_t time_copies(cudaStream_t stream, Copy&& copy, double& gbps_out) {
  cudaEvent_t ev[kTimed + 1];
  cudaError_t err = cudaSuccess;
  for (auto& e : ev) {
    err = cudaEventCreate(&e);
    if (err != cudaSuccess) return err;
  }
  for (int i = 0; i < kWarmup && err == cudaSuccess; ++i) err = copy();
  for (int i = 0; i < kTimed && err == cudaSuccess; ++i) {
    err = cudaEventRecord(ev[i], stream);
    if (err == cudaSuccess) err = copy();
  }
  if (err == cudaSuccess) err = cudaEventRecord(ev[kTimed], stream);
  if (err == cudaSuccess) err = cudaEventSynchronize(ev[kTimed]);
  std::vector<double> us;
  for (int i = 0; i < kTimed && err == cudaSuccess; ++i) {
    float ms = 0;
    err = cudaEventElapsedTime(&ms, ev[i], ev[i + 1]);
    us.push_back(ms * 1e3);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  if (err == cudaSuccess) gbps_out = gbps(static_cast<int64_t>(kCopyBytes), median(us));
  return err;
}

Wire measure_in_child() {
  Wire w{};
  w.peer_gbps = w.d2d_gbps = -1;
  cudaError_t err = cudaGetDeviceCount(&w.gpus);
  if (err != cudaSuccess) {
    append_note(w, "cudaGetDeviceCount", err);
    return w;
  }
  cudaDeviceProp prop{};
  if ((err = cudaGetDeviceProperties(&prop, 0)) != cudaSuccess) {
    append_note(w, "cudaGetDeviceProperties", err);
    return w;
  }
  std::memcpy(w.card, prop.name, std::min(sizeof w.card, sizeof prop.name));
  w.card[sizeof w.card - 1] = '\0';
  w.sm_count = prop.multiProcessorCount;

  void *src0 = nullptr, *dst0 = nullptr, *dst1 = nullptr;
  cudaStream_t stream = nullptr;
  if ((err = cudaSetDevice(0)) != cudaSuccess || (err = cudaStreamCreate(&stream)) != cudaSuccess ||
      (err = cudaMalloc(&src0, kCopyBytes)) != cudaSuccess ||
      (err = cudaMalloc(&dst0, kCopyBytes)) != cudaSuccess ||
      (err = cudaMemset(src0, 0x5a, kCopyBytes)) != cudaSuccess) {
    append_note(w, "GPU0 setup", err);
    return w;
  }
  err = time_copies(
      stream, [&] { return cudaMemcpyAsync(dst0, src0, kCopyBytes, cudaMemcpyDeviceToDevice, stream); },
      w.d2d_gbps);
  if (err != cudaSuccess) append_note(w, "device-to-device copy", err);

  if (w.gpus < 2) {
    std::snprintf(w.note + std::strlen(w.note), sizeof w.note - std::strlen(w.note),
                  "%sone GPU: no peer copy", w.note[0] ? "; " : "");
    return w;
  }
  int can = 0;
  if ((err = cudaDeviceCanAccessPeer(&can, 0, 1)) != cudaSuccess || !can) {
    if (err != cudaSuccess)
      append_note(w, "cudaDeviceCanAccessPeer", err);
    else
      std::snprintf(w.note + std::strlen(w.note), sizeof w.note - std::strlen(w.note),
                    "%sGPU0 cannot access GPU1 as a peer: no peer copy", w.note[0] ? "; " : "");
    return w;
  }
  err = cudaDeviceEnablePeerAccess(1, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) err = cudaSuccess;
  if (err == cudaSuccess) err = cudaSetDevice(1);
  if (err == cudaSuccess) err = cudaMalloc(&dst1, kCopyBytes);
  if (err == cudaSuccess) err = cudaSetDevice(0);
  if (err != cudaSuccess) {
    append_note(w, "peer setup", err);
    return w;
  }
  err = time_copies(
      stream, [&] { return cudaMemcpyPeerAsync(dst1, 1, src0, 0, kCopyBytes, stream); }, w.peer_gbps);
  if (err != cudaSuccess) append_note(w, "peer copy", err);
  return w;  // the process exits next: the driver frees everything
}

}  // namespace

FloorResult measure_floor(double timeout_s) {
  FloorResult result;
  int fds[2];
  if (pipe(fds) != 0) {
    result.note = "pipe() failed";
    return result;
  }
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    close(fds[0]);
    alarm(static_cast<unsigned>(timeout_s) + 1);  // last resort if a CUDA call never returns
    Wire w = measure_in_child();
    const char* p = reinterpret_cast<const char*>(&w);
    size_t left = sizeof w;
    while (left > 0) {
      ssize_t n = write(fds[1], p, left);
      if (n <= 0) _exit(1);
      p += n;
      left -= static_cast<size_t>(n);
    }
    _exit(0);
  }
  close(fds[1]);
  if (pid < 0) {
    close(fds[0]);
    result.note = "fork() failed";
    return result;
  }

  Wire w{};
  char* p = reinterpret_cast<char*>(&w);
  size_t got = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (got < sizeof w) {
    int left_ms = static_cast<int>(
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now())
            .count());
    if (left_ms <= 0) break;
    pollfd pfd{fds[0], POLLIN, 0};
    if (poll(&pfd, 1, left_ms) <= 0) continue;
    ssize_t n = read(fds[0], p + got, sizeof w - got);
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  close(fds[0]);
  if (got < sizeof w) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    char buf[128];
    std::snprintf(buf, sizeof buf, "the floor process ended or ran past %.0f s without a result", timeout_s);
    result.note = buf;
    return result;
  }
  waitpid(pid, nullptr, 0);
  w.card[sizeof w.card - 1] = '\0';
  w.note[sizeof w.note - 1] = '\0';
  result.gpus = w.gpus;
  result.card = w.card;
  result.sm_count = w.sm_count;
  if (w.peer_gbps > 0) result.peer_gbps = w.peer_gbps;
  if (w.d2d_gbps > 0) result.d2d_gbps = w.d2d_gbps;
  result.note = w.note;
  return result;
}

}  // namespace expertlink::bench
