// Kernels of the internode LL path. Staging layout (fixed-size pairs per (source, destination), headers,
// weight and partial pairs): ll_layout.hpp. Between the send-half kernels and the receive-half kernels
// NCCL moves the pairs (grouped ncclSend/ncclRecv on the same stream); a kernel here only reads what
// stream order has already completed, so no flags, fences or waits are needed and none can hang.
//
// The numerics are the intranode LL kernels' (src/kernels/ll_dispatch.cu, ll_combine.cu), so both paths
// give the same bits: the FP8 cast (amax per 128 channels, floor 1e-4, scale = amax / 448 rounded to
// nearest, optionally rounded up to a power of two, values divided by the scale and saturated), the
// holder's sum (products rounded to float, added in pick order from 0, rounded once to BF16) and the
// source's sum (partials added in rank order from 0, rounded once). The output order is the intranode
// one too: rows of local expert j from source s at begin[j][s] + pos, begin = prefix over sources of the
// per-expert counts, pos = rank of the token among s's tokens that picked j (deterministic).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "check.hpp"
#include "internode/ll_internode_kernels.hpp"
#include "kernels/ll_expand.cuh"
#include "kernels/ll_kernels.hpp"  // kLlSegmentVecs, kLlMax*
#include "kernels/ll_numerics.cuh"
#include "kernels/vector_io.cuh"

