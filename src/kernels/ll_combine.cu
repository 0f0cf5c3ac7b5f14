// LL combine: one kernel on all SMs, send half and/or receive half (split mode launches them apart).
// Each expert holder sums a token's weighted expert outputs of its own experts first, so one BF16 row
// per (token, rank) crosses NVLink; the source adds the partial rows. Protocol: ll_protocol.cuh.
#include <cuda_bf16.h>

#include "check.hpp"
#include "kernels/ll_protocol.cuh"

namespace expertlink::kernels {
namespace {

// acc += w * v, product rounded to float then added (the oracle's per-term rounding; no FMA).
__device__ __forceinline__ void add_weighted(float (&acc)[8], int4 v, float w) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(w, f.x));
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(w, f.y));
  }
}

__device__ __forceinline__ void add_bf16(float (&acc)[8], int4 v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

__device__ __forceinline__ int4 to_bf16x8(const float (&acc)[8]) {
  int4 out;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return out;
}

// (weight, expert id) of source s, token t, pick k in the combine area `area`.
__device__ __forceinline__ uint64_t* weight_slot(char* area, const LlGeometry& g, int s, int t, int k) {
  return reinterpret_cast<uint64_t*>(area + g.weights_offset) +
         (static_cast<int64_t>(s) * g.capacity + t) * g.topk + k;
}

// Send half. Returns false when a wait failed (the block has left the protocol).
__device__ bool combine_send(const LlCombineParams& p) {
  __shared__ int tokens[kMaxRanks + 1];  // prefix over sources of T_s
  const SymmetricView& w = p.win;
  const LlGeometry& g = p.g;
  const int me = w.rank, R = g.num_ranks, T = p.num_tokens, K = g.topk, N = g.capacity, RN = R * N;
  const int area_id = 2 + p.parity;
  const uint64_t n = p.st.seq[kLlSeqCombineSend + p.parity] + 1;

  // Every peer must have finished reading its combine area of this parity (use n - 1): this rank writes
  // weights and partial rows into it.
  if (!ll_wait_all(w, control::ll::kCombineFree, p.parity, n - 1, WaitSite::kLlCombineFree, R)) return false;

  // (weight, expert id) of this block's tokens to every rank holding one of their experts.
  const int t0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) * T / gridDim.x);
  const int t1 = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * T / gridDim.x);
  for (int t = t0; t < t1; ++t) {
    const uint64_t mask = p.handle.dst_mask[t];
    for (int i = threadIdx.x; i < R * K; i += blockDim.x) {
      const int d = i / K, k = i - d * K;
      if (((mask >> d) & 1) == 0) continue;
      const int64_t e = ll_load_index(p.topk_idx, p.idx_type, t * p.idx_row_stride + k * p.idx_col_stride);
      const float wt = p.topk_weights[t * p.w_row_stride + k * p.w_col_stride];
      const uint32_t id = e >= 0 ? static_cast<uint32_t>(e) : 0xFFFFFFFFu;
      *weight_slot(ll_area(w.peer_base[d], g, area_id), g, me, t, k) =
          (static_cast<uint64_t>(id) << 32) | __float_as_uint(wt);
    }
  }
  if (ll_last_block(&p.st.done[kLlDoneCombineWeights + p.parity]) && threadIdx.x < R)
    st_release_sys(ll_signal(w.peer_base[threadIdx.x], control::ll::kCombineWeights, p.parity, me), n);

  if (!ll_wait_all(w, control::ll::kCombineWeights, p.parity, n, WaitSite::kLlCombineWeights, R))
    return false;
  if (threadIdx.x == 0) {
    tokens[0] = 0;
    for (int s = 0; s < R; ++s) tokens[s + 1] = tokens[s] + p.handle.src_tokens[s];
  }
  __syncthreads();

  // Work units: (source token, segment of its row), one warp each: the weighted sum of the token's rows
  // here, in pick order, rounded once to BF16, written into the source's area.
  char* area = ll_area(w.local_base, g, area_id);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t vecs = g.hidden / 8;
  const int nseg = static_cast<int>((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  const int64_t units = static_cast<int64_t>(tokens[R]) * nseg;
  const char* x = static_cast<const char*>(p.x);
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kLlWarps + warp; u < units;
       u += static_cast<int64_t>(gridDim.x) * kLlWarps) {
    const int m = static_cast<int>(u / nseg), q = static_cast<int>(u - static_cast<int64_t>(m) * nseg);
    int s = 0;
    while (tokens[s + 1] <= m) ++s;
    const int t = m - tokens[s];
    int32_t slot = -1;
    uint64_t pair = 0;
    if (lane < K) {
      slot = p.handle.tok_slots[(static_cast<int64_t>(s) * N + t) * K + lane];
      pair = __ldcg(reinterpret_cast<const unsigned long long*>(weight_slot(area, g, s, t, lane)));
    }
    if (__ballot_sync(~0u, slot >= 0) == 0) continue;  // no expert of t here: s expects nothing from us
    const int e = static_cast<int>(static_cast<uint32_t>(pair >> 32));
    const float wt = __uint_as_float(static_cast<uint32_t>(pair));
    uint32_t use = __ballot_sync(~0u, slot >= 0 && e >= 0);
    const int j = slot >= 0 ? slot / RN : 0;
    const long long off = j * p.x_stride0 + static_cast<int64_t>(slot >= 0 ? slot - j * RN : 0) * p.x_stride1;
    const int64_t first = static_cast<int64_t>(q) * kLlSegmentVecs + lane;
    float acc[kLlUnroll][8];
#pragma unroll
    for (int i = 0; i < kLlUnroll; ++i)
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[i][c] = 0.f;
    while (use != 0) {  // two picks per pass: their loads overlap, the sum keeps pick order
      const int ka = __ffs(use) - 1;
      use &= use - 1;
      const int kb = use != 0 ? __ffs(use) - 1 : -1;
      if (kb >= 0) use &= use - 1;
      const long long off_a = __shfl_sync(~0u, off, ka), off_b = __shfl_sync(~0u, off, kb >= 0 ? kb : ka);
      const float w_a = __shfl_sync(~0u, wt, ka), w_b = __shfl_sync(~0u, wt, kb >= 0 ? kb : ka);
      int4 va[kLlUnroll], vb[kLlUnroll];
#pragma unroll
      for (int i = 0; i < kLlUnroll; ++i) {
        if (first + 32 * i < vecs) {
          va[i] = ll_ld_nc(x + off_a + (first + 32 * i) * 16);
          if (kb >= 0) vb[i] = ll_ld_nc(x + off_b + (first + 32 * i) * 16);
        }
      }
#pragma unroll
      for (int i = 0; i < kLlUnroll; ++i) {
        if (first + 32 * i < vecs) {
          add_weighted(acc[i], va[i], w_a);
          if (kb >= 0) add_weighted(acc[i], vb[i], w_b);
        }
      }
    }
    int4* dst = reinterpret_cast<int4*>(ll_area(w.peer_base[s], g, area_id) +
                                        (static_cast<int64_t>(me) * N + t) * g.partial_bytes);
#pragma unroll
    for (int i = 0; i < kLlUnroll; ++i)
      if (first + 32 * i < vecs) dst[first + 32 * i] = to_bf16x8(acc[i]);
  }
  if (ll_last_block(&p.st.done[kLlDoneCombineSend + p.parity])) {
    if (threadIdx.x < R)
      st_release_sys(ll_signal(w.peer_base[threadIdx.x], control::ll::kCombineData, p.parity, me), n);
    if (threadIdx.x == 0) p.st.seq[kLlSeqCombineSend + p.parity] = n;
  }
  return true;
}

