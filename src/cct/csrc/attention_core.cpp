// The attention core of `cct.native`: softmax(s·q kᵀ) → inverted dropout at given positions → ·v, forward and
// backward, one (batch, head) pair at a time, so each pair's (N, N) maps stay in the core's cache.
//
// PyTorch's operators make a dozen passes over the (B·heads, N, N) maps of a layer (products, softmax, dropout,
// their gradients), each through main memory; for `cct_7_3x1_32` (N = 256, 4 heads, batch 128) one map is 134 MB
// and the passes, not the arithmetic, set the pace. Here each pair's maps (256 KB each at N = 256) are produced and consumed while
// they sit in L2: only the softmax output is written out (the backward needs it), and q, k, v and the
// gradients are read and written in place in the projection's (B, N, 3, heads, d) layout (no copies).
// Products go to the BLAS PyTorch links (`sgemm_`, column-major), one thread each; the pairs are shared
// among PyTorch's intra-op threads by `at::parallel_for`.
//
// The function is `cct.layers.Attention`'s core in training: the dropout zeroes the flat indices `positions`
// (sorted, row-major over (B·heads, N, N), as `cct.dropout_kernels.dropped_positions` draws them) and scales
// the rest by 1 / (1 - p), the same elements `FastDropout` would drop from the same draw.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// Column-major C = alpha · op(A) · op(B), as BLAS defines it. A row-major (r, c) matrix with row stride ld is a
// column-major (c, r) one with leading dimension ld, so each product below is written for the transposes.
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  const float beta = 0.0f;
  sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

// Rows are walked in vectors of 8 floats (GCC/Clang vector extensions: AVX's width, or two halves on narrower
// CPUs), four at a time into independent accumulators: the rows are short (N = 256) and sit in L1, so one
// accumulator would chain every maximum or sum on the one before it, and the compiler alone kept it so.
using vec = float __attribute__((vector_size(32)));
using ivec = int32_t __attribute__((vector_size(32)));
constexpr int64_t kWidth = 8, kStep = 4 * kWidth;

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

inline vec vmax(vec a, vec b) { return a > b ? a : b; }

inline float horizontal_sum(vec v) {
  float sum = 0.0f;
  for (int64_t u = 0; u < kWidth; ++u) sum += v[u];
  return sum;
}

// e^x for x <= 0 (scores minus their row's maximum): 2^n · e^r with |r| <= ln 2 / 2 and e^r by its degree-6 Taylor
// polynomial (relative error about 2^-22). For floats and vectors of them alike.
template <typename V, typename I>
inline V exp_nonpositive(V x) {
  x = x < -87.0f ? V{} - 87.0f : x;  // keeps 2^n a normal float
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // rounded to an integer by 1.5 · 2^23
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts, so r is exact
  V e = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  e = e * r + 1.0f / 24.0f;
  e = e * r + 1.0f / 6.0f;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  I bits;
  if constexpr (sizeof(V) == sizeof(float)) {
    bits = (static_cast<int32_t>(n) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(n, I) + 127) << 23;
  }
  V two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return e * two_n;
}

inline float row_max(const float* x, int64_t n) {
  float max = x[0];
  int64_t j = 0;
  if (n >= kStep) {
    vec m0 = load(x), m1 = load(x + kWidth), m2 = load(x + 2 * kWidth), m3 = load(x + 3 * kWidth);
    for (j = kStep; j + kStep <= n; j += kStep) {
      m0 = vmax(m0, load(x + j));
      m1 = vmax(m1, load(x + j + kWidth));
      m2 = vmax(m2, load(x + j + 2 * kWidth));
      m3 = vmax(m3, load(x + j + 3 * kWidth));
    }
    const vec m = vmax(vmax(m0, m1), vmax(m2, m3));
    for (int64_t u = 0; u < kWidth; ++u) max = std::max(max, m[u]);
  }
  for (; j < n; ++j) max = std::max(max, x[j]);
  return max;
}

// e = exp(x - max) (e may be x), returning the sum of e
inline float exp_row(const float* x, float max, float* e, int64_t n) {
  vec s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    const vec e0 = exp_nonpositive<vec, ivec>(load(x + j) - max);
    const vec e1 = exp_nonpositive<vec, ivec>(load(x + j + kWidth) - max);
    const vec e2 = exp_nonpositive<vec, ivec>(load(x + j + 2 * kWidth) - max);
    const vec e3 = exp_nonpositive<vec, ivec>(load(x + j + 3 * kWidth) - max);
    store(e + j, e0);
    store(e + j + kWidth, e1);
    store(e + j + 2 * kWidth, e2);
    store(e + j + 3 * kWidth, e3);
    s0 += e0;
    s1 += e1;
    s2 += e2;
    s3 += e3;
  }
  float sum = horizontal_sum((s0 + s1) + (s2 + s3));
  for (; j < n; ++j) {
    e[j] = exp_nonpositive<float, int32_t>(x[j] - max);
    sum += e[j];
  }
  return sum;
}

