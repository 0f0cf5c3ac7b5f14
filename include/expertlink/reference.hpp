// The CPU oracle of ExpertLink: the contract every GPU kernel is checked against.
//
// It simulates all R ranks of an expert-parallel group at once, in host memory, with plain row-major
// std::vectors. Dispatch is a copy, so GPU results must match it bitwise (after canonical ordering where
// the GPU order is free, see canonicalize_ll_recv). Combine is a float32 sum rounded once to BF16: the
// oracle fixes one summation order; GPU kernels may sum in another order (or fuse multiply-adds), so
// tests compare combine outputs with a float tolerance, never bitwise.
//
// Storage conventions: BF16 values are uint16_t bit patterns, FP8 e4m3 values are uint8_t bit patterns,
// all tensors are row-major, "[A, B]" means a vector of A*B elements, element (a, b) at a*B + b.
// Expert e lives on rank e / (num_experts / num_ranks); its local id there is e % (num_experts / num_ranks).
// Errors: invalid arguments throw expertlink::Error (kInvalidArgument) whose message names the rank, the
// argument and the value, e.g. "rank 1: topk_idx[17][3] = 300 is not an expert: num_experts = 256".
#pragma once

#include <cstdint>
#include <vector>

namespace expertlink::reference {

// ---------------------------------------------------------------------------------------------------
// Numeric conversions. Each is bit-exact with the CUDA conversion named beside it.
// ---------------------------------------------------------------------------------------------------

float bf16_to_float(uint16_t bits);  // exact
// __float2bfloat16 (round to nearest even; overflow rounds to +-inf; any NaN -> 0x7FFF, CUDA's canonical
// quiet NaN, whatever the input's sign and payload).
uint16_t float_to_bf16(float value);

// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3): round to nearest even (denormals included);
// |x| above 448 (finite or infinite) saturates to +-448 (0x7E / 0xFE); any NaN, of either sign, gives
// 0x7F; |x| <= 2^-10 (half the smallest denormal) gives a zero that keeps the sign of x (0x00 / 0x80).
uint8_t float_to_e4m3(float value);
// Exact. 0x7F and 0xFF (the NaNs) give the positive quiet NaN 0x7FFFE000 (what CUDA's fp8 -> half ->
// float path yields); everything else is (-1)^s * 2^(e-7) * (1 + m/8), or 2^-6 * m/8 when e = 0.
float e4m3_to_float(uint8_t bits);

inline constexpr int kFp8GroupSize = 128;      // channels sharing one scale
inline constexpr int kUe8m0GroupsPerWord = 4;  // UE8M0 scale bytes packed in one int32
inline constexpr float kE4m3Max = 448.0f;      // largest finite e4m3 value
inline constexpr float kFp8AmaxFloor = 1e-4f;  // amax is clamped up to this (no zero scales)
inline constexpr int kMaxTopk = 32;
inline constexpr int kMaxExperts = 1024;

// The per-128-channel FP8 cast (LL dispatch does it inside the kernel; HT FP8 inputs may be made with it).
// For each group g of 128 consecutive channels of a BF16 row x (channels 128g .. 128g+127):
//   amax  = max over the group of |float(x[i])|, folded with fmaxf (a NaN element is ignored);
//   amax  = fmaxf(amax, 1e-4f);
//   sf    = amax / 448.0f                            (IEEE float32 division, round to nearest);
//   if round_scale: sf = the smallest power of two >= sf, computed on the bits: if the 23 mantissa bits
//                   of sf are not all zero, add one to the exponent field and clear the mantissa;
//   q[i]  = float_to_e4m3(float(x[i]) / sf)          (IEEE float32 division, NOT multiplication by 1/sf).
// Scales are stored either as float32 sf, [rows, hidden / 128], or (use_ue8m0, which requires
// round_scale) as UE8M0 bytes: byte = the biased exponent field of sf (bits 30..23), so
// sf = 2^(byte - 127); the bytes of 4 consecutive groups are packed into one int32, little-endian: group
// 4j + b goes to bits 8b .. 8b+7 of word j; a row has ceil(hidden / 512) words, missing groups' bytes 0.
// Dequantization: x ~= e4m3_to_float(q[i]) * sf. Bound: |x - dequant| <= max(|x| * 2^-4, sf * 2^-10)
// (half an e4m3 ulp, normal and denormal range), plus float rounding.
float fp8_group_scale(const uint16_t* x, int64_t count, bool round_scale);
// Quantizes one row of `hidden` (a multiple of 128) channels: q [hidden], sf [hidden / 128].
void quantize_row_fp8(const uint16_t* x, int64_t hidden, bool round_scale, uint8_t* q, float* sf);
uint8_t ue8m0_from_scale(float sf);  // the biased exponent byte of sf
float ue8m0_to_scale(uint8_t byte);  // 2^(byte - 127); byte 0 gives 2^-127 (a float denormal)
// Byte of group `group` from a packed UE8M0 row (little-endian packing above).
uint8_t ue8m0_unpack(const int32_t* row_words, int64_t group);
int64_t ue8m0_words_per_row(int64_t hidden);  // ceil(hidden / 512)

// ---------------------------------------------------------------------------------------------------
// Token rows: a [rows, hidden] tensor of BF16, or of FP8 e4m3 with per-128-channel scales.
// ---------------------------------------------------------------------------------------------------

enum class RowFormat {
  kBf16,      // bf16 [rows, hidden]
  kFp8,       // fp8 [rows, hidden] + scales float32 [rows, hidden / 128]
  kFp8Ue8m0,  // fp8 [rows, hidden] + packed_scales int32 [rows, ceil(hidden / 512)]
};
const char* row_format_name(RowFormat format);

struct TokenRows {
  RowFormat format = RowFormat::kBf16;
  int64_t rows = 0;
  int64_t hidden = 0;
  std::vector<uint16_t> bf16;          // kBf16 only
  std::vector<uint8_t> fp8;            // kFp8, kFp8Ue8m0
  std::vector<float> scales;           // kFp8 only
  std::vector<int32_t> packed_scales;  // kFp8Ue8m0 only