// Receive half: out[t] = sum of the partial rows of the ranks token t went to, rank ascending.
__device__ void combine_recv(const LlCombineParams& p) {
  const SymmetricView& w = p.win;
  const LlGeometry& g = p.g;
  const int me = w.rank, R = g.num_ranks, T = p.num_tokens, N = g.capacity;
  const uint64_t n = p.st.seq[kLlSeqCombineRecv + p.parity] + 1;
  if (!ll_wait_all(w, control::ll::kCombineData, p.parity, n, WaitSite::kLlCombineData, R)) return;

  const char* area = ll_area(w.local_base, g, 2 + p.parity);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t vecs = g.hidden / 8;
  const int nseg = static_cast<int>((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  const int64_t units = static_cast<int64_t>(T) * nseg;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kLlWarps + warp; u < units;
       u += static_cast<int64_t>(gridDim.x) * kLlWarps) {
    const int t = static_cast<int>(u / nseg), q = static_cast<int>(u - static_cast<int64_t>(t) * nseg);
    const uint64_t mask = p.handle.dst_mask[t];
    const int64_t first = static_cast<int64_t>(q) * kLlSegmentVecs + lane;
    float acc[kLlUnroll][8];
#pragma unroll
    for (int i = 0; i < kLlUnroll; ++i)
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[i][c] = 0.f;
    for (uint64_t mm = mask; mm != 0; mm &= mm - 1) {
      const int d = __ffsll(static_cast<long long>(mm)) - 1;
      const int4* src =
          reinterpret_cast<const int4*>(area + (static_cast<int64_t>(d) * N + t) * g.partial_bytes);
      int4 v[kLlUnroll];
#pragma unroll
      for (int i = 0; i < kLlUnroll; ++i)
        if (first + 32 * i < vecs) v[i] = __ldcg(src + first + 32 * i);
#pragma unroll
      for (int i = 0; i < kLlUnroll; ++i)
        if (first + 32 * i < vecs) add_bf16(acc[i], v[i]);
    }
    int4* out =
        reinterpret_cast<int4*>(static_cast<char*>(p.out) + static_cast<int64_t>(t) * p.out_row_stride * 2);
#pragma unroll
    for (int i = 0; i < kLlUnroll; ++i)
      if (first + 32 * i < vecs) out[first + 32 * i] = to_bf16x8(acc[i]);
  }
  if (ll_last_block(&p.st.done[kLlDoneCombineRecv + p.parity])) {
    if (threadIdx.x < R)
      st_release_sys(ll_signal(w.peer_base[threadIdx.x], control::ll::kCombineFree, p.parity, me), n);
    if (threadIdx.x == 0) p.st.seq[kLlSeqCombineRecv + p.parity] = n;
  }
}

__global__ void __launch_bounds__(kLlThreads, 1)
    ll_combine_kernel(const __grid_constant__ LlCombineParams p) {
  if ((p.phases & kLlSend) != 0 && !combine_send(p)) return;
  if ((p.phases & kLlRecv) != 0) combine_recv(p);
}

}  // namespace

int ll_combine_blocks_per_sm() {
  int blocks = 0;
  EL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, ll_combine_kernel, kLlThreads, 0));
  return blocks;
}

void launch_ll_combine(const LlCombineParams& p, int grid, cudaStream_t stream) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kLlThreads);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  EL_CUDA_CHECK(cudaLaunchKernelEx(&cfg, ll_combine_kernel, p));
}

}  // namespace expertlink::kernels
