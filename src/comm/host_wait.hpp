#pragma once

#include <cuda_runtime.h>

#include "comm/wait_record.hpp"

namespace expertlink {

// Throws when the device has left a record: kTimeout for a wait that ran out, kInvalidArgument for ranks
// that called with different arguments. Either way the window stays broken (the record is never cleared).
void raise_if_recorded(WaitRecord* record);

// Waits for `stream` with a deadline of `timeout_s` (polling, never blocking forever). Raises the
// device's wait record if one was written, else a host timeout naming `rank`.
void wait_for_stream(cudaStream_t stream, double timeout_s, WaitRecord* record, int rank);

}  // namespace expertlink
