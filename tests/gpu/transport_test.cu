// Transport tests: symmetric windows, peer tables, the barrier and bounded waits, on all local GPUs.
#include <chrono>
#include <cstdlib>
#include <thread>

#include "comm/symmetric_memory.hpp"
#include "device_array.hpp"
#include "expertlink/error.hpp"
#include "harness.hpp"
#include "kernels/symmetric_kernels.hpp"

namespace expertlink::test {
namespace {

constexpr uint32_t kPoison = 0xDEADBEEFu;

__host__ __device__ uint32_t pattern(uint64_t seed, int src, int dst, uint64_t i) {
  uint64_t x = seed ^ (uint64_t(src) << 56) ^ (uint64_t(dst) << 48) ^ (i * 0x9E3779B97F4A7C15ull);
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  uint32_t v = static_cast<uint32_t>(x);
  return v == kPoison ? v + 1 : v;
}

__global__ void fill_kernel(uint32_t* p, size_t n, uint32_t value) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = value;
}

// Push: rank `me` writes its slot in every peer's data region (its own included).
__global__ void push_pattern_kernel(SymmetricView v, size_t slot_words, uint64_t seed) {
  for (int d = 0; d < v.num_ranks; ++d) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(v.peer_base[d] + kControlBytes) + v.rank * slot_words;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < slot_words;
         i += size_t(gridDim.x) * blockDim.x)
      dst[i] = pattern(seed, v.rank, d, i);
  }
}

struct Mismatch {
  unsigned long long count;
  unsigned long long first_index;  // slot * slot_words + word, the smallest seen
  uint32_t expected, got;
};

__device__ void note_mismatch(Mismatch* m, unsigned long long index, uint32_t expected, uint32_t got) {
  atomicAdd(&m->count, 1ull);
  if (atomicMin(&m->first_index, index) > index) {
    m->expected = expected;  // racy between threads but only for reporting
    m->got = got;
  }
}

// Checks that every slot s of the local data region holds what rank s pushed (local reads), and that
// every peer's slot `me` holds what this rank pushed there (remote reads).
__global__ void check_pattern_kernel(SymmetricView v, size_t slot_words, uint64_t seed, Mismatch* local,
                                     Mismatch* remote) {
  for (int s = 0; s < v.num_ranks; ++s) {
    const uint32_t* mine = reinterpret_cast<const uint32_t*>(v.local_base + kControlBytes) + s * slot_words;
    const uint32_t* theirs =
        reinterpret_cast<const uint32_t*>(v.peer_base[s] + kControlBytes) + v.rank * slot_words;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < slot_words;
         i += size_t(gridDim.x) * blockDim.x) {
      uint32_t want = pattern(seed, s, v.rank, i);
      if (mine[i] != want) note_mismatch(local, s * slot_words + i, want, mine[i]);
      want = pattern(seed, v.rank, s, i);
      if (theirs[i] != want) note_mismatch(remote, s * slot_words + i, want, theirs[i]);
    }
  }
}

// One round: poison, barrier, push, barrier, check, barrier. Returns 0 on success.
int pattern_round(const RankContext& ctx, SymmetricMemory& mem, cudaStream_t stream, uint64_t seed,
                  Mismatch* m_dev) {
  const size_t words = mem.data_bytes() / 4;
  const size_t slot_words = words / mem.num_ranks() - 3;  // odd-sized slots: tails are exercised
  fill_kernel<<<264, 256, 0, stream>>>(reinterpret_cast<uint32_t*>(mem.data()), words, kPoison);
  Mismatch init[2] = {{0, ~0ull, 0, 0}, {0, ~0ull, 0, 0}};
  cudaMemcpyAsync(m_dev, init, sizeof init, cudaMemcpyHostToDevice, stream);
  mem.barrier(stream);
  push_pattern_kernel<<<132, 512, 0, stream>>>(mem.view(), slot_words, seed);
  mem.barrier(stream);
  check_pattern_kernel<<<132, 512, 0, stream>>>(mem.view(), slot_words, seed, m_dev, m_dev + 1);
  // The check reads peers' regions: no peer may poison its region for the next round before that is done
  // (seen under compute-sanitizer, which slowed one rank enough).
  mem.barrier(stream);
  cudaError_t err = cudaGetLastError();
  GPU_EXPECT(err == cudaSuccess, "%s", cudaGetErrorString(err));
  mem.synchronize(stream);
  Mismatch got[2];
  cudaMemcpy(got, m_dev, sizeof got, cudaMemcpyDeviceToHost);
  const char* what[2] = {"received from peers (local reads)", "written into peers (remote reads)"};
  for (int k = 0; k < 2; ++k) {
    unsigned long long slot = got[k].first_index / slot_words, word = got[k].first_index % slot_words;
    GPU_EXPECT(
        got[k].count == 0,
        "seed %llu: %llu words wrong in data %s; first at slot %llu word %llu: expected 0x%08x, got 0x%08x",
        static_cast<unsigned long long>(seed), got[k].count, what[k], slot, word, got[k].expected,
        got[k].got);
  }
  return 0;
}

int run_pattern_rounds(const RankContext& ctx, const Communicator& comm, size_t bytes, int rounds) {
  SymmetricMemory mem(comm, bytes);
  GPU_EXPECT(mem.peer_bases().size() == size_t(comm.num_ranks()), "peer table of %zu entries for %d ranks",
             mem.peer_bases().size(), comm.num_ranks());
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  Mismatch* m_dev = nullptr;
  cudaMalloc(&m_dev, 2 * sizeof(Mismatch));
  // Fresh data every run, the same on all ranks: the seed comes from the run's NCCL unique id.
  const uint64_t seed = run_seed(ctx.id);
  if (ctx.rank == 0) std::printf("pattern seed %llu\n", static_cast<unsigned long long>(seed));
  int rc = 0;
  for (int round = 0; round < rounds && rc == 0; ++round)
    rc = pattern_round(ctx, mem, stream, seed + round, m_dev);
  cudaFree(m_dev);
  cudaStreamDestroy(stream);
  return rc;
}

