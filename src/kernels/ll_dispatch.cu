// LL dispatch: one kernel on all SMs, send half and/or receive half (split mode launches them apart).
// Every token row is read and cast to FP8 once, and written once into each rank that holds one of its
// experts; the receiver expands it to its experts' rows. Protocol and buffer layout: ll_protocol.cuh.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "check.hpp"
#include "kernels/ll_protocol.cuh"

namespace expertlink::kernels {
namespace {

constexpr float kE4m3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// The token being sent by a block: its picks and their header words (before the destination check).
struct TokenShared {
  int32_t expert[kLlMaxTopk];  // valid expert id or -1
  int32_t word[kLlMaxTopk];    // j | pos << 10 | dup << 30, or -1
  uint64_t mask;               // destination ranks
};

__device__ __forceinline__ int64_t pick(const LlDispatchParams& p, int t, int k) {
  return ll_load_index(p.topk_idx, p.idx_type, t * p.idx_row_stride + k * p.idx_col_stride);
}

// Adds token t's distinct valid experts to the histogram (invalid ids are ignored; token_header flags them).
__device__ void count_token(const LlDispatchParams& p, int t, int* hist) {
  const int K = p.g.topk, E = p.g.num_experts;
  int e[kLlMaxTopk];
#pragma unroll
  for (int k = 0; k < kLlMaxTopk; ++k) {
    const int64_t v = k < K ? pick(p, t, k) : -1;
    e[k] = v >= 0 && v < E ? static_cast<int>(v) : -1;
  }
#pragma unroll
  for (int k = 0; k < kLlMaxTopk; ++k) {
    bool first = e[k] >= 0;
#pragma unroll
    for (int k2 = 0; k2 < k; ++k2) first = first && e[k2] != e[k];
    if (first) atomicAdd(&hist[e[k]], 1);
  }
}

// Warp 0: token t's header words. hist[e] counts the tokens before t that picked e; it is advanced past t.
__device__ void token_header(const LlDispatchParams& p, int t, int* hist, TokenShared& ts) {
  const int lane = threadIdx.x & 31, K = p.g.topk, E = p.g.num_experts, EL = p.g.local_experts;
  int e = -1;
  if (lane < K) {
    const int64_t v = pick(p, t, lane);
    if (v >= 0 && v < E)
      e = static_cast<int>(v);
    else if (v != -1)
      ll_flag_bad_expert(p.st, t, lane, v);
  }
  int first = lane;  // first slot naming the same expert
#pragma unroll
  for (int k = 0; k < kLlMaxTopk; ++k) {
    const int ek = __shfl_sync(~0u, e, k);
    if (k < lane && first == lane && e >= 0 && ek == e) first = k;
  }
  const bool dup = first != lane;
  int pos = e >= 0 && !dup ? hist[e] : 0;
  pos = __shfl_sync(~0u, pos, first);
  __syncwarp();
  if (e >= 0 && !dup) hist[e] = pos + 1;  // distinct experts per lane: no conflicts
  const uint64_t mask = ll_warp_or(e >= 0 ? 1ull << (e / EL) : 0ull);
  if (lane < K) {
    ts.expert[lane] = e;
    ts.word[lane] = e >= 0 ? (e % EL) | (pos << 10) | (static_cast<int>(dup) << 30) : -1;
  }
  if (lane == 0) ts.mask = mask;
}

__device__ __forceinline__ char* message(const LlDispatchParams& p, int d, int t) {
  const LlGeometry& g = p.g;
  return ll_area(p.win.peer_base[d], g, p.parity) + g.msg_offset +
         (static_cast<int64_t>(p.win.rank) * g.capacity + t) * g.msg_bytes;
}

// All threads: token t cast to FP8 (16 channels per thread, 8 threads per 128-channel group) and written
// with its scales into the message of every destination in `mask`. Bit-exact with the oracle's cast.
__device__ void send_row_fp8(const LlDispatchParams& p, int t, uint64_t mask) {
  const LlGeometry& g = p.g;
  const int lane = threadIdx.x & 31, chunks = g.hidden / 16;
  const char* x_row = static_cast<const char*>(p.x) + static_cast<int64_t>(t) * p.x_row_stride * 2;
  for (int base = 0; base < chunks; base += blockDim.x) {  // uniform trip count: shuffles stay converged
    const int c = base + threadIdx.x;
    const bool valid = c < chunks;
    float f[16];
    if (valid) {
      int4 raw[2] = {ll_ld_nc(x_row + c * 32), ll_ld_nc(x_row + c * 32 + 16)};
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) f[i] = 0.f;
    }
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
    amax = fmaxf(amax, __shfl_xor_sync(~0u, amax, 4));
    amax = fmaxf(amax, __shfl_xor_sync(~0u, amax, 2));
    amax = fmaxf(amax, __shfl_xor_sync(~0u, amax, 1));
    amax = fmaxf(amax, kAmaxFloor);
    float sf = __fdiv_rn(amax, kE4m3Max);
    if (p.round_scale) {
      uint32_t u = __float_as_uint(sf);
      if ((u & 0x7F800000u) != 0x7F800000u && (u & 0x007FFFFFu) != 0) u = (u & 0xFF800000u) + 0x00800000u;
      sf = __uint_as_float(u);
    }
    uint32_t q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[i] = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b)
        q[i] |= static_cast<uint32_t>(
                    __nv_cvt_float_to_fp8(__fdiv_rn(f[4 * i + b], sf), __NV_SATFINITE, __NV_E4M3))
                << (8 * b);
    }
    const int4 out = make_int4(static_cast<int>(q[0]), static_cast<int>(q[1]), static_cast<int>(q[2]),
                               static_cast<int>(q[3]));
    // Scales: a float per group from its first lane, or 4 UE8M0 bytes per word from the warp's lane 0
    // (a warp covers 4 whole groups; groups past the row give byte 0).
    uint32_t scale = __float_as_uint(sf);
    int scale_index = c >> 3;
    bool write_scale = valid && (lane & 7) == 0;
    if (p.ue8m0) {
      const uint32_t byte = valid ? (__float_as_uint(sf) >> 23) & 0xFFu : 0u;
      scale = __shfl_sync(~0u, byte, 0) | (__shfl_sync(~0u, byte, 8) << 8) |
              (__shfl_sync(~0u, byte, 16) << 16) | (__shfl_sync(~0u, byte, 24) << 24);
      scale_index = c >> 5;
      write_scale = valid && lane == 0;
    }
    for (uint64_t m = mask; m != 0; m &= m - 1) {
      char* msg = message(p, __ffsll(static_cast<long long>(m)) - 1, t);
      if (valid) reinterpret_cast<int4*>(msg)[c] = out;
      if (write_scale) reinterpret_cast<uint32_t*>(msg + g.row_bytes)[scale_index] = scale;
    }
  }
}