namespace expertlink::internode {
namespace {

using kernels::kLlSegmentVecs;
using kernels::kLlUnroll;

constexpr int kRouteThreads = 256;
constexpr int kPackThreads = 256;
constexpr int kWarpThreads = 512;  // unpack, holder, sum: a warp per work unit
constexpr int kWarps = kWarpThreads / 32;
constexpr int kMaxPeers = 64;

__device__ __forceinline__ int64_t pick(const LlIndex& idx, int t, int k) {
  return kernels::load_index(idx.data, idx.type, t * idx.rs + k * idx.cs);
}

// The pair of (this rank, peer) in the area where this rank writes it.
__device__ __forceinline__ char* out_pair(const LlAreas& a, int rank, int peer, int64_t pair_bytes,
                                          int64_t offset = 0) {
  return (peer == rank ? a.recv : a.send) + offset + static_cast<int64_t>(peer) * pair_bytes;
}

__device__ __forceinline__ char* message(const LlPackParams& p, int d, int t) {
  return out_pair(p.areas, p.rank, d, p.l.dispatch_pair) + p.l.meta_bytes +
         static_cast<int64_t>(t) * p.l.msg_bytes;
}

__device__ __forceinline__ uint64_t warp_or(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(~0u, v, o);
  return v;
}

// The LL path's host-mapped report of the first invalid expert id (protocol of ll_flag_bad_expert in
// src/kernels/ll_protocol.cuh: claim 0 -> 1, fill, fence, publish 2).
__device__ void flag_bad_expert(int32_t* flags, int token, int slot, int64_t value) {
  volatile int32_t* f = flags;
  if (atomicCAS(flags, 0, 1) == 0) {
    f[1] = token;
    f[2] = slot;
    f[3] = static_cast<int32_t>(value < INT32_MIN ? INT32_MIN : value > INT32_MAX ? INT32_MAX : value);
    __threadfence_system();
    atomicExch(flags, 2);
  }
}

__global__ void __launch_bounds__(kRouteThreads) ll_route_kernel(const __grid_constant__ LlRouteParams p) {
  using Scan = cub::BlockScan<int, kRouteThreads>;
  __shared__ typename Scan::TempStorage temp;
  const LlLayout& l = p.l;
  const int e = blockIdx.x, EL = l.local_experts, d = e / EL, j = e - d * EL, K = l.topk, T = p.num_tokens;
  int base = 0;
  for (int start = 0; start < T; start += kRouteThreads) {
    const int t = start + static_cast<int>(threadIdx.x);
    int first = -1;  // first slot of t naming e
    if (t < T)
      for (int k = 0; k < K; ++k)
        if (first < 0 && pick(p.idx, t, k) == e) first = k;
    int excl = 0, total = 0;
    Scan(temp).ExclusiveSum(first >= 0 ? 1 : 0, excl, total);
    if (first >= 0) {
      const int pos = base + excl;
      for (int k = first; k < K; ++k)
        if (pick(p.idx, t, k) == e)
          p.words[t * K + k] = j | (pos << 10) | (static_cast<int>(k != first) << 30);
    }
    base += total;
    __syncthreads();  // temp is reused by the next chunk's scan
  }
  if (threadIdx.x == 0) {
    int32_t* meta = reinterpret_cast<int32_t*>(out_pair(p.areas, p.rank, d, l.dispatch_pair));
    meta[4 + j] = base;
    if (j == 0) {
      meta[0] = T;
      meta[1] = l.hidden;
      meta[2] = K;
      meta[3] = l.num_experts;
    }
  }
  if (blockIdx.x == 0)  // ids outside [-1, E) are ignored by every block and reported once
    for (int i = threadIdx.x; i < T * K; i += kRouteThreads) {
      const int64_t v = pick(p.idx, i / K, i % K);
      if (v < -1 || v >= l.num_experts) flag_bad_expert(p.bad_expert, i / K, i % K, v);
    }
}

// All threads: token t's row cast to FP8, 16 channels per thread (8 threads per 128-channel group), with
// its scales, into the message of every destination in `mask`.
__device__ void pack_row_fp8(const LlPackParams& p, int t, uint64_t mask) {
  const LlLayout& l = p.l;
  const int chunks = l.hidden / 16;
  const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) +
                                                  static_cast<int64_t>(t) * p.x_row_stride * 2);
  for (int base = 0; base < chunks; base += kPackThreads) {  // block-uniform: shuffles stay converged
    const int c = base + static_cast<int>(threadIdx.x);
    const bool valid = c < chunks;
    int4 raw[2] = {make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)};
    if (valid) {
      raw[0] = kernels::ld_nc_v4(row + 2 * c);
      raw[1] = kernels::ld_nc_v4(row + 2 * c + 1);
    }
    const kernels::Fp8Piece piece = kernels::cast_fp8_piece(raw, c, valid, p.round_scale, p.ue8m0);
    for (uint64_t m = mask; m != 0; m &= m - 1) {
      char* msg = message(p, __ffsll(static_cast<long long>(m)) - 1, t);
      if (valid) reinterpret_cast<int4*>(msg)[c] = piece.data;
      if (piece.write_scale) reinterpret_cast<uint32_t*>(msg + l.row_bytes)[piece.scale_index] = piece.scale;
    }
  }
}

__device__ void pack_row_bf16(const LlPackParams& p, int t, uint64_t mask) {
  const int vecs = p.l.hidden / 8;
  const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) +
                                                  static_cast<int64_t>(t) * p.x_row_stride * 2);
  for (int c = threadIdx.x; c < vecs; c += kPackThreads) {
    const int4 v = kernels::ld_nc_v4(row + c);
    for (uint64_t m = mask; m != 0; m &= m - 1)
      reinterpret_cast<int4*>(message(p, __ffsll(static_cast<long long>(m)) - 1, t))[c] = v;
  }
}

