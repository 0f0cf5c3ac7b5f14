#pragma once

#include <cuda_runtime.h>

#include "comm/wait_record.hpp"

namespace expertlink {

// Throws Error(kTimeout) with the record's text when a device wait has recorded a timeout.
void raise_if_recorded(const WaitRecord* record);

// Waits for `stream` with a deadline of `timeout_s` (polling, never blocking forever). Raises the
// device's wait record if one was written, else a host timeout naming `rank`.
void wait_for_stream(cudaStream_t stream, double timeout_s, const WaitRecord* record, int rank);

}  // namespace expertlink