__device__ void send_row_bf16(const LlDispatchParams& p, int t, uint64_t mask) {
  const int vecs = p.g.hidden / 8;
  const char* x_row = static_cast<const char*>(p.x) + static_cast<int64_t>(t) * p.x_row_stride * 2;
  for (int c = threadIdx.x; c < vecs; c += blockDim.x) {
    const int4 v = ll_ld_nc(x_row + c * 16);
    for (uint64_t m = mask; m != 0; m &= m - 1)
      reinterpret_cast<int4*>(message(p, __ffsll(static_cast<long long>(m)) - 1, t))[c] = v;
  }
}

// Send half. Returns false when a wait failed (the block has left the protocol).
__device__ bool dispatch_send(const LlDispatchParams& p) {
  __shared__ int hist[kLlMaxExperts];
  __shared__ TokenShared ts;
  __shared__ int failed;
  const SymmetricView& w = p.win;
  const LlGeometry& g = p.g;
  const int me = w.rank, R = g.num_ranks, T = p.num_tokens, K = g.topk, E = g.num_experts,
            EL = g.local_experts;
  const uint64_t n = p.st.seq[kLlSeqDispatchSend + p.parity] + 1;
  const int t0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) * T / gridDim.x);
  const int t1 = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * T / gridDim.x);
  const bool meta_writer = blockIdx.x == gridDim.x - 1;  // owns the last range: its histogram ends complete

  if (t0 < t1 || meta_writer) {  // block-uniform
    for (int i = threadIdx.x; i < E; i += blockDim.x) hist[i] = 0;
    if (threadIdx.x == 0) failed = 0;
    __syncthreads();
    // Threads [0, R) wait until every receiver has freed this parity's area (its use n - 1 is read);
    // threads [64, ...) meanwhile count the picks of the tokens before this block's range.
    const WaitContext ctx{w.record, w.timeout_ns, me};
    if (threadIdx.x < R) {
      if (!wait_geq(ll_signal(w.local_base, control::ll::kDispatchFree, p.parity, threadIdx.x), n - 1, ctx,
                    WaitSite::kLlDispatchFree, threadIdx.x, p.parity))
        failed = 1;
    } else if (threadIdx.x >= 64) {
      for (int t = threadIdx.x - 64; t < t0; t += blockDim.x - 64) count_token(p, t, hist);
    }
    __syncthreads();
    if (failed) return false;

    for (int t = t0; t < t1; ++t) {
      if (threadIdx.x < 32) token_header(p, t, hist, ts);
      __syncthreads();
      const uint64_t mask = ts.mask;
      if (p.fp8)
        send_row_fp8(p, t, mask);
      else
        send_row_bf16(p, t, mask);
      for (int i = threadIdx.x; i < R * K; i += blockDim.x) {  // every rank gets the header
        const int d = i / K, k = i - d * K, e = ts.expert[k];
        reinterpret_cast<int32_t*>(message(p, d, t) + g.header_offset)[k] =
            e >= 0 && e / EL == d ? ts.word[k] : -1;
      }
      if (threadIdx.x == 0) p.handle.dst_mask[t] = mask;
      __syncthreads();
    }
    if (meta_writer) {
      for (int i = threadIdx.x; i < R * kLlMetaHeader; i += blockDim.x) {
        const int d = i / kLlMetaHeader, f = i - d * kLlMetaHeader;
        const int v = f == 0 ? T : f == 1 ? g.hidden : f == 2 ? K : f == 3 ? E : 0;
        reinterpret_cast<int32_t*>(ll_area(w.peer_base[d], g, p.parity) + me * g.meta_stride)[f] = v;
      }
      for (int i = threadIdx.x; i < E; i += blockDim.x) {
        const int d = i / EL;
        reinterpret_cast<int32_t*>(ll_area(w.peer_base[d], g, p.parity) +
                                   me * g.meta_stride)[kLlMetaHeader + i - d * EL] = hist[i];
      }
    }
  }
  if (ll_last_block(&p.st.done[kLlDoneDispatchSend + p.parity])) {
    if (threadIdx.x < R)
      st_release_sys(ll_signal(w.peer_base[threadIdx.x], control::ll::kDispatchData, p.parity, me), n);
    if (threadIdx.x == 0) p.st.seq[kLlSeqDispatchSend + p.parity] = n;
  }
  return true;
}