GPU_CASE(transport_pattern_every_peer_every_byte, 2, 120) {
  Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  return run_pattern_rounds(ctx, comm, 64u << 20, 5);
}

GPU_CASE(transport_single_rank_window_works, 1, 60) {
  if (ctx.rank != 0) return 0;  // one rank only: its own communicator
  ncclUniqueId id = Communicator::make_unique_id();
  Communicator comm(id, 0, 1, ctx.device);
  return run_pattern_rounds(ctx, comm, 4u << 20, 3);
}

GPU_CASE(transport_adopted_communicator_split_and_borrow, 2, 120) {
  Communicator base(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  {
    Communicator split(base.nccl(), Communicator::Adopt::kSplit);
    GPU_EXPECT(split.owned() && split.nccl() != base.nccl(), "split communicator should be a new, owned one");
    GPU_EXPECT(split.rank() == ctx.rank && split.num_ranks() == ctx.num_ranks, "rank %d of %d", split.rank(),
               split.num_ranks());
    if (run_pattern_rounds(ctx, split, 8u << 20, 2) != 0) return 1;
  }
  Communicator borrowed(base.nccl(), Communicator::Adopt::kBorrow);
  GPU_EXPECT(!borrowed.owned() && borrowed.nccl() == base.nccl(), "borrowed communicator must not be owned");
  return run_pattern_rounds(ctx, borrowed, 8u << 20, 2);
}

GPU_CASE(transport_barrier_1000_rounds_and_graph_replay, 2, 120) {
  Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  SymmetricMemory mem(comm, 1u << 20);
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  for (int i = 0; i < 1000; ++i) mem.barrier(stream);
  mem.synchronize(stream);

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  GPU_EXPECT(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess,
             "begin capture");
  for (int i = 0; i < 10; ++i) mem.barrier(stream);
  GPU_EXPECT(cudaStreamEndCapture(stream, &graph) == cudaSuccess, "end capture");
  GPU_EXPECT(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess, "instantiate");
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 100; ++i) cudaGraphLaunch(exec, stream);
  mem.synchronize(stream);
  double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / 1000;
  if (ctx.rank == 0)
    std::printf("FIGURE barrier: %.2f us per cross-rank barrier in a CUDA graph (1 block, %d ranks)\n", us,
                ctx.num_ranks);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  return 0;
}

// The last rank never enters the barrier: every other rank must fail with a timeout that names it,
// within the configured time, instead of hanging.
GPU_CASE(transport_missing_rank_times_out_naming_it, 2, 60) {
  Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
  RuntimeOptions options;
  options.timeout_s = 1.0;
  SymmetricMemory mem(comm, 1u << 20, options);
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  mem.barrier(stream);  // everyone present once
  mem.synchronize(stream);
  const int absent = ctx.num_ranks - 1;
  if (ctx.rank == absent) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3000));  // alive, but silent
    cudaStreamDestroy(stream);
    return 0;
  }
  auto t0 = std::chrono::steady_clock::now();
  std::string message;
  ErrorCode code = ErrorCode::kInternal;
  try {
    mem.barrier(stream);
    mem.synchronize(stream);
  } catch (const Error& e) {
    message = e.what();
    code = e.code();
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("FIGURE rank %d detected the silent rank after %.3f s (timeout 1 s): %s\n", ctx.rank, s,
              message.c_str());
  GPU_EXPECT(code == ErrorCode::kTimeout, "a timeout error, got '%s'", message.c_str());
  std::string who = "waiting for rank " + std::to_string(absent);
  GPU_EXPECT(message.find(who) != std::string::npos, "the message to name rank %d: '%s'", absent,
             message.c_str());
  GPU_EXPECT(message.find("barrier") != std::string::npos, "the message to name the barrier: '%s'",
             message.c_str());
  GPU_EXPECT(s >= 0.9 && s < 2.5, "detection within the 1 s timeout (+ slack), took %.3f s", s);
  // The window is now broken for good: later calls refuse instead of waiting again.
  bool refused = false;
  try {
    mem.barrier(stream);
  } catch (const Error& e) {
    refused = e.code() == ErrorCode::kTimeout;
  }
  GPU_EXPECT(refused, "a broken window to refuse further barriers");
  cudaStreamDestroy(stream);
  return 0;
}

// With NCCL's P2P transport disabled, symmetric memory must either keep working (checked) or fail with
// an error saying so: never silently wrong.
GPU_CASE(transport_p2p_disabled_fails_clearly_or_works, 2, 90) {
  setenv("NCCL_P2P_DISABLE", "1", 1);
  try {
    Communicator comm(ctx.id, ctx.rank, ctx.num_ranks, ctx.device);
    int rc = run_pattern_rounds(ctx, comm, 8u << 20, 2);
    if (rc == 0 && ctx.rank == 0) std::printf("FIGURE symmetric memory works with NCCL_P2P_DISABLE=1\n");
    return rc;
  } catch (const Error& e) {
    std::printf("FIGURE with NCCL_P2P_DISABLE=1 rank %d refused clearly: %s\n", ctx.rank, e.what());
    GPU_EXPECT(e.code() == ErrorCode::kUnsupported || e.code() == ErrorCode::kNccl, "code %d", int(e.code()));
    return 0;
  }
}

}  // namespace
}  // namespace expertlink::test
