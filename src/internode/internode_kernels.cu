// Kernels of the internode HT path. Buffer layout: records of RecordLayout (dispatch) or combine records,
// packed per destination in staging buffers that NCCL moves (transport.hpp); plan.hpp says which record
// goes where. No kernel here waits on another rank or reads peer memory: the only cross-rank
// synchronisation is NCCL's stream order, so these kernels cannot hang.
//
// Combine numerics: every reduction starts from 0.0f and adds in float32 in ascending target order
// (local ranks at the forwarder, then nodes at the source), then bias0, then bias1, rounding once to BF16
// per stage. With one GPU per node this is exactly the oracle's order and rounding (bitwise equal); with
// several, the forwarder's partial sum is rounded to BF16 before the network hop (as DeepEP does).
#include <cuda_bf16.h>
#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "check.hpp"
#include "internode/internode_kernels.hpp"

namespace expertlink::internode {
namespace {

using kernels::IdxType;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

int blocks_for(int64_t items) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(items, 1), kMaxBlocks));
}

__device__ __forceinline__ int64_t load_idx(const void* p, IdxType type, int64_t off) {
  return type == IdxType::kI64 ? static_cast<const int64_t*>(p)[off]
                               : int64_t{static_cast<const int32_t*>(p)[off]};
}

__device__ __forceinline__ uint64_t bit_range(int lo, int width) {
  return (width >= 64 ? ~0ull : ((1ull << width) - 1)) << lo;
}

// Source row of output row o: the largest s with rank_prefix[s] <= o (R <= 64: a linear walk).
__device__ __forceinline__ int source_of(const Offsets& prefix, int num_ranks, int64_t o) {
  int s = 0;
  while (s + 1 < num_ranks && o >= prefix.v[s + 1]) ++s;
  return s;
}

__global__ void count_kernel(CountParams p) {
  const int local = p.num_experts > 0 ? p.num_experts / p.num_ranks : 1;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < p.num_tokens; t += gridDim.x * blockDim.x) {
    uint64_t mask = 0;
    if (p.topk_idx != nullptr) {
      for (int k = 0; k < p.topk; ++k) {
        const int64_t e = load_idx(p.topk_idx, p.idx_type, t * p.idx_rs + k * p.idx_cs);
        if (e == -1) continue;
        if (e < -1 || e >= p.num_experts) {
          if (atomicCAS(&p.errors[kBadExpert], 0, 1) == 0) {
            p.errors[kBadExpert + 1] = t;
            p.errors[kBadExpert + 2] = k;
            p.errors[kBadExpert + 3] = static_cast<int32_t>(e);
          }
          continue;
        }
        mask |= 1ull << (e / local);
        bool first = true;  // a token counts once per distinct expert
        for (int j = 0; j < k && first; ++j)
          first = load_idx(p.topk_idx, p.idx_type, t * p.idx_rs + j * p.idx_cs) != e;
        if (first) atomicAdd(&p.counts[p.per_expert_at + e], 1);
      }
    } else {
      for (int d = 0; d < p.num_ranks; ++d)
        if (p.in_rank[t * p.in_rank_rs + d] != 0) mask |= 1ull << d;
    }
    p.masks[t] = mask;
    for (int d = 0; d < p.num_ranks; ++d)
      if ((mask >> d) & 1ull) atomicAdd(&p.counts[p.per_rank_at + d], 1);
    for (int n = 0; n < p.num_nodes; ++n)
      if (mask & bit_range(n * p.local_size, p.local_size)) atomicAdd(&p.counts[p.per_node_at + n], 1);
  }
}

__global__ void __launch_bounds__(kThreads)
    lists_kernel(const uint64_t* masks, int64_t n, int targets, int first, int stride, int width, Offsets off,
                 int32_t* list, int32_t* pos, int32_t* errors) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int k = blockIdx.x;
  const uint64_t target = bit_range(first + k * stride, width);
  const int64_t expected = off.v[k + 1] - off.v[k];
  int64_t base = 0;
  for (int64_t start = 0; start < n; start += kThreads) {
    const int64_t i = start + threadIdx.x;
    const int flag = (i < n && (masks[i] & target) != 0) ? 1 : 0;
    int excl = 0, total = 0;
    Scan(temp).ExclusiveSum(flag, excl, total);
    if (i < n) {
      const int64_t at = base + excl;
      pos[i * targets + k] = flag ? static_cast<int32_t>(at) : -1;
      if (flag && at < expected) list[off.v[k] + at] = static_cast<int32_t>(i);
    }
    base += total;
    __syncthreads();  // temp is reused by the next chunk's scan
  }
  if (threadIdx.x == 0 && base != expected && atomicCAS(&errors[kListMismatch], 0, 1) == 0) {
    errors[kListMismatch + 1] = k;
    errors[kListMismatch + 2] = static_cast<int32_t>(base);
    errors[kListMismatch + 3] = static_cast<int32_t>(expected);
  }
}