  bool is_fp8() const { return format != RowFormat::kBf16; }
  // Scale columns per row: 0 (kBf16), hidden / 128 (kFp8), ceil(hidden / 512) (kFp8Ue8m0).
  int64_t scale_columns() const;
  float scale(int64_t row, int64_t group) const;   // the decoded sf of a group (FP8 formats)
  float value(int64_t row, int64_t column) const;  // BF16 value, or dequantized FP8 value
  // Copies row src_row of src (same format and hidden) into row dst_row of this, scales included.
  void copy_row(const TokenRows& src, int64_t src_row, int64_t dst_row);
};

// Rows of the given format and shape, all data zero (scales 0; UE8M0 words 0).
TokenRows make_token_rows(RowFormat format, int64_t rows, int64_t hidden);
TokenRows bf16_rows(int64_t rows, int64_t hidden, std::vector<uint16_t> data);
// The per-128-channel cast above, applied to each row of a BF16 [rows, hidden] tensor.
TokenRows cast_to_fp8(const uint16_t* x, int64_t rows, int64_t hidden, bool round_scale, bool use_ue8m0);
TokenRows cast_to_fp8(const TokenRows& bf16, bool round_scale, bool use_ue8m0);
std::vector<float> dequantize(const TokenRows& rows);  // float [rows, hidden]

// Throws kInvalidArgument naming `what` when the data vectors do not match format, rows and hidden, or
// when an FP8 hidden is not a multiple of 128.
void validate_rows(const TokenRows& rows, const char* what);

// topk_idx arrives as int64 (DeepEP's dtype) or int32: the oracle works on int64.
std::vector<int64_t> widen_topk_idx(const std::vector<int32_t>& topk_idx);

// ---------------------------------------------------------------------------------------------------
// Dispatch layout of one rank (DeepEP's get_dispatch_layout).
// ---------------------------------------------------------------------------------------------------

struct DispatchLayout {
  std::vector<int32_t> num_tokens_per_rank;  // [R]: tokens with at least one expert on that rank
  // [E]: tokens that picked the expert at least once. A token listing an expert twice counts once
  // (DeepEP counts slots; the two agree for distinct top-k, which is what routers produce).
  std::vector<int32_t> num_tokens_per_expert;
  std::vector<uint8_t> is_token_in_rank;  // [T, R]: 1 if the token goes to the rank
};

// topk_idx [num_tokens, topk], -1 = no expert. Requires 1 <= topk <= 32, 1 <= num_experts <= 1024,
// num_experts % num_ranks == 0, every id in [-1, num_experts).
DispatchLayout get_dispatch_layout(const std::vector<int64_t>& topk_idx, int64_t num_tokens, int topk,
                                   int num_experts, int num_ranks);
DispatchLayout get_dispatch_layout(const std::vector<int32_t>& topk_idx, int64_t num_tokens, int topk,
                                   int num_experts, int num_ranks);

// ---------------------------------------------------------------------------------------------------
// High-throughput (HT) dispatch and combine, all ranks at once.
//
// Dispatch: token t of rank s goes once to each distinct rank among its experts (an expert listed twice
// is one expert: it still sends one row). Rank d receives the rows ordered by source rank, then source
// token index. The received top-k ids are the local expert ids (e - d * E_local) where the expert is on
// d, else -1 with weight 0; every slot keeps its position (a duplicated expert keeps both slots).
// num_recv_tokens_per_expert[j] = received rows whose remapped top-k contains local expert j (once per
// row, however many slots name it), rounded up to a multiple of expert_alignment.
// ---------------------------------------------------------------------------------------------------

struct HtDispatchParams {
  int num_experts = 0;
  int topk = 0;              // K of topk_idx; 0 when no rank passes topk_idx
  int expert_alignment = 1;  // >= 1
};

struct HtDispatchInput {            // one rank's arguments
  TokenRows x;                      // [T, H]; T = x.rows may be 0
  std::vector<int64_t> topk_idx;    // [T, K]; empty: routing from is_token_in_rank only
  std::vector<float> topk_weights;  // [T, K] or empty (requires topk_idx)
  // [T, R] or empty (derived from topk_idx). When both are given they must agree.
  std::vector<uint8_t> is_token_in_rank;
};

// Everything combine (and cached dispatch) needs, for one rank: its receiving side and its sending side.
struct HtHandle {
  int rank = 0;
  int num_ranks = 0;
  int topk = 0;
  int64_t num_tokens = 0;  // T of this rank, as a source
  // Receiving side. Rows from source rank s are [rank_prefix[s], rank_prefix[s + 1]); N = rank_prefix[R].
  std::vector<int32_t> rank_prefix;     // [R + 1]
  std::vector<int32_t> recv_src_rank;   // [N]
  std::vector<int32_t> recv_src_token;  // [N]
  // Sending side: is_token_in_rank [T, R]; send_row [T, R] = the row of rank d's received tensor that
  // holds token t, -1 where the token does not go to d.
  std::vector<uint8_t> is_token_in_rank;
  std::vector<int32_t> send_row;

