// The group of ranks ExpertLink moves tokens between, over NCCL. Either made here from an NCCL unique id
// (owned: destroyed with this object) or adopted from the caller's communicator (by default an
// ncclCommSplit of it, owned here, so the two lifetimes stay separate; or borrowed as is, never destroyed).
#pragma once

#include <nccl.h>

namespace expertlink {

class Communicator {
 public:
  enum class Adopt { kSplit, kBorrow };

  // Collective over `num_ranks` processes: every rank calls it with the same id. Sets `device` current.
  Communicator(const ncclUniqueId& id, int rank, int num_ranks, int device);
  // Collective over the ranks of `comm` when `mode` is kSplit.
  explicit Communicator(ncclComm_t comm, Adopt mode = Adopt::kSplit);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  static ncclUniqueId make_unique_id();

  // After a peer has failed (a call raised Error kTimeout naming it): releases this rank's NCCL resources
  // without waiting for the other ranks (ncclCommAbort; a borrowed communicator is left to its owner).
  // Call it before destroying the Buffers made on this communicator: they then skip the collective
  // deregistration of their windows and free only local memory. Idempotent.
  void abort();
  bool aborted() const { return aborted_; }

  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }
  ncclComm_t nccl() const { return comm_; }
  bool owned() const { return owned_; }

 private:
  void query();

  ncclComm_t comm_ = nullptr;
  bool owned_ = false;
  bool aborted_ = false;
  int rank_ = -1;
  int num_ranks_ = 0;
  int device_ = -1;
};

}  // namespace expertlink
