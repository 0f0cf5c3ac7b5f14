// Argument checks shared by the HT (src/ht/) and LL (src/ll/) operations of Buffer: one helper per
// concept, each raising Error(kInvalidArgument) that names the argument and the offending value, before
// anything is launched. The pure checks make no CUDA call (CPU-tested: tests/cpu/api_checks_test.cpp);
// `tensors` adds what only the CUDA runtime knows (which device a pointer or a stream belongs to).
//
// Not checkable here: the values inside device tensors. An expert id outside [-1, num_experts) is found
// by the kernels and reported through host-mapped flags (HT: ht_notify with exact sizing raises it at once,
// capacity sizing at HtHandle::check_capacity; LL: the next LL call on the buffer raises it).
#pragma once

#include <cstdint>
#include <initializer_list>

#include <cuda_runtime.h>

#include "expertlink/tensor.hpp"

namespace expertlink::checks {

// A view that is given is well formed: 1 to 4 dimensions, no negative extent, and a non-null pointer
// when it holds elements. Not given (default-constructed): nothing to check.
void view(const TensorView& t, const char* name);
// Given and well formed.
void required(const TensorView& t, const char* name);
// Routing ids: i64 or i32 [tokens, K] with 1 <= K <= max_topk. Returns K.
int topk_idx(const TensorView& t, int64_t tokens, int max_topk, const char* name);
// num_experts in [num_ranks, max_experts] and a multiple of num_ranks.
void num_experts(int num_experts, int num_ranks, int max_experts);
// Token rows the copy kernels can move: 2-D, innermost dimension contiguous, rows a multiple of 16 bytes
// and 16-byte aligned; FP8 rows a whole number of 128-channel scale groups.
void token_rows(const TensorView& t, const char* name);

// Where a pointer lives, as cudaPointerGetAttributes says.
enum class Memory { kDevice, kPinnedHost, kManaged, kUnregistered };
// A pointer handed to kernels on `device` must be that device's memory, pinned host memory or managed
// memory: not another GPU's, not pageable host memory.
void location(const char* name, const void* ptr, Memory memory, int pointer_device, int device);
// The stream a call is enqueued on belongs to the buffer's device.
void stream_device(int stream_device, int device);

struct Named {
  const TensorView* view;
  const char* name;
};
// Every given view well formed and on `device`, and `stream` on `device`. The pointer queries are skipped
// while `stream` is capturing a graph (they are checked on the first, uncaptured use) and wherever the
// runtime cannot answer.
void tensors(std::initializer_list<Named> views, int device, cudaStream_t stream);

}  // namespace expertlink::checks