__global__ void __launch_bounds__(kPackThreads) ll_pack_kernel(const __grid_constant__ LlPackParams p) {
  __shared__ int32_t expert[kLlMaxTopk], word[kLlMaxTopk];
  __shared__ uint64_t dest_mask;
  const LlLayout& l = p.l;
  const int t = blockIdx.x, K = l.topk, E = l.num_experts, EL = l.local_experts, R = l.num_ranks;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int e = -1;
    if (lane < K) {
      const int64_t v = pick(p.idx, t, lane);
      if (v >= 0 && v < E) e = static_cast<int>(v);
    }
    const uint64_t mask = warp_or(e >= 0 ? 1ull << (e / EL) : 0ull);
    if (lane < K) {
      expert[lane] = e;
      word[lane] = e >= 0 ? p.words[t * K + lane] : -1;
    }
    if (lane == 0) {
      dest_mask = mask;
      p.dst_mask[t] = mask;
    }
  }
  __syncthreads();
  const uint64_t mask = dest_mask;
  for (int i = threadIdx.x; i < R * K; i += kPackThreads) {  // every rank gets the header
    const int d = i / K, k = i - d * K, ek = expert[k];
    reinterpret_cast<int32_t*>(message(p, d, t) + l.header_offset)[k] =
        ek >= 0 && ek / EL == d ? word[k] : -1;
  }
  if (p.fp8)
    pack_row_fp8(p, t, mask);
  else
    pack_row_bf16(p, t, mask);
}

__device__ void record_mismatch(int32_t* words, int source, int field, int got, int ours) {
  volatile int32_t* f = words;
  if (atomicCAS(words, 0, 1) == 0) {
    f[1] = source;
    f[2] = field;
    f[3] = got;
    f[4] = ours;
    __threadfence_system();
    atomicExch(words, 2);
  }
}