  int64_t num_recv() const { return rank_prefix.empty() ? 0 : rank_prefix.back(); }
};

struct HtDispatchOutput {                           // one receiving rank
  TokenRows x;                                      // [N, H], format of the input
  std::vector<int64_t> topk_idx;                    // [N, K] local ids or -1 (empty without topk_idx)
  std::vector<float> topk_weights;                  // [N, K] (empty without topk_weights)
  std::vector<int32_t> num_recv_tokens_per_expert;  // [E_local], padded (empty without topk_idx)
  HtHandle handle;
};

std::vector<HtDispatchOutput> ht_dispatch(const HtDispatchParams& params,
                                          const std::vector<HtDispatchInput>& inputs);

// Dispatch again along existing handles (DeepEP's cached dispatch; also combine's backward): rank d
// receives x[recv_src_rank[i]] row recv_src_token[i] as its row i. x[r] has handles[r].num_tokens rows.
std::vector<TokenRows> ht_dispatch_cached(const std::vector<HtHandle>& handles,
                                          const std::vector<TokenRows>& x);

// Combine: rank d passes its N_d expert-output rows (row i belongs to received row i), the received top-k
// weights when they are to be summed, and optionally up to two biases of its own T_d tokens.
struct HtCombineInput {
  std::vector<uint16_t> x;             // BF16 [N_d, H]
  std::vector<float> topk_weights;     // [N_d, K] with sum_topk_weights, else empty
  std::vector<uint16_t> bias0, bias1;  // BF16 [T_d, H] or empty
};

struct HtCombineOutput {            // one source rank s
  std::vector<uint16_t> x;          // BF16 [T_s, H]
  std::vector<float> topk_weights;  // [T_s, K] with sum_topk_weights, else empty
};

// out_s[t][h] = float_to_bf16(acc), with acc a float32 that starts at 0, adds float(y_d[row][h]) for every
// received row of (s, t), receiving rank d ascending, then adds bias0[t][h], then bias1[t][h]. A token that
// went nowhere gives the biases (or zeros). With sum_topk_weights (which needs a dispatch with topk_idx),
// every rank passes its received weights and topk_weights out [t][k] = float32 sum, same order, of the
// rows' weights [k]: as each expert lives on one rank, this restores the original weight of every valid
// slot, and gives 0 for -1 slots and for tokens that went nowhere (also where no rank received a row).
// Without it no rank passes weights and none come out. GPU kernels may sum in another order: compare with
// a tolerance.
std::vector<HtCombineOutput> ht_combine_explicit(const std::vector<HtHandle>& handles,
                                                 const std::vector<HtCombineInput>& inputs, int64_t hidden,
                                                 bool sum_topk_weights);
// Shorthand (and the Python binding's form): sum_topk_weights = some rank passes topk_weights. Where no
// rank received a row, every rank's weights are empty, so that group gets no weights out: callers that
// want the [T_s, K] zeros there say so with ht_combine_explicit.
std::vector<HtCombineOutput> ht_combine(const std::vector<HtHandle>& handles,
                                        const std::vector<HtCombineInput>& inputs, int64_t hidden);

// ---------------------------------------------------------------------------------------------------
// Low-latency (LL) dispatch and combine, all ranks at once.
//
// Capacity N = num_max_dispatch_tokens_per_rank; every rank's T <= N. Rank d receives, for each of its
// E_local experts, up to R * N rows: output x is [E_local, R * N, H] (row (j, slot) at j * R * N + slot).
// Token t of rank s goes once to each distinct expert among its top-k (a repeated expert sends one row;
// -1 sends nothing). Slot order, which the oracle fixes: for local expert j the rows are compacted at the
// front, by source rank, then by source token: source rank s's rows are [range_begin[j][s],
// range_begin[j][s] + range_count[j][s]) with range_begin[j][s] = sum of range_count[j][s'] for s' < s,
// and recv_count[j] = sum over s. So x[j][0 : recv_count[j]] is the valid prefix (what masked grouped
// GEMMs consume), as in DeepEP. A GPU kernel may order the source ranks' blocks and the tokens within a
// block differently (DeepEP does, with atomics); canonicalize_ll_recv maps such an output onto this order.
// Slots at and after recv_count[j] are poison: src_rank/src_token -1, BF16 0xFFFF, FP8 0xFF, float scales
// NaN, packed UE8M0 words 0xFFFFFFFF (all NaN patterns). Tests must compare valid slots only.
// FP8 (use_fp8): each row is cast by the per-128-channel cast above, with round_scale and use_ue8m0
// (which requires round_scale); scales are logically [E_local, R * N, H / 128] float32 or
// [E_local, R * N, ceil(H / 512)] packed int32. A GPU kernel may store them transposed (DeepEP stores
// [E_local, H / 128, R * N] with the slot dimension contiguous): compare through the logical layout.
// ---------------------------------------------------------------------------------------------------

struct LlDispatchParams {
  int num_experts = 0;
  int64_t hidden = 0;  // BF16 any > 0; FP8 a multiple of 128
  int topk = 0;
  int64_t num_max_dispatch_tokens_per_rank = 0;  // N >= 1
  bool use_fp8 = true;
  bool round_scale = false;
  bool use_ue8m0 = false;
};

struct LlDispatchInput {          // one rank
  int64_t num_tokens = 0;         // T <= N
  std::vector<uint16_t> x;        // BF16 [T, H]
  std::vector<int64_t> topk_idx;  // [T, K], -1 allowed
};

struct LlHandle {  // one rank: its receiving side, and what combine needs of it as a source
  int rank = 0;
  int num_ranks = 0;
  int num_experts = 0;
  int num_local_experts = 0;
  int topk = 0;
  int64_t capacity = 0;  // N
  int64_t hidden = 0;
  int64_t num_tokens = 0;            // T of this rank, as a source
  std::vector<int32_t> recv_count;   // [E_local]
  std::vector<int32_t> src_rank;     // [E_local, R * N], -1 on unused slots
  std::vector<int32_t> src_token;    // [E_local, R * N], -1 on unused slots
  std::vector<int32_t> range_begin;  // [E_local, R]
  std::vector<int32_t> range_count;  // [E_local, R]

