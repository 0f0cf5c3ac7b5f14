#include "comm/symmetric_memory.hpp"

#include <cstdio>
#include <cstring>

#include "check.hpp"
#include "comm/host_wait.hpp"
#include "kernels/symmetric_kernels.hpp"

namespace expertlink {
namespace {

size_t round_up(size_t x, size_t a) {
  return (x + a - 1) / a * a;
}

}  // namespace

SymmetricMemory::SymmetricMemory(const Communicator& comm, size_t data_bytes, RuntimeOptions options)
    : comm_(comm), options_(options) {
  const int num_ranks = comm.num_ranks(), rank = comm.rank();
  EL_CHECK(num_ranks <= kMaxRanks, "num_ranks = %d exceeds the supported maximum of %d", num_ranks,
           kMaxRanks);
  EL_CHECK(options.timeout_s > 0, "timeout_s = %g must be positive", options.timeout_s);
  EL_CUDA_CHECK(cudaSetDevice(comm.device()));

  // Intranode only for now: every rank must be load/store reachable (one NVLink domain).
  ncclTeam_t lsa = ncclTeamLsa(comm.nccl());
  if (lsa.nRanks != num_ranks || lsa.rank != rank) {
    EL_FAIL(ErrorCode::kUnsupported,
            "rank %d: only %d of %d ranks are reachable over NVLink (NCCL's LSA team); ranks across "
            "nodes are not supported yet",
            rank, lsa.nRanks, num_ranks);
  }

  // ncclDevCommCreate first: it is where NCCL reports that symmetric memory cannot be set up. NCCL 2.28
  // has no requirements initializer; >= 2.29 requires NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER.
#if defined(NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER)
  ncclDevCommRequirements reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
  ncclDevCommRequirements reqs;
  std::memset(&reqs, 0, sizeof reqs);
#endif
  reqs.lsaBarrierCount = 1;
  ncclResult_t res = ncclDevCommCreate(comm.nccl(), &reqs, &dev_comm_);
  if (res != ncclSuccess) {
    EL_FAIL(ErrorCode::kUnsupported,
            "rank %d: NCCL symmetric memory is not available (ncclDevCommCreate: %s; %s). ExpertLink needs "
            "CUDA VMM and NVLink P2P between all ranks of the communicator",
            rank, ncclGetErrorString(res), ncclGetLastError(comm.nccl()));
  }
  dev_comm_created_ = true;

  window_bytes_ = round_up(kControlBytes + data_bytes, kWindowAlignment);
  EL_NCCL_CHECK(ncclMemAlloc(&window_ptr_, window_bytes_));
  EL_CUDA_CHECK(cudaMemset(window_ptr_, 0, window_bytes_));  // signals start at 0
  EL_CUDA_CHECK(cudaDeviceSynchronize());
  res = ncclCommWindowRegister(comm.nccl(), window_ptr_, window_bytes_, &window_, NCCL_WIN_COLL_SYMMETRIC);
  if (res != ncclSuccess) {
    EL_FAIL(ErrorCode::kUnsupported, "rank %d: ncclCommWindowRegister(%zu bytes, symmetric) failed: %s; %s",
            rank, window_bytes_, ncclGetErrorString(res), ncclGetLastError(comm.nccl()));
  }

  EL_CUDA_CHECK(cudaMalloc(&peer_base_dev_, sizeof(char*) * num_ranks));
  EL_CUDA_CHECK(cudaMalloc(&epoch_dev_, sizeof(uint64_t)));
  EL_CUDA_CHECK(cudaMemset(epoch_dev_, 0, sizeof(uint64_t)));
  EL_CUDA_CHECK(cudaHostAlloc(&record_host_, sizeof(WaitRecord), cudaHostAllocMapped));
  std::memset(record_host_, 0, sizeof(WaitRecord));
  WaitRecord* record_dev = nullptr;
  EL_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&record_dev), record_host_, 0));

  kernels::launch_fill_peer_table(window_, num_ranks, peer_base_dev_, nullptr);
  peer_bases_host_.resize(num_ranks);
  EL_CUDA_CHECK(
      cudaMemcpy(peer_bases_host_.data(), peer_base_dev_, sizeof(char*) * num_ranks, cudaMemcpyDeviceToHost));
  for (int p = 0; p < num_ranks; ++p) {
    if (peer_bases_host_[p] == nullptr)
      EL_FAIL(ErrorCode::kUnsupported, "rank %d: NCCL gave no load/store address for rank %d's window", rank,
              p);
  }

  view_.peer_base = peer_base_dev_;
  // NCCL maps every rank's window, this rank's included, into one flat range (peer_base[r]); that
  // mapping aliases the ncclMemAlloc pointer. All kernels use the flat-range addresses only.
  view_.local_base = peer_bases_host_[rank];
  view_.barrier_epoch = epoch_dev_;
  view_.record = record_dev;
  view_.timeout_ns = static_cast<uint64_t>(options.timeout_s * 1e9);
  view_.rank = rank;
  view_.num_ranks = num_ranks;
}

SymmetricMemory::~SymmetricMemory() {
  // No throwing here: report and continue releasing. Deregistration is collective in NCCL; a peer that
  // has died leaves its survivors to Communicator::abort (ncclCommAbort releases the windows and the
  // device communicator it still holds), after which only local memory is freed here.
  cudaDeviceSynchronize();
  const bool aborted = comm_.aborted();
  if (window_ != nullptr && !aborted) {
    ncclResult_t res = ncclCommWindowDeregister(comm_.nccl(), window_);
    if (res != ncclSuccess)
      std::fprintf(stderr, "expertlink: ncclCommWindowDeregister: %s\n", ncclGetErrorString(res));
  }
  if (window_ptr_ != nullptr) ncclMemFree(window_ptr_);
  if (dev_comm_created_ && !aborted) ncclDevCommDestroy(comm_.nccl(), &dev_comm_);
  if (peer_base_dev_ != nullptr) cudaFree(peer_base_dev_);
  if (epoch_dev_ != nullptr) cudaFree(epoch_dev_);
  if (record_host_ != nullptr) cudaFreeHost(record_host_);
}

void SymmetricMemory::barrier(cudaStream_t stream) {
  raise_if_device_error();
  kernels::launch_barrier(view_, stream);
}

void SymmetricMemory::synchronize(cudaStream_t stream) {
  wait_for_stream(stream, options_.timeout_s, record_host_, view_.rank);
}

void SymmetricMemory::raise_if_device_error() const {
  raise_if_recorded(record_host_);
}

void SymmetricMemory::mask_rank(int rank) {
  EL_CHECK(rank >= 0 && rank < view_.num_ranks, "mask_rank(rank = %d): rank must be in [0, %d)", rank,
           view_.num_ranks);
  EL_CHECK(rank != view_.rank, "mask_rank(rank = %d): a rank cannot mask itself", rank);
  view_.masked |= uint64_t{1} << rank;
  // Barriers the live ranks entered before (and a barrier that timed out on the masked rank) are over:
  // one epoch up on every live rank keeps their epochs equal and above every signal already written.
  uint64_t epoch = 0;
  EL_CUDA_CHECK(cudaMemcpy(&epoch, epoch_dev_, sizeof(epoch), cudaMemcpyDeviceToHost));
  ++epoch;
  EL_CUDA_CHECK(cudaMemcpy(epoch_dev_, &epoch, sizeof(epoch), cudaMemcpyHostToDevice));
  std::memset(record_host_, 0, sizeof(WaitRecord));
}

}  // namespace expertlink