__global__ void gather_masks_kernel(const uint64_t* masks, const int32_t* list, int64_t n, uint64_t* dst) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < n;
       r += int64_t(gridDim.x) * blockDim.x)
    dst[r] = masks[list[r]];
}

__device__ __forceinline__ void copy16(char* dst, const char* src, int64_t bytes) {
  for (int64_t c = threadIdx.x; c < bytes / 16; c += blockDim.x)
    reinterpret_cast<int4*>(dst)[c] = reinterpret_cast<const int4*>(src)[c];
}

__global__ void pack_kernel(PackParams p) {
  const RecordLayout& rl = p.rec;
  for (int64_t r = blockIdx.x; r < p.n; r += gridDim.x) {
    const int64_t t = p.list[r];
    char* rec = p.out + r * rl.bytes;
    copy16(rec, static_cast<const char*>(p.x.data) + t * p.x.row_stride * p.elem_bytes, rl.row_bytes);
    const int32_t* sc = static_cast<const int32_t*>(p.scales.data);
    for (int c = threadIdx.x; c < rl.scale_cols; c += blockDim.x)
      reinterpret_cast<int32_t*>(rec + rl.scale_off)[c] =
          sc[t * p.scales.row_stride + c * p.scales.col_stride];
    if (threadIdx.x == 0) *reinterpret_cast<int32_t*>(rec + rl.token_off) = static_cast<int32_t>(t);
    // Cached mode (no topk_idx) or no weights: the slots still travel (fixed record size), as -1 / 0.
    for (int k = threadIdx.x; k < rl.topk; k += blockDim.x) {
      reinterpret_cast<int32_t*>(rec + rl.idx_off)[k] =
          p.topk_idx != nullptr
              ? static_cast<int32_t>(load_idx(p.topk_idx, p.idx_type, t * p.idx_rs + k * p.idx_cs))
              : -1;
      if (rl.weights)
        reinterpret_cast<float*>(rec + rl.weight_off)[k] =
            p.weights.data != nullptr
                ? static_cast<const float*>(
                      p.weights.data)[t * p.weights.row_stride + k * p.weights.col_stride]
                : 0.0f;
    }
  }
}

__global__ void forward_kernel(const char* src, const int32_t* list, int64_t n, int64_t bytes, char* dst) {
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x)
    copy16(dst + r * bytes, src + int64_t(list[r]) * bytes, bytes);
}

__global__ void unpack_kernel(UnpackParams p) {
  const RecordLayout& rl = p.rec;
  const int local = p.local_experts;
  for (int64_t o = blockIdx.x; o < p.rows; o += gridDim.x) {
    const int s = source_of(p.rank_prefix, p.num_ranks, o);
    const char* rec = p.in + (p.src_record.v[s] + (o - p.rank_prefix.v[s])) * rl.bytes;
    copy16(static_cast<char*>(p.recv_x) + o * p.recv_x_stride, rec, rl.row_bytes);
    if (p.recv_scales != nullptr)
      for (int c = threadIdx.x; c < rl.scale_cols; c += blockDim.x)
        static_cast<int32_t*>(p.recv_scales)[o * p.scales_rs + c * p.scales_cs] =
            reinterpret_cast<const int32_t*>(rec + rl.scale_off)[c];
    if (threadIdx.x == 0) p.recv_src_token[o] = *reinterpret_cast<const int32_t*>(rec + rl.token_off);
    for (int k = threadIdx.x; k < rl.topk; k += blockDim.x) {
      const int32_t e = reinterpret_cast<const int32_t*>(rec + rl.idx_off)[k];
      const bool here = e >= 0 && e < local * p.num_ranks && e / local == p.rank;
      const int64_t id = here ? int64_t{e} - int64_t{p.rank} * local : -1;
      if (p.recv_topk_idx != nullptr) {
        if (p.idx_type == IdxType::kI64)
          static_cast<int64_t*>(p.recv_topk_idx)[o * rl.topk + k] = id;
        else
          static_cast<int32_t*>(p.recv_topk_idx)[o * rl.topk + k] = static_cast<int32_t>(id);
      }
      if (p.recv_weights != nullptr)
        p.recv_weights[o * rl.topk + k] =
            here ? reinterpret_cast<const float*>(rec + rl.weight_off)[k] : 0.0f;
    }
  }
}