  int64_t slots_per_expert() const { return num_ranks * capacity; }
};

struct LlDispatchOutput {  // one receiving rank
  TokenRows x;             // [E_local * R * N, H]: kBf16, kFp8 or kFp8Ue8m0
  LlHandle handle;
};

std::vector<LlDispatchOutput> ll_dispatch(const LlDispatchParams& params,
                                          const std::vector<LlDispatchInput>& inputs);

// Reorders a dispatch output whose source-rank blocks or in-block token order differ from the oracle's
// (e.g. a GPU result copied to the host, with src_rank/src_token/range/recv_count filled in) into the
// oracle's order, rows moving with their source info; unused slots become poison. Throws if the source
// info is inconsistent (a slot without a source, or a range outside R * N).
void canonicalize_ll_recv(LlDispatchOutput& recv);

// Combine: rank r passes the expert outputs of its slots and its own routing as a source.
struct LlCombineInput {
  std::vector<uint16_t> x;          // BF16 [E_local, R * N, H]; only valid slots are read
  std::vector<int64_t> topk_idx;    // [T_r, K], as passed to dispatch
  std::vector<float> topk_weights;  // [T_r, K]
};

// out_s[t][h] = float_to_bf16(acc), acc a float32 starting at 0 that, for k = 0 .. K-1 with
// topk_idx[t][k] != -1, adds topk_weights[t][k] * float(y[expert][slot of (s, t)][h]) (product rounded to
// float, then added; a repeated expert adds its row once per slot). A token with no expert gives zeros.
// Returns BF16 [T_s, H] per source rank. GPU kernels may fuse or reorder: compare with a tolerance.
std::vector<std::vector<uint16_t>> ll_combine(const std::vector<LlHandle>& handles,
                                              const std::vector<LlCombineInput>& inputs);

}  // namespace expertlink::reference
