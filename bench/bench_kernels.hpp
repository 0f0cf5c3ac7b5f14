// Device helpers of the harness, shared by every implementation: input quantization, expert outputs for
// combines, and the row check of dispatches. Launchers only; kernels are in bench_kernels.cu.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "workloads.hpp"

namespace expertlink::bench {

// x [tokens, hidden] BF16 -> e4m3 [tokens, hidden] + scales [tokens, hidden / 128] (fp8.cuh).
void launch_quantize_fp8(const uint16_t* x, int64_t tokens, int64_t hidden, uint8_t* out, float* scales,
                         cudaStream_t stream);

// rows[p] = bf16(all_x[ids[j].src_rank][ids[j].token] * expert_output_factor(family, dst_rank,
// ids[j].expert)) with p = positions[j] (device), or p = j where positions is null.
void launch_fill_expert_outputs(uint16_t* rows, const RowId* ids, const int64_t* positions, int64_t n,
                                const uint16_t* all_x, int64_t tokens, int64_t hidden, Family family,
                                int dst_rank, cudaStream_t stream);

// Reads n vectors of `data` (every byte through the L2) and folds them into *sink, so the reads stay.
void launch_read_buffer(const uint4* data, int64_t n, unsigned* sink, cudaStream_t stream);

// What a row check found: `count` mismatching elements; the first one (smallest row, then column; rows
// are indices into ids) is row = first >> 32, column = first & 0xffffffff, where columns [0, hidden) are
// values, [hidden, hidden + hidden/128) scales and hidden + hidden/128 the source info.
struct RowCheck {
  unsigned long long first;
  unsigned long long count;
};

enum class CheckMode {
  kBf16Exact,    // BF16 rows equal the source's x
  kFp8Exact,     // e4m3 values and scales equal the source's quantized input byte for byte
  kFp8FromBf16,  // quantized by the implementation: dequantized values within e4m3 rounding of x
};

struct RowsToCheck {
  CheckMode mode;
  const uint8_t* data;
  int64_t data_stride;  // bytes
  const float* scales;
  int64_t scales_stride;  // floats
  const uint8_t* meta;    // int32 x 4 {token, slot, expert, src_rank} per row, or null
  int64_t meta_stride;
  const RowId* ids;          // device
  const int64_t* positions;  // device: ids[j]'s row is row positions[j] of data / scales / meta; null: j
  int64_t n;
  int64_t tokens;
  int64_t hidden;
  const uint16_t* all_x_bf16;  // [ranks, tokens, hidden]
  const uint8_t* all_x_fp8;    // [ranks, tokens, hidden]
  const float* all_x_scales;   // [ranks, tokens, hidden / 128]
};

// Resets *result and checks every element of every row; result is device memory.
void launch_check_rows(const RowsToCheck& rows, RowCheck* result, cudaStream_t stream);

// The tolerance of kFp8FromBf16: e4m3 keeps 3 mantissa bits (relative error <= 1/16 for normals, plus the
// subnormal step 2^-9 of the scaled value), with a little margin.
EL_BENCH_HD inline bool fp8_close(float got, float want, float scale) {
  float diff = got > want ? got - want : want - got;
  float mag = want < 0 ? -want : want;
  return diff <= 0.0703125f * mag + scale * (1.0f / 256.0f);
}

}  // namespace expertlink::bench
