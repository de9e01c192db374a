// Paged decode attention on the CPU: one new token per sequence against its cached keys and
// values, read in place from the paged cache (no gather into a padded context).
//
// Shape legend (shared/DESIGN.md) plus: S sequences, H query heads, Hkv key/value heads,
// G = H / Hkv, D head dim (keys and values alike), B tokens per block, W block-table width.
//
//   q            [S, H, D]          fp32, contiguous; the query of sequence s sits at position seq_lens[s] - 1
//   key_cache    [N, B, Hkv, D]     fp32, contiguous
//   value_cache  [N, B, Hkv, D]     fp32, contiguous
//   block_tables [S, W]             int64; position p of sequence s is in block block_tables[s, p / B]
//   seq_lens     [S]                int64, >= 1
//   -> out       [S, H, D]
//
// Each (sequence, KV head) is one task (at::parallel_for): its G query heads are scored against
// every visible key (positions > pos - window when window > 0), softmaxed in fp32, and the values
// summed with those weights, so each key and value row is read once for all G heads. Built with
// -ffast-math: sums are reassociated (results differ from the torch path in the last bits).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Task {
  const float* q;          // [G, D] this task's query heads
  const float* keys;       // key_cache base
  const float* values;     // value_cache base
  const int64_t* table;    // [W] this sequence's block table
  int64_t block_size, kv_heads, head, lo, hi;  // keys [lo, hi)
  float scale;
  float* scores;           // [G, hi - lo] scratch
  float* out;              // [G, D]
};

inline int64_t row(const Task& t, int64_t pos) {
  return (t.table[pos / t.block_size] * t.block_size + pos % t.block_size) * t.kv_heads + t.head;
}

// D and G known at compile time (the common shapes): the query heads and the accumulators stay
// in registers and the loops over D vectorise.
template <int D, int G>
void attend_fixed(const Task& t) {
  const int64_t n = t.hi - t.lo;
  float q[G][D];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < D; ++j) q[g][j] = t.q[g * D + j] * t.scale;
  float m[G];
  for (int g = 0; g < G; ++g) m[g] = std::numeric_limits<float>::lowest();
  for (int64_t l = 0; l < n; ++l) {
    const float* k = t.keys + row(t, t.lo + l) * D;
    for (int g = 0; g < G; ++g) {
      float s = 0;
      for (int j = 0; j < D; ++j) s += q[g][j] * k[j];
      t.scores[g * n + l] = s;
      m[g] = std::max(m[g], s);
    }
  }
  float total[G];
  for (int g = 0; g < G; ++g) {
    float* sg = t.scores + g * n;
    float sum = 0;
    for (int64_t l = 0; l < n; ++l) {
      sg[l] = std::exp(sg[l] - m[g]);
      sum += sg[l];
    }
    total[g] = sum;
  }
  float acc[G][D] = {};
  for (int64_t l = 0; l < n; ++l) {
    const float* v = t.values + row(t, t.lo + l) * D;
    for (int g = 0; g < G; ++g) {
      const float p = t.scores[g * n + l];
      for (int j = 0; j < D; ++j) acc[g][j] += p * v[j];
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = 1.0f / total[g];
    for (int j = 0; j < D; ++j) t.out[g * D + j] = acc[g][j] * inv;
  }
}

// Any D and G: the same computation with runtime bounds.
void attend_any(const Task& t, int64_t D, int64_t G, float* acc) {
  const int64_t n = t.hi - t.lo;
  for (int64_t l = 0; l < n; ++l) {
    const float* k = t.keys + row(t, t.lo + l) * D;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0;
      for (int64_t j = 0; j < D; ++j) s += t.q[g * D + j] * k[j];
      t.scores[g * n + l] = s * t.scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = t.scores + g * n;
    const float m = *std::max_element(sg, sg + n);
    float sum = 0;
    for (int64_t l = 0; l < n; ++l) {
      sg[l] = std::exp(sg[l] - m);
      sum += sg[l];
    }
    const float inv = 1.0f / sum;
    for (int64_t l = 0; l < n; ++l) sg[l] *= inv;
  }
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t l = 0; l < n; ++l) {
    const float* v = t.values + row(t, t.lo + l) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = t.scores[g * n + l];
      for (int64_t j = 0; j < D; ++j) acc[g * D + j] += p * v[j];
    }
  }
  std::copy(acc, acc + G * D, t.out);
}

using Fixed = void (*)(const Task&);

Fixed fixed_for(int64_t D, int64_t G) {
#define MOESERVE_FIXED(d, g) \
  if (D == d && G == g) return &attend_fixed<d, g>;
  MOESERVE_FIXED(64, 1) MOESERVE_FIXED(64, 2) MOESERVE_FIXED(64, 4) MOESERVE_FIXED(64, 8)
  MOESERVE_FIXED(128, 1) MOESERVE_FIXED(128, 2) MOESERVE_FIXED(128, 4) MOESERVE_FIXED(128, 8)
#undef MOESERVE_FIXED
  return nullptr;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            int64_t window) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "decode_attention: q [S, H, D], caches [N, B, Hkv, D] of one shape");
  TORCH_CHECK(q.scalar_type() == at::kFloat && key_cache.scalar_type() == at::kFloat &&
                  value_cache.scalar_type() == at::kFloat,
              "decode_attention: fp32 only");
  TORCH_CHECK(q.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous(),
              "decode_attention: contiguous tensors only");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "decode_attention: int64 block tables and lengths");
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t B = key_cache.size(1), Hkv = key_cache.size(2), W = block_tables.size(1);
  TORCH_CHECK(key_cache.size(3) == D && H % Hkv == 0 && block_tables.size(0) == S && seq_lens.size(0) == S,
              "decode_attention: shapes disagree");
  const int64_t G = H / Hkv;
  auto out = at::empty({S, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = key_cache.data_ptr<float>();
  const float* vp = value_cache.data_ptr<float>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t N = key_cache.size(0);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lp[s] >= 1 && (lp[s] + B - 1) / B <= W, "decode_attention: a sequence's blocks exceed its table");
    for (int64_t b = 0; b < (lp[s] + B - 1) / B; ++b)
      TORCH_CHECK(tp[s * W + b] >= 0 && tp[s * W + b] < N, "decode_attention: block id out of range");
  }
  const Fixed fixed = fixed_for(D, G);
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(fixed ? 0 : G * D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i / Hkv, h = i % Hkv, L = lp[s];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, L - window) : 0;
      scores.resize(G * (L - lo));
      const Task t{qp + (s * H + h * G) * D, kp, vp, tp + s * W, B, Hkv, h, lo, L,
                   static_cast<float>(scale), scores.data(), op + (s * H + h * G) * D};
      if (fixed)
        fixed(t);
      else
        attend_any(t, D, G, acc.data());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(moeserve_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeserve_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