__global__ void combine_pack_kernel(CombinePackParams p) {
  for (int64_t o = blockIdx.x; o < p.rows; o += gridDim.x) {
    const int s = source_of(p.rank_prefix, p.num_ranks, o);
    char* rec = p.out + (p.src_record.v[s] + (o - p.rank_prefix.v[s])) * p.rec_bytes;
    copy16(rec, static_cast<const char*>(p.x.data) + o * p.x.row_stride * 2, 2 * p.hidden);
    for (int k = threadIdx.x; k < p.topk; k += blockDim.x)
      reinterpret_cast<float*>(rec + 2 * p.hidden)[k] =
          static_cast<const float*>(p.weights.data)[o * p.weights.row_stride + k * p.weights.col_stride];
  }
}

__device__ __forceinline__ void add8(float (&acc)[8], const char* src) {
  const int4 v = *reinterpret_cast<const int4*>(src);
  const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = acc[e] + __bfloat162float(b[e]);
}

__global__ void reduce_kernel(ReduceParams p) {
  const int64_t chunks = p.hidden / 8;
  for (int64_t q = blockIdx.x; q < p.n; q += gridDim.x) {
    const int32_t* pos = p.pos + q * p.targets;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int k = 0; k < p.targets; ++k)
        if (pos[k] >= 0) add8(acc, p.in + (p.off.v[k] + pos[k]) * p.in_rec_bytes + c * 16);
      if (p.bias0.data != nullptr)
        add8(acc, static_cast<const char*>(p.bias0.data) + q * p.bias0.row_stride * 2 + c * 16);
      if (p.bias1.data != nullptr)
        add8(acc, static_cast<const char*>(p.bias1.data) + q * p.bias1.row_stride * 2 + c * 16);
      int4 out;
      __nv_bfloat16* b = reinterpret_cast<__nv_bfloat16*>(&out);
#pragma unroll
      for (int e = 0; e < 8; ++e) b[e] = __float2bfloat16(acc[e]);
      *reinterpret_cast<int4*>(p.out + q * p.out_stride + c * 16) = out;
    }
    for (int kk = threadIdx.x; kk < p.topk; kk += blockDim.x) {
      float a = 0.0f;
      for (int k = 0; k < p.targets; ++k)
        if (pos[k] >= 0)
          a = a + reinterpret_cast<const float*>(p.in + (p.off.v[k] + pos[k]) * p.in_rec_bytes +
                                                 2 * p.hidden)[kk];
      if (p.weights_to_record)
        reinterpret_cast<float*>(p.out + q * p.out_stride + 2 * p.hidden)[kk] = a;
      else if (p.out_weights != nullptr)
        p.out_weights[q * p.topk + kk] = a;
    }
  }
}

}  // namespace

RecordLayout make_record_layout(int64_t row_bytes, int scale_cols, int topk, bool weights) {
  RecordLayout r;
  r.row_bytes = row_bytes;
  r.scale_cols = scale_cols;
  r.topk = topk;
  r.weights = weights && topk > 0;
  r.scale_off = row_bytes;
  r.token_off = r.scale_off + 4ll * scale_cols;
  r.idx_off = r.token_off + 4;
  r.weight_off = r.idx_off + 4ll * topk;
  r.bytes = kernels::align16(r.weight_off + (r.weights ? 4ll * topk : 0));
  return r;
}

void launch_count(const CountParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  count_kernel<<<blocks_for((p.num_tokens + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_lists(const uint64_t* masks, int64_t n, int targets, int first, int stride, int width,
                  const Offsets& off, int32_t* list, int32_t* pos, int32_t* errors, cudaStream_t stream) {
  EL_CHECK(targets >= 1 && targets <= kMaxTargets, "internal: %d list targets", targets);
  // Runs even for n = 0: it checks the planned counts (all zero then).
  lists_kernel<<<targets, kThreads, 0, stream>>>(masks, n, targets, first, stride, width, off, list, pos,
                                                 errors);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_gather_masks(const uint64_t* masks, const int32_t* list, int64_t n, uint64_t* dst,
                         cudaStream_t stream) {
  if (n == 0) return;
  gather_masks_kernel<<<blocks_for((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(masks, list, n,
                                                                                          dst);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_pack(const PackParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  pack_kernel<<<blocks_for(p.n), 128, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_forward(const char* src, const int32_t* list, int64_t n, int64_t bytes, char* dst,
                    cudaStream_t stream) {
  if (n == 0) return;
  forward_kernel<<<blocks_for(n), 128, 0, stream>>>(src, list, n, bytes, dst);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_unpack(const UnpackParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  unpack_kernel<<<blocks_for(p.rows), 128, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_combine_pack(const CombinePackParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  combine_pack_kernel<<<blocks_for(p.rows), 128, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

void launch_reduce(const ReduceParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  reduce_kernel<<<blocks_for(p.n), kThreads, 0, stream>>>(p);
  EL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace expertlink::internode
