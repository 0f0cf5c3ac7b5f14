// One process per GPU on one host, without MPI. The parent forks one child per rank before anything
// initialises CUDA; rank 0 makes the NCCL unique id and hands it to the others through an anonymous
// shared page. Every wait has a deadline: a child that does not finish in time is killed and named.
#pragma once

#include <functional>
#include <string>

#include <nccl.h>

namespace expertlink::multiproc {

// CTest's skip code (SKIP_RETURN_CODE): fewer GPUs than the job needs.
inline constexpr int kSkipExitCode = 77;

struct RankContext {
  int rank;
  int num_ranks;
  int device;       // CUDA device this rank should use (rank % visible GPUs)
  ncclUniqueId id;  // the same on every rank
};

// Number of visible CUDA devices, found in a short-lived child so the caller's process stays
// CUDA-free (a process that initialised CUDA cannot fork children that use it). 0 if none or no driver.
int visible_gpu_count();

// Runs `body` on `num_ranks` forked processes and waits for all of them, at most `timeout_s` seconds in
// all (and at most `grace_s` more once any rank has failed). Returns 0 if every rank returned 0, else
// the first non-zero exit code; prints which ranks failed, timed out or crashed. Children die with the
// parent (no orphans). Exceptions escaping `body` are printed and turned into exit code 1.
int run_ranks(int num_ranks, double timeout_s, const std::function<int(const RankContext&)>& body,
              double grace_s = 20.0);

}  // namespace expertlink::multiproc