// the sum of x ⊙ y
inline float row_dot(const float* x, const float* y, int64_t n) {
  vec s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    s0 += load(x + j) * load(y + j);
    s1 += load(x + j + kWidth) * load(y + j + kWidth);
    s2 += load(x + j + 2 * kWidth) * load(y + j + 2 * kWidth);
    s3 += load(x + j + 3 * kWidth) * load(y + j + 3 * kWidth);
  }
  float sum = horizontal_sum((s0 + s1) + (s2 + s3));
  for (; j < n; ++j) sum += x[j] * y[j];
  return sum;
}

// y[i - first] = 0 for the dropped positions i in [lo, hi); any outside the map (a misuse) are left alone
inline void zero_at(float* y, const int64_t* lo, const int64_t* hi, int64_t first, int64_t size) {
  for (const int64_t* pos = lo; pos < hi; ++pos) {
    const uint64_t i = static_cast<uint64_t>(*pos - first);
    if (i < static_cast<uint64_t>(size)) y[i] = 0.0f;
  }
}

// attn = softmax of each row of scores (n, n), computed in place in `scores`; y = attn / (1 - p), zeros at the
// dropped positions [lo, hi), which index the map that starts at `first`
void softmax_drop(float* scores, float* attn, float* y, int64_t n, float keep_scale, const int64_t* lo,
                  const int64_t* hi, int64_t first) {
  for (int64_t r = 0; r < n; ++r) {
    float* s = scores + r * n;
    const float inv = 1.0f / exp_row(s, row_max(s, n), s, n);
    float* a = attn + r * n;
    float* yr = y + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      a[j] = s[j] * inv;
      yr[j] = a[j] * keep_scale;
    }
  }
  zero_at(y, lo, hi, first, n * n);
}

// y = attn / (1 - p) with zeros at the dropped positions [lo, hi), which index the map that starts at `first`
void drop(const float* attn, float* y, int64_t size, float keep_scale, const int64_t* lo, const int64_t* hi,
          int64_t first) {
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) y[i] = attn[i] * keep_scale;
  zero_at(y, lo, hi, first, size);
}

struct Shape {
  int64_t B, N, C, heads, d, Hd;  // qkv is (B, N, C) with C = 3·Hd, Hd = heads·d
};

Shape check(const torch::Tensor& qkv, int64_t heads, const torch::Tensor& positions) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == torch::kFloat && qkv.is_contiguous() && qkv.is_cpu(),
              "qkv must be a contiguous float32 CPU tensor (B, N, 3·heads·d)");
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0, "qkv's last dimension must be 3·heads·d");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == torch::kLong && positions.is_contiguous() &&
                  positions.is_cpu(),
              "positions must be a contiguous int64 CPU vector");
  const int64_t d = qkv.size(2) / (3 * heads);
  TORCH_CHECK(qkv.size(1) > 0 && d > 0, "qkv must have at least one token and one channel per head");
  return {qkv.size(0), qkv.size(1), qkv.size(2), heads, d, heads * d};
}

// The dropped positions of the map (b·heads + h): the range of the sorted `positions` inside it
std::pair<const int64_t*, const int64_t*> positions_of(const torch::Tensor& positions, int64_t first, int64_t size) {
  const int64_t* begin = positions.data_ptr<int64_t>();
  const int64_t* end = begin + positions.numel();
  const int64_t* lo = std::lower_bound(begin, end, first);
  return {lo, std::lower_bound(lo, end, first + size)};
}

}  // namespace