// Receive half: expand every arrived message into the rows of the local experts it picked.
__device__ void dispatch_recv(const LlDispatchParams& p) {
  __shared__ int begin[kLlMaxExperts];   // [j * R + s]: first row of source s in expert j
  __shared__ int tokens[kMaxRanks + 1];  // prefix over sources of T_s
  __shared__ int src_tokens[kMaxRanks];
  __shared__ int failed;
  const SymmetricView& w = p.win;
  const LlGeometry& g = p.g;
  const int me = w.rank, R = g.num_ranks, EL = g.local_experts, K = g.topk, N = g.capacity, RN = R * N;
  const uint64_t n = p.st.seq[kLlSeqDispatchRecv + p.parity] + 1;
  const WaitContext ctx{w.record, w.timeout_ns, me};
  const char* area = ll_area(w.local_base, g, p.parity);

  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  if (threadIdx.x < R) {
    const int s = threadIdx.x;
    if (!wait_geq(ll_signal(w.local_base, control::ll::kDispatchData, p.parity, s), n, ctx,
                  WaitSite::kLlDispatchData, s, p.parity)) {
      failed = 1;
    } else {
      const int32_t* meta = reinterpret_cast<const int32_t*>(area + s * g.meta_stride);
      const int theirs[3] = {__ldcg(meta + 1), __ldcg(meta + 2), __ldcg(meta + 3)};
      const int ours[3] = {g.hidden, g.topk, g.num_experts};
      // Ranks that disagree on the shape misread each other's areas: stop and name the argument.
      for (int a = 0; a < 3; ++a) {
        if (theirs[a] != ours[a]) {
          record_timeout(ctx, WaitSite::kMismatch, s, a, ours[a], theirs[a], 0);
          failed = 1;
          break;
        }
      }
      src_tokens[s] = min(max(__ldcg(meta), 0), N);
    }
  }
  __syncthreads();
  if (failed) return;
  if (threadIdx.x == 0) {
    tokens[0] = 0;
    for (int s = 0; s < R; ++s) tokens[s + 1] = tokens[s] + src_tokens[s];
  }
  if (blockIdx.x == 0 && threadIdx.x < R) p.handle.src_tokens[threadIdx.x] = src_tokens[threadIdx.x];
  for (int j = threadIdx.x; j < EL; j += blockDim.x) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      const int c = __ldcg(reinterpret_cast<const int32_t*>(area + s * g.meta_stride) + kLlMetaHeader + j);
      begin[j * R + s] = acc;
      if (blockIdx.x == 0 && p.layout_range != nullptr) {
        if (p.range_packed) {
          static_cast<int64_t*>(p.layout_range)[j * p.range_stride0 + s * p.range_stride1] =
              static_cast<int64_t>(static_cast<uint32_t>(c)) | (static_cast<int64_t>(acc) << 32);
        } else {
          int32_t* r = static_cast<int32_t*>(p.layout_range) + j * p.range_stride0 + s * p.range_stride1;
          r[0] = acc;
          r[p.range_stride2] = c;
        }
      }
      acc += c;
    }
    if (blockIdx.x == 0) p.recv_count[j] = acc;
  }
  __syncthreads();

  // Work units: (message, segment of kLlSegmentVecs vectors of its row), one warp each.
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t vecs = g.row_bytes / 16;
  const int nseg = static_cast<int>((vecs + kLlSegmentVecs - 1) / kLlSegmentVecs);
  const int64_t units = static_cast<int64_t>(tokens[R]) * nseg;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kLlWarps + warp; u < units;
       u += static_cast<int64_t>(gridDim.x) * kLlWarps) {
    const int m = static_cast<int>(u / nseg), q = static_cast<int>(u - static_cast<int64_t>(m) * nseg);
    int s = 0;
    while (tokens[s + 1] <= m) ++s;
    const int t = m - tokens[s];
    const char* msg = area + g.msg_offset + (static_cast<int64_t>(s) * N + t) * g.msg_bytes;
    const int32_t h = lane < K ? __ldcg(reinterpret_cast<const int32_t*>(msg + g.header_offset) + lane) : -1;
    const int j = h & 0x3FF, pos = (h >> 10) & 0x3FF;
    bool valid = h >= 0 && j < EL;
    const int row = valid ? begin[j * R + s] + pos : 0;
    valid = valid && row < RN;
    const bool copy = valid && ((h >> 30) & 1) == 0;
    const uint32_t cmask = __ballot_sync(~0u, copy);
    if (q == 0) {
      if (lane < K)
        p.handle.tok_slots[(static_cast<int64_t>(s) * N + t) * K + lane] = valid ? j * RN + row : -1;
      if (copy && p.src_info != nullptr) p.src_info[j * p.src_info_stride0 + row * p.src_info_stride1] = t;
      if (g.scale_cols > 0 && cmask != 0) {
        const uint32_t* scales = reinterpret_cast<const uint32_t*>(msg + g.row_bytes);
        uint32_t sc[4];  // scale_cols <= 128
#pragma unroll
        for (int i = 0; i < 4; ++i)
          sc[i] = lane + 32 * i < g.scale_cols ? __ldcg(scales + lane + 32 * i) : 0u;
        for (uint32_t mm = cmask; mm != 0; mm &= mm - 1) {
          const int k = __ffs(mm) - 1;
          const int jj = __shfl_sync(~0u, j, k), rr = __shfl_sync(~0u, row, k);
          uint32_t* dst =
              static_cast<uint32_t*>(p.recv_scales) + jj * p.scales_stride0 + rr * p.scales_stride1;
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (lane + 32 * i < g.scale_cols) dst[(lane + 32 * i) * p.scales_stride2] = sc[i];
        }
      }
    }
    if (cmask != 0) {
      int4 v[kLlUnroll];
      const int64_t first = static_cast<int64_t>(q) * kLlSegmentVecs + lane;
#pragma unroll
      for (int i = 0; i < kLlUnroll; ++i)
        if (first + 32 * i < vecs) v[i] = __ldcg(reinterpret_cast<const int4*>(msg) + first + 32 * i);
      for (uint32_t mm = cmask; mm != 0; mm &= mm - 1) {
        const int k = __ffs(mm) - 1;
        const int jj = __shfl_sync(~0u, j, k), rr = __shfl_sync(~0u, row, k);
        int4* dst = reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + jj * p.recv_x_stride0 +
                                            rr * p.recv_x_stride1);
#pragma unroll
        for (int i = 0; i < kLlUnroll; ++i)
          if (first + 32 * i < vecs) dst[first + 32 * i] = v[i];
      }
    }
  }
  if (ll_last_block(&p.st.done[kLlDoneDispatchRecv + p.parity])) {
    if (threadIdx.x < R)
      st_release_sys(ll_signal(w.peer_base[threadIdx.x], control::ll::kDispatchFree, p.parity, me), n);
    if (threadIdx.x == 0) p.st.seq[kLlSeqDispatchRecv + p.parity] = n;
  }
}

__global__ void __launch_bounds__(kLlThreads, 1)
    ll_dispatch_kernel(const __grid_constant__ LlDispatchParams p) {
  if ((p.phases & kLlSend) != 0 && !dispatch_send(p)) return;
  if ((p.phases & kLlRecv) != 0) dispatch_recv(p);
}

}  // namespace

int ll_dispatch_blocks_per_sm() {
  int blocks = 0;
  EL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, ll_dispatch_kernel, kLlThreads, 0));
  return blocks;
}

void launch_ll_dispatch(const LlDispatchParams& p, int grid, cudaStream_t stream) {
  // Cooperative: every block is resident at once, so blocks that wait never starve the ones they wait for.
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kLlThreads);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  EL_CUDA_CHECK(cudaLaunchKernelEx(&cfg, ll_dispatch_kernel, p));
}

}  // namespace expertlink::kernels