__global__ void __launch_bounds__(kWarpThreads, 1)
    ll_unpack_kernel(const __grid_constant__ LlUnpackParams p) {
  __shared__ int begin[kLlMaxExperts];   // [j * R + s]: first row of source s in expert j
  __shared__ int tokens[kMaxPeers + 1];  // prefix over sources of T_s
  __shared__ int bad[kMaxPeers];         // source s sent another shape: skipped
  const LlLayout& l = p.l;
  const int R = l.num_ranks, EL = l.local_experts, K = l.topk, N = l.capacity;

  for (int s = threadIdx.x; s < R; s += kWarpThreads) {
    const int32_t* meta =
        reinterpret_cast<const int32_t*>(p.recv + static_cast<int64_t>(s) * l.dispatch_pair);
    const int ours[3] = {l.hidden, l.topk, l.num_experts};
    int wrong = -1;
    for (int f = 0; f < 3; ++f)
      if (wrong < 0 && meta[1 + f] != ours[f]) wrong = f;
    bad[s] = wrong >= 0;
    tokens[s + 1] = wrong >= 0 ? 0 : min(max(meta[0], 0), N);
    if (wrong >= 0 && blockIdx.x == 0) record_mismatch(p.mismatch, s, wrong, meta[1 + wrong], ours[wrong]);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < R * EL; i += kWarpThreads) {
    const int s = i / EL, j = i - s * EL;
    const int32_t* meta =
        reinterpret_cast<const int32_t*>(p.recv + static_cast<int64_t>(s) * l.dispatch_pair);
    begin[j * R + s] = bad[s] ? 0 : max(meta[4 + j], 0);  // the count; turned into the prefix below
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    tokens[0] = 0;
    for (int s = 0; s < R; ++s) {
      if (blockIdx.x == 0) p.src_tokens[s] = tokens[s + 1];
      tokens[s + 1] += tokens[s];
    }
  }
  kernels::ll_expert_prefix(p.out, begin, EL, R, kWarpThreads);
  __syncthreads();

  // Work units: (message, segment of kLlSegmentVecs vectors of its row), a warp each, spread over blocks.
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t vecs = l.row_bytes / 16;
  const int nseg = static_cast<int>((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  const int64_t units = static_cast<int64_t>(tokens[R]) * nseg;
  for (int64_t u = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int m = static_cast<int>(u / nseg), q = static_cast<int>(u - static_cast<int64_t>(m) * nseg);
    int s = 0;
    while (tokens[s + 1] <= m) ++s;
    const int t = m - tokens[s];
    const char* msg = p.recv + static_cast<int64_t>(s) * l.dispatch_pair + l.meta_bytes +
                      static_cast<int64_t>(t) * l.msg_bytes;
    kernels::ll_expand_unit<false>(p.out, p.tok_slots, msg, {l.row_bytes, l.scale_cols, l.header_offset},
                                   begin, s, t, q, K, EL, R, N, lane);
  }
}

__global__ void ll_weights_kernel(const __grid_constant__ LlWeightsParams p) {
  const LlLayout& l = p.l;
  const int t = blockIdx.x * blockDim.x + threadIdx.x, K = l.topk;
  if (t >= p.num_tokens) return;
  const uint64_t mask = p.dst_mask[t];
  uint32_t valid = 0;
  for (int k = 0; k < K; ++k) {
    if (pick(p.idx, t, k) >= 0) valid |= 1u << k;  // a -1 slot at combine time is left out of the sum
    const float w = p.weights[t * p.w_rs + k * p.w_cs];
    for (uint64_t m = mask; m != 0; m &= m - 1) {
      char* pair = out_pair(p.areas, p.rank, __ffsll(static_cast<long long>(m)) - 1, l.weight_pair);
      reinterpret_cast<float*>(pair)[t * K + k] = w;
    }
  }
  for (uint64_t m = mask; m != 0; m &= m - 1) {
    char* pair = out_pair(p.areas, p.rank, __ffsll(static_cast<long long>(m)) - 1, l.weight_pair);
    reinterpret_cast<uint32_t*>(pair + l.valid_offset)[t] = valid;
  }
}

__global__ void __launch_bounds__(kWarpThreads, 1)
    ll_holder_kernel(const __grid_constant__ LlHolderParams p) {
  const LlLayout& l = p.l;
  const int lane = threadIdx.x & 31, K = l.topk, N = l.capacity, RN = l.num_ranks * N;
  const int64_t vecs = l.hidden / 8;
  const int nseg = static_cast<int>((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  const int64_t per_source = static_cast<int64_t>(N) * nseg, units = l.num_ranks * per_source;
  const int64_t gw = static_cast<int64_t>(threadIdx.x / 32) * gridDim.x + blockIdx.x;
  const int64_t GW = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t u = gw; u < units; u += GW) {
    const int s = static_cast<int>(u / per_source);
    const int64_t r = u - s * per_source;
    const int t = static_cast<int>(r / nseg), q = static_cast<int>(r - static_cast<int64_t>(t) * nseg);
    if (t >= p.src_tokens[s]) continue;  // warp-uniform
    const int32_t slot = lane < K ? p.tok_slots[(static_cast<int64_t>(s) * N + t) * K + lane] : -1;
    const uint32_t cmask = __ballot_sync(~0u, slot >= 0);
    if (cmask == 0) continue;  // no expert of t here: s reads nothing from this pair's row t
    const char* wpair = p.areas.recv + static_cast<int64_t>(s) * l.weight_pair;
    const float wt = lane < K ? reinterpret_cast<const float*>(wpair)[t * K + lane] : 0.f;
    const uint32_t use = cmask & reinterpret_cast<const uint32_t*>(wpair + l.valid_offset)[t];
    const int j = slot >= 0 ? slot / RN : 0;
    const int64_t off = j * p.x_stride0 + static_cast<int64_t>(slot >= 0 ? slot - j * RN : 0) * p.x_stride1;
    const int64_t first = static_cast<int64_t>(q) * kLlSegmentVecs + lane;
    float acc[kLlUnroll][8] = {};
    for (uint32_t todo = cmask; todo != 0; todo &= todo - 1) {  // pick order; warp-uniform
      const int k = __ffs(todo) - 1;
      const int64_t o = __shfl_sync(~0u, off, k);
      const float wk = __shfl_sync(~0u, wt, k);
      if (((use >> k) & 1) == 0) continue;  // -1 at combine time
#pragma unroll
      for (int i = 0; i < kLlUnroll; ++i)
        if (first + 32 * i < vecs)
          kernels::add_weighted(acc[i], kernels::ld_nc_v4(p.x + o + (first + 32 * i) * 16), wk);
    }
    int4* dst = reinterpret_cast<int4*>(out_pair(p.areas, p.rank, s, l.partial_pair, l.partial_offset) +
                                        static_cast<int64_t>(t) * 2 * l.hidden);
#pragma unroll
    for (int i = 0; i < kLlUnroll; ++i)
      if (first + 32 * i < vecs) dst[first + 32 * i] = kernels::to_bf16x8(acc[i]);
  }
}

__global__ void __launch_bounds__(kWarpThreads, 1) ll_sum_kernel(const __grid_constant__ LlSumParams p) {
  const LlLayout& l = p.l;
  const int lane = threadIdx.x & 31;
  const int64_t vecs = l.hidden / 8;
  const int nseg = static_cast<int>((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  const int64_t units = static_cast<int64_t>(p.num_tokens) * nseg;
  const int64_t gw = static_cast<int64_t>(threadIdx.x / 32) * gridDim.x + blockIdx.x;
  const int64_t GW = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t u = gw; u < units; u += GW) {
    const int t = static_cast<int>(u / nseg), q = static_cast<int>(u - static_cast<int64_t>(t) * nseg);
    const int64_t first = static_cast<int64_t>(q) * kLlSegmentVecs + lane;
    float acc[kLlUnroll][8] = {};
    for (uint64_t m = p.dst_mask[t]; m != 0; m &= m - 1) {  // rank order
      const int d = __ffsll(static_cast<long long>(m)) - 1;
      const int4* src =
          reinterpret_cast<const int4*>(p.recv + l.partial_offset + static_cast<int64_t>(d) * l.partial_pair +
                                        static_cast<int64_t>(t) * 2 * l.hidden);
#pragma unroll
      for (int i = 0; i < kLlUnroll; ++i)
        if (first + 32 * i < vecs) kernels::add_bf16x8(acc[i], src[first + 32 * i]);
    }
    int4* out =
        reinterpret_cast<int4*>(static_cast<char*>(p.out) + static_cast<int64_t>(t) * p.out_row_stride * 2);
#pragma unroll
    for (int i = 0; i < kLlUnroll; ++i)
      if (first + 32 * i < vecs) out[first + 32 * i] = kernels::to_bf16x8(acc[i]);
  }
}

int warp_grid(int64_t units, int grid) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(grid, (units + kWarps - 1) / kWarps)));
}

}  // namespace

void launch_ll_route(const LlRouteParams& p, cudaStream_t stream) {
  ll_route_kernel<<<p.l.num_experts, kRouteThreads, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_pack(const LlPackParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  ll_pack_kernel<<<p.num_tokens, kPackThreads, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_unpack(const LlUnpackParams& p, int grid, cudaStream_t stream) {
  const int64_t vecs = p.l.row_bytes / 16;
  const int64_t most = int64_t(p.l.num_ranks) * p.l.capacity * ((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  ll_unpack_kernel<<<warp_grid(most, grid), kWarpThreads, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_weights(const LlWeightsParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  ll_weights_kernel<<<(p.num_tokens + 127) / 128, 128, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_holder(const LlHolderParams& p, int grid, cudaStream_t stream) {
  const int64_t vecs = p.l.hidden / 8;
  const int64_t units =
      int64_t(p.l.num_ranks) * p.l.capacity * ((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  ll_holder_kernel<<<warp_grid(units, grid), kWarpThreads, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_sum(const LlSumParams& p, int grid, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  const int64_t vecs = p.l.hidden / 8;
  const int64_t units = int64_t(p.num_tokens) * ((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  ll_sum_kernel<<<warp_grid(units, grid), kWarpThreads, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace expertlink::internode
