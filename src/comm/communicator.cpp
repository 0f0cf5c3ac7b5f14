#include "expertlink/communicator.hpp"

#include <cstdio>

#include "check.hpp"
#include "expertlink/version.hpp"

namespace expertlink {
namespace {

// The device API's structures (ncclDevComm, ncclWindow_vidmem) are compiled into our kernels: a libnccl
// of another major.minor would lay them out differently.
void check_loaded_nccl() {
  int loaded = nccl_version_loaded(), compiled = nccl_version_compiled();
  if (loaded / 100 != compiled / 100) {
    EL_FAIL(
        ErrorCode::kUnsupported,
        "the libnccl loaded in this process is version code %d but ExpertLink was compiled against %d; "
        "load the same major.minor (e.g. torch's nvidia-nccl wheel, or rebuild with EXPERTLINK_NCCL_ROOT)",
        loaded, compiled);
  }
  if (loaded != compiled) {
    std::fprintf(stderr, "expertlink: warning: libnccl version code %d loaded, compiled against %d\n", loaded,
                 compiled);
  }
}

}  // namespace

ncclUniqueId Communicator::make_unique_id() {
  ncclUniqueId id;
  EL_NCCL_CHECK(ncclGetUniqueId(&id));
  return id;
}

Communicator::Communicator(const ncclUniqueId& id, int rank, int num_ranks, int device) {
  EL_CHECK(num_ranks >= 1, "num_ranks = %d must be at least 1", num_ranks);
  EL_CHECK(rank >= 0 && rank < num_ranks, "rank = %d is outside [0, num_ranks = %d)", rank, num_ranks);
  int devices = 0;
  EL_CUDA_CHECK(cudaGetDeviceCount(&devices));
  EL_CHECK(device >= 0 && device < devices, "device = %d is not a visible CUDA device (%d visible)", device,
           devices);
  check_loaded_nccl();
  EL_CUDA_CHECK(cudaSetDevice(device));
  EL_NCCL_CHECK(ncclCommInitRank(&comm_, num_ranks, id, rank));
  owned_ = true;
  query();
}

Communicator::Communicator(ncclComm_t comm, Adopt mode) {
  EL_CHECK(comm != nullptr,
           "comm is null (a torch communicator is created lazily: pass device_id to "
           "init_process_group or run a collective first)");
  check_loaded_nccl();
  if (mode == Adopt::kSplit) {
    int rank = 0;
    EL_NCCL_CHECK(ncclCommUserRank(comm, &rank));
    EL_NCCL_CHECK(ncclCommSplit(comm, /*color=*/0, /*key=*/rank, &comm_, nullptr));
    owned_ = true;
  } else {
    comm_ = comm;
    owned_ = false;
  }
  query();
  EL_CUDA_CHECK(cudaSetDevice(device_));
}

void Communicator::query() {
  EL_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
  EL_NCCL_CHECK(ncclCommCount(comm_, &num_ranks_));
  EL_NCCL_CHECK(ncclCommCuDevice(comm_, &device_));
}

void Communicator::abort() {
  if (aborted_) return;
  aborted_ = true;
  if (owned_ && comm_ != nullptr) {
    ncclResult_t res = ncclCommAbort(comm_);
    if (res != ncclSuccess) std::fprintf(stderr, "expertlink: ncclCommAbort: %s\n", ncclGetErrorString(res));
  }
}

Communicator::~Communicator() {
  if (owned_ && comm_ != nullptr && !aborted_) ncclCommDestroy(comm_);
}

}  // namespace expertlink