// (out (B, N, heads·d), attn (B·heads, N, N)): attn is the softmax, saved for the backward
std::vector<torch::Tensor> attention_core_forward(const torch::Tensor& qkv, int64_t heads, double scale, double p,
                                                  const torch::Tensor& positions) {
  const Shape s = check(qkv, heads, positions);
  const int64_t NN = s.N * s.N;
  auto out = torch::empty({s.B, s.N, s.Hd}, qkv.options());
  auto attn = torch::empty({s.B * heads, s.N, s.N}, qkv.options());
  const float* base = qkv.data_ptr<float>();
  float* out_base = out.data_ptr<float>();
  float* attn_base = attn.data_ptr<float>();
  const float keep_scale = 1.0f / (1.0f - static_cast<float>(p));
  at::parallel_for(0, s.B * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(NN), y(NN);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* q = base + b * s.N * s.C + h * s.d;  // (N, d), rows s.C apart
      const float* k = q + s.Hd;
      const float* v = q + 2 * s.Hd;
      float* a = attn_base + bh * NN;
      gemm('T', 'N', s.N, s.N, s.d, static_cast<float>(scale), k, s.C, q, s.C, scores.data(), s.N);  // s·q kᵀ
      const auto [lo, hi] = positions_of(positions, bh * NN, NN);
      softmax_drop(scores.data(), a, y.data(), s.N, keep_scale, lo, hi, bh * NN);
      gemm('N', 'N', s.d, s.N, s.N, 1.0f, v, s.C, y.data(), s.N, out_base + b * s.N * s.Hd + h * s.d, s.Hd);  // y v
    }
  });
  return {out, attn};
}

// d qkv (B, N, 3·heads·d) from d out (B, N, heads·d)
torch::Tensor attention_core_backward(const torch::Tensor& grad, const torch::Tensor& qkv, const torch::Tensor& attn,
                                      int64_t heads, double scale, double p, const torch::Tensor& positions) {
  const Shape s = check(qkv, heads, positions);
  const int64_t NN = s.N * s.N;
  TORCH_CHECK(grad.is_contiguous() && grad.is_cpu() && grad.scalar_type() == torch::kFloat &&
                  grad.numel() == s.B * s.N * s.Hd,
              "grad must be a contiguous float32 CPU tensor (B, N, heads·d)");
  TORCH_CHECK(attn.is_contiguous() && attn.is_cpu() && attn.scalar_type() == torch::kFloat &&
                  attn.numel() == s.B * heads * NN,
              "attn must be the forward's contiguous (B·heads, N, N)");
  auto dqkv = torch::empty_like(qkv);
  const float* base = qkv.data_ptr<float>();
  const float* grad_base = grad.data_ptr<float>();
  const float* attn_base = attn.data_ptr<float>();
  float* dbase = dqkv.data_ptr<float>();
  const float keep_scale = 1.0f / (1.0f - static_cast<float>(p));
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, s.B * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(NN), dy(NN);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* q = base + b * s.N * s.C + h * s.d;
      const float* k = q + s.Hd;
      const float* v = q + 2 * s.Hd;
      const float* dout = grad_base + b * s.N * s.Hd + h * s.d;  // (N, d), rows s.Hd apart
      float* dq = dbase + b * s.N * s.C + h * s.d;
      float* dk = dq + s.Hd;
      float* dv = dq + 2 * s.Hd;
      const float* a = attn_base + bh * NN;
      const auto [lo, hi] = positions_of(positions, bh * NN, NN);
      drop(a, y.data(), NN, keep_scale, lo, hi, bh * NN);
      gemm('N', 'T', s.d, s.N, s.N, 1.0f, dout, s.Hd, y.data(), s.N, dv, s.C);  // dv = yᵀ dout
      gemm('T', 'N', s.N, s.N, s.d, 1.0f, v, s.C, dout, s.Hd, dy.data(), s.N);  // dy = dout vᵀ
      // d scores = y ⊙ dy − attn ⊙ rowsum(y ⊙ dy): softmax's and dropout's gradients together
      for (int64_t r = 0; r < s.N; ++r) {
        float* dyr = dy.data() + r * s.N;
        const float* yr = y.data() + r * s.N;
        const float* ar = a + r * s.N;
        const float dot = row_dot(yr, dyr, s.N);
#pragma omp simd
        for (int64_t j = 0; j < s.N; ++j) dyr[j] = yr[j] * dyr[j] - ar[j] * dot;
      }
      gemm('N', 'N', s.d, s.N, s.N, fscale, k, s.C, dy.data(), s.N, dq, s.C);  // dq = s · dS k
      gemm('N', 'T', s.d, s.N, s.N, fscale, q, s.C, dy.data(), s.N, dk, s.C);  // dk = s · dSᵀ q
    }
  });
  return dqkv;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while they compute: other Python threads (a progress monitor) keep running
  m.def("attention_core_forward", &attention_core_forward, py::call_guard<py::gil_scoped_release>());
  m.def("attention_core_backward", &attention_core_backward, py::call_guard<py::gil_scoped_release>());
}
