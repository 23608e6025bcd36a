// Shared pieces of the CPU kernels: conv geometry, layout, vectorisable math, the dendrite
// epilogue on one line of outputs, and deterministic chunked reductions.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pbp {

#define PBP_INLINE inline __attribute__((always_inline))

struct Geom {
  int64_t N, Cin, H, W, Cout, Ho, Wo, KH, KW, SH, SW, PH, PW, DH, DW, groups;
  bool channels_last;
  int64_t HW() const { return Ho * Wo; }
};

// NHWC when channels_last-contiguous and not also NCHW-contiguous (same rule as pbp_fast/ops/layout.py).
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

inline at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline Geom make_geom(const at::Tensor& x, const at::Tensor& d_weight, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && d_weight.dim() == 5, "pbp_fast: x must be 4-D, d_weight 5-D");
  Geom g;
  g.N = x.size(0); g.Cin = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.Cout = d_weight.size(1); g.KH = d_weight.size(3); g.KW = d_weight.size(4);
  g.SH = stride[0]; g.SW = stride[1]; g.PH = padding[0]; g.PW = padding[1];
  g.DH = dilation[0]; g.DW = dilation[1]; g.groups = groups;
  g.Ho = (g.H + 2 * g.PH - g.DH * (g.KH - 1) - 1) / g.SH + 1;
  g.Wo = (g.W + 2 * g.PW - g.DW * (g.KW - 1) - 1) / g.SW + 1;
  g.channels_last = is_channels_last(x);
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "pbp_fast: empty output");
  return g;
}

// ---------------------------------------------------------------- 1x1 convs as GEMMs
// A 1x1 conv with stride 1, no padding and groups 1: a GEMM per sample in NCHW (batched), one
// over all pixel rows in NHWC or when Ho * Wo == 1 (a Linear), where both layouts are the
// (pixels, channels) matrix.
inline bool is_pointwise(const Geom& g) {
  return g.KH == 1 && g.KW == 1 && g.SH == 1 && g.SW == 1 && g.PH == 0 && g.PW == 0 &&
         g.groups == 1;
}

inline bool pw_rows(const Geom& g) { return g.channels_last || g.HW() == 1; }

// (pixels, C) rows of an (N, C, Ho, Wo) tensor when pw_rows(g).
inline at::Tensor pw_matrix(const Geom& g, const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).reshape({g.N * g.HW(), t.size(1)});
}

// y = conv(x; weight, bias) (bias may be undefined), in the layout of x.
inline at::Tensor pw_conv(const Geom& g, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& bias) {
  const auto w2 = weight.reshape({g.Cout, g.Cin});
  if (!pw_rows(g)) {
    auto y = at::matmul(w2, x.reshape({g.N, g.Cin, g.HW()}));
    if (bias.defined()) y.add_(bias.view({1, -1, 1}));
    return y.view({g.N, g.Cout, g.Ho, g.Wo});
  }
  const auto xm = pw_matrix(g, x);
  return (bias.defined() ? at::addmm(bias, xm, w2.t()) : xm.mm(w2.t()))
      .view({g.N, g.Ho, g.Wo, g.Cout}).permute({0, 3, 1, 2});
}

// dL/dx from dL/dy.
inline at::Tensor pw_grad_input(const Geom& g, const at::Tensor& gy, const at::Tensor& weight) {
  const auto w2 = weight.reshape({g.Cout, g.Cin});
  if (!pw_rows(g))
    return at::matmul(w2.t(), gy.reshape({g.N, g.Cout, g.HW()})).view({g.N, g.Cin, g.H, g.W});
  return pw_matrix(g, gy).mm(w2).view({g.N, g.H, g.W, g.Cin}).permute({0, 3, 1, 2});
}

// sum over pixels of gy (N, M, Ho, Wo) x x^T: (M, Cin).
inline at::Tensor pw_grad_weight(const Geom& g, const at::Tensor& gy, const at::Tensor& x) {
  if (!pw_rows(g))
    return at::bmm(gy.reshape({g.N, gy.size(1), g.HW()}),
                   x.reshape({g.N, g.Cin, g.HW()}).transpose(1, 2)).sum(0);
  return pw_matrix(g, gy).t().mm(pw_matrix(g, x));
}

inline bool is_depthwise(const Geom& g) { return g.groups == g.Cin && g.Cout == g.Cin; }

// Whether the epilogues run lines of Cout contiguous outputs, one per pixel: in channels_last,
// and on 1x1 maps, where an (N, C, 1, 1) tensor is (N, C) in both layouts.
inline bool channel_lines(const Geom& g) { return g.channels_last || g.HW() == 1; }

// The stacked (D, N, C, Ho, Wo) activations with every slice in the layout of y.
inline at::Tensor empty_stacked(int64_t D, const Geom& g, const at::TensorOptions& opt) {
  if (g.channels_last)
    return at::empty({D, g.N, g.Ho, g.Wo, g.Cout}, opt).permute({0, 1, 4, 2, 3});
  return at::empty({D, g.N, g.Cout, g.Ho, g.Wo}, opt);
}

// A 32-byte vector of T (GCC/Clang vector extension; one AVX register, two SSE ones): kernels
// keep small arrays of these in registers where the compiler spills the equivalent scalars.
template <typename T>
struct Simd {
  static constexpr int64_t W = 32 / sizeof(T);
  typedef T V __attribute__((vector_size(32)));
#if defined(__AVX__)  // explicit unaligned moves: GCC lowers a memcpy of an array of vectors
                      // in a loop to 16-byte copies through the stack
  static PBP_INLINE V load(const T* p) {
    if constexpr (std::is_same_v<T, float>) return (V)_mm256_loadu_ps(p);
    else return (V)_mm256_loadu_pd(p);
  }
  static PBP_INLINE void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, float>) _mm256_storeu_ps(p, (__m256)v);
    else _mm256_storeu_pd(p, (__m256d)v);
  }
#else
  static PBP_INLINE V load(const T* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static PBP_INLINE void store(T* p, const V& v) { std::memcpy(p, &v, sizeof v); }
#endif
  static PBP_INLINE V splat(T s) {  // every lane s, one broadcast instruction
#if defined(__AVX__)
    if constexpr (std::is_same_v<T, float>) return (V)_mm256_set1_ps(s);
    else return (V)_mm256_set1_pd(s);
#else
    return V{} + s;  // an addition (-0.0 + 0.0 is not -0.0) besides the broadcast
#endif
  }
};

// ---------------------------------------------------------------- row-group GEMM (1x1, NHWC)
// out = bias + x w^T for a group of kGemmRows rows of x (pixels, K contiguous channels) and all
// N columns, in registers: for the 1x1 units' few input channels (K of 16 to 576) a library
// GEMM per tile repacks both operands at every call and goes through a tile in L2, where this
// packs w once per op call and leaves each group's outputs in L1 for the epilogue.

// w (N, K) and bias (N) packed in panels of kPanel = 2 vectors of columns: panel p holds, for
// k = 0 .. K - 1, w[p * kPanel + i][k] for i < kPanel (zeros past N), then bias likewise.
template <typename T>
struct PackedCols {
  static constexpr int64_t kPanel = 2 * Simd<T>::W;
  int64_t K = 0, N = 0, NP = 0;  // NP: N rounded up to whole panels (the row stride of out)
  std::vector<T> w, bias;
  PackedCols(const T* w_, const T* bias_, int64_t N_, int64_t K_)
      : K(K_), N(N_), NP((N_ + kPanel - 1) / kPanel * kPanel), w(NP * K_), bias(NP, T(0)) {
    for (int64_t j = 0; j < N && bias_; ++j) bias[j] = bias_[j];
    // panel by panel, written in order (kPanel rows of w read side by side)
    at::parallel_for(0, NP / kPanel, std::max<int64_t>(1, 4096 / (K * kPanel)),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        T* out = w.data() + p * K * kPanel;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t i = 0; i < kPanel; ++i) {
            const int64_t j = p * kPanel + i;
            out[k * kPanel + i] = j < N ? w_[j * K + k] : T(0);
          }
      }
    });
  }
};

constexpr int64_t kGemmRows = 6;  // 6 rows x 2 vectors: 12 accumulators of 16 vector registers

// out[r * NP + j] = bias[j] + sum_k x[r * K + k] * w[j][k] for r < kGemmRows, the NP columns of
// panels [p0, p1) (j from p0 * kPanel).
template <typename T>
PBP_INLINE void gemm_rows(const PackedCols<T>& b, const T* x, int64_t p0, int64_t p1, T* out) {
  using S = Simd<T>;
  constexpr int64_t R = kGemmRows, P = PackedCols<T>::kPanel;
  const int64_t K = b.K;
  for (int64_t p = p0 * P; p < p1 * P; p += P) {
    const T* wp = b.w.data() + p * K;
    typename S::V acc[R][2];
    const auto b0 = S::load(b.bias.data() + p), b1 = S::load(b.bias.data() + p + S::W);
    for (int64_t r = 0; r < R; ++r) { acc[r][0] = b0; acc[r][1] = b1; }
    for (int64_t k = 0; k < K; ++k) {
      const auto w0 = S::load(wp + k * P), w1 = S::load(wp + k * P + S::W);
      for (int64_t r = 0; r < R; ++r) {
        const auto xv = S::splat(x[r * K + k]);
        acc[r][0] += xv * w0;
        acc[r][1] += xv * w1;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      S::store(out + r * b.NP + p, acc[r][0]);
      S::store(out + r * b.NP + p + S::W, acc[r][1]);
    }
  }
}

// The same for `groups` consecutive groups of kGemmRows rows (x and out advance by whole
// groups), panel by panel in slices of about 16 KB of packed w, so that a slice stays in L1
// while it meets every group.
template <typename T>
PBP_INLINE void gemm_groups(const PackedCols<T>& b, const T* x, int64_t groups, T* out) {
  constexpr int64_t R = kGemmRows, P = PackedCols<T>::kPanel;
  const int64_t panels = b.NP / P;
  const int64_t step = std::max<int64_t>(1, (16384 / int64_t(sizeof(T))) / (b.K * P));
  for (int64_t q = 0; q < panels; q += step)
    for (int64_t gi = 0; gi < groups; ++gi)
      gemm_rows(b, x + gi * R * b.K, q, std::min(panels, q + step), out + gi * R * b.NP);
}

// 2^n for an integral n in [-126, 127] held as a float (or a vector of them): its exponent bits.
PBP_INLINE float pow2(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale;
}
PBP_INLINE Simd<float>::V pow2(Simd<float>::V n) {
  typedef int32_t I __attribute__((vector_size(32)));
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  Simd<float>::V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale;
}

// lane-wise max(lo, x) and min(hi, x) that keep a NaN x (the ternary's semantics; one
// instruction each where the target has them).
PBP_INLINE float clamp_lo(float lo, float x) { return x < lo ? lo : x; }
PBP_INLINE float clamp_hi(float hi, float x) { return x > hi ? hi : x; }
PBP_INLINE Simd<float>::V clamp_lo(Simd<float>::V lo, Simd<float>::V x) {
#if defined(__AVX__)
  return (Simd<float>::V)_mm256_max_ps((__m256)lo, (__m256)x);  // x if either is NaN
#else
  return x < lo ? lo : x;
#endif
}
PBP_INLINE Simd<float>::V clamp_hi(Simd<float>::V hi, Simd<float>::V x) {
#if defined(__AVX__)
  return (Simd<float>::V)_mm256_min_ps((__m256)hi, (__m256)x);
#else
  return x > hi ? hi : x;
#endif
}

// exp of a float, or of a vector of floats lane by lane: 2^n * p(r) with |r| <= ln2 / 2 and p
// the degree-6 Taylor polynomial (truncation r^7 / 7! < 1.3e-7 relative, about one float ulp)
// on the clamped range (NaN stays NaN).
template <typename F>  // float or Simd<float>::V
PBP_INLINE F fast_exp(F x) {
  x = clamp_lo(F{} - 87.0f, x);
  x = clamp_hi(F{} + 88.0f, x);
  const F t = x * 1.44269504088896341f;
  const F n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const F r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  F p = F{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * pow2(n);
}
PBP_INLINE double fast_exp(double x) { return std::exp(x); }
template <typename T>  // float, double or Simd<float>::V
PBP_INLINE T sigmoid(T a) { return 1 / (1 + fast_exp(-a)); }

// out[i] = sigmoid(in[i]) (in may be out): whole vectors explicitly (the compiler's own
// vectorisation of the scalar loop depends on the surrounding code), then the tail.
template <typename T>
PBP_INLINE void sigmoid_line(int64_t L, const T* in, T* out) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    using S = Simd<float>;
    for (; i + S::W <= L; i += S::W) S::store(out + i, sigmoid(S::load(in + i)));
  }
  for (; i < L; ++i) out[i] = sigmoid(in[i]);
}

// Per-line parameter access: along a line the channel is fixed (NCHW, scalar) or varies with
// the position (NHWC, the line runs over channels c0, c0 + 1, ...).
template <bool CH_INNER, typename T>
PBP_INLINE T param(const T* p, int64_t i) { return CH_INNER ? p[i] : p[0]; }

// The forward epilogue on one line of L outputs. a[k] are the dendrite pre-activations (without
// cascade; may alias s[k]); s[k] receives the activations; y = base + main + sum alpha_k s_k
// (y may alias base). alpha = d_scale + c0, casc = d_cascade + c0 (strides Cout per k, D * Cout
// per row). One pass over the line per dendrite (the first also adds base and main), each with
// float vectors in registers, then the tail: the sigmoids of one pass are independent of each
// other, where one pass for all dendrites would chain each vector's D sigmoids.
template <bool CH_INNER, typename T>
PBP_INLINE void fwd_line(int64_t L, int64_t D, int64_t Cout, const T* base, const T* main,
                         const T* const* a, const T* alpha, const T* casc, T* y, T* const* s) {
  int64_t i = 0;
  // one output (U = T) or one vector of them (U = Simd<float>::V) at position i
  auto at = [&](auto u, const T* p) {
    using U = decltype(u);
    if constexpr (std::is_same_v<U, T>) return p[i];
    else return Simd<float>::load(p + i);
  };
  auto par = [&](auto u, const T* p) {  // a per-channel parameter
    using U = decltype(u);
    if constexpr (CH_INNER) return at(u, p);
    else return U{} + p[0];
  };
  auto put = [&](T* p, auto v) {
    if constexpr (std::is_same_v<decltype(v), T>) p[i] = v;
    else Simd<float>::store(p + i, v);
  };
  auto step = [&](auto u, int64_t k) {  // dendrite k (the first pass: also base and main)
    using U = decltype(u);
    U yv = k ? at(u, y) : base ? at(u, base) : U{};
    if (!k && main) yv += at(u, main);
    if (k < D) {
      U av = at(u, a[k]);
      for (int64_t j = 0; j < k; ++j) av += par(u, casc + (k * D + j) * Cout) * at(u, s[j]);
      const U sv = sigmoid(av);
      put(s[k], sv);
      yv += par(u, alpha + k * Cout) * sv;
    }
    put(y, yv);
  };
  for (int64_t k = 0; k < std::max<int64_t>(D, 1); ++k) {
    i = 0;
    if constexpr (std::is_same_v<T, float>)
      for (; i + Simd<float>::W <= L; i += Simd<float>::W) step(Simd<float>::V{}, k);
    for (; i < L; ++i) step(T{}, k);
  }
}

// Accumulator layout of the backward's per-channel sums (float64, Cout each):
// [grad_bias | grad_alpha (D) | grad_d_bias (D) | grad_cascade (D * D)], then kernel sums.
struct BwdAcc {
  int64_t D, Cout;
  int64_t bias() const { return 0; }
  int64_t alpha(int64_t k) const { return (1 + k) * Cout; }
  int64_t dbias(int64_t k) const { return (1 + D + k) * Cout; }
  int64_t casc(int64_t k, int64_t j) const { return (1 + 2 * D + k * D + j) * Cout; }
  int64_t size() const { return (1 + 2 * D + D * D) * Cout; }
};

// sum_i u[i] * w[i * ws] (w null: sum_i u[i]) with 16 independent partial sums, so the compiler
// vectorises it (it does not reassociate float additions by itself).
template <typename T>
PBP_INLINE T dot(int64_t L, const T* u, const T* w, int64_t ws = 1) {
  constexpr int64_t V = 16;
  T part[V] = {};
  int64_t i = 0;
  if (!w)
    for (; i + V <= L; i += V)
      for (int64_t v = 0; v < V; ++v) part[v] += u[i + v];
  else if (ws == 1)
    for (; i + V <= L; i += V)
      for (int64_t v = 0; v < V; ++v) part[v] += u[i + v] * w[i + v];
  T sum = 0;
  for (; i < L; ++i) sum += w ? u[i] * w[i * ws] : u[i];
  for (int64_t v = 0; v < V; ++v) sum += part[v];
  return sum;
}

template <bool CH_INNER, typename T, typename A>
PBP_INLINE void acc_add(A* acc, int64_t L, const T* u, const T* w) {
  // acc (+c0 already applied) += sum over the line of u * w (w may be null: plain sum); A is
  // float64, or T for a short run of partial sums that the caller adds into float64.
  if (CH_INNER) {
    if (w) for (int64_t i = 0; i < L; ++i) acc[i] += A(u[i] * w[i]);
    else   for (int64_t i = 0; i < L; ++i) acc[i] += A(u[i]);
  } else {
    acc[0] += A(dot(L, u, w));
  }
}

// NHWC kernels sum this many lines (pixels) in T before they go to float64.
constexpr int64_t kRun = 32;

// Partial sums of a run of lines in T, added into the float64 accumulator by flush(): the
// per-element float64 conversions of a line-by-line accumulation cost more than the math.
template <typename T>
struct Partial {
  std::vector<T> v;
  explicit Partial(int64_t size) : v(size, T(0)) {}
  T* data() { return v.data(); }
  void flush(double* acc) {
    for (size_t i = 0; i < v.size(); ++i) acc[i] += double(v[i]);
    std::fill(v.begin(), v.end(), T(0));
  }
};

// The backward epilogue on one line: from g = dL/dy and the activations s, accumulate the
// per-channel sums of BwdAcc (acc already offset by c0) and, when need_da, write
// da[k] = dL/da_k = (g alpha_k + sum_{m>k} da_m kappa_{m,k}) s_k (1 - s_k).
template <bool CH_INNER, typename T, typename A>
PBP_INLINE void bwd_line(int64_t L, int64_t D, int64_t Cout, const T* gy, const T* const* s,
                         const T* alpha, const T* casc, bool need_bias, bool need_alpha,
                         bool need_da, T* const* da, A* acc, const BwdAcc& ix) {
  if (need_bias) acc_add<CH_INNER>(acc + ix.bias(), L, gy, (const T*)nullptr);
  if (need_alpha)
    for (int64_t k = 0; k < D; ++k) acc_add<CH_INNER>(acc + ix.alpha(k), L, gy, s[k]);
  if (!need_da) return;
  for (int64_t k = D - 1; k >= 0; --k) {
    T* dk = da[k];
    const T* al = alpha + k * Cout;
    for (int64_t i = 0; i < L; ++i) dk[i] = gy[i] * param<CH_INNER>(al, i);
    for (int64_t m = k + 1; m < D; ++m) {
      const T* kap = casc + (m * D + k) * Cout;
      const T* dm = da[m];
      for (int64_t i = 0; i < L; ++i) dk[i] += dm[i] * param<CH_INNER>(kap, i);
    }
    const T* sk = s[k];
    for (int64_t i = 0; i < L; ++i) dk[i] *= sk[i] * (T(1) - sk[i]);
    acc_add<CH_INNER>(acc + ix.dbias(k), L, dk, (const T*)nullptr);
    for (int64_t j = 0; j < k; ++j) acc_add<CH_INNER>(acc + ix.casc(k, j), L, dk, s[j]);
  }
}

// Deterministic parallel reduction: items [0, n) are cut into a fixed number of chunks (not
// depending on the thread count), each chunk sums into its own float64 buffer of `size`, and
// the buffers are added in chunk order. An item covers `pixels` output pixels, each of which
// updates about the whole buffer once; zeroing and adding back a chunk's buffer costs about
// as much, so a chunk gets at least 128 pixels (a 1x1 map: one chunk, not 32 of one pixel
// each), and there are at most 64 chunks.
template <typename F>
std::vector<double> chunked_sum(int64_t n, int64_t size, int64_t pixels, const F& body) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({n, 64, n * pixels / 128}));
  std::vector<double> bufs(chunks * size, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      body(n * c / chunks, n * (c + 1) / chunks, bufs.data() + c * size);
  });
  std::vector<double> out(size, 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < size; ++i) out[i] += bufs[c * size + i];
  return out;
}

// The valid output range [lo, hi) for one kernel tap along one axis: 0 <= o*s + off < in.
inline void tap_range(int64_t out, int64_t in, int64_t s, int64_t off, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  hi = off >= in ? 0 : std::min(out, (in - 1 - off) / s + 1);
  if (hi < lo) hi = lo;
}

// NCHW depthwise, one output row `oh` of one plane: calls f(tap, i, xo, lo, hi) for every kernel
// tap whose input row lies inside the image; output columns [lo, hi) read xo[ow * SW] and the
// tap's input row is i (0 <= i < H).
template <typename T, typename F>
PBP_INLINE void for_row_taps(const Geom& g, int64_t oh, const T* plane, const F& f) {
  for (int64_t i = 0; i < g.KH; ++i) {
    const int64_t ih = oh * g.SH - g.PH + i * g.DH;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t j = 0; j < g.KW; ++j) {
      int64_t lo, hi, off = j * g.DW - g.PW;
      tap_range(g.Wo, g.W, g.SW, off, lo, hi);
      f(i * g.KW + j, ih, plane + ih * g.W + off, lo, hi);
    }
  }
}

// NHWC depthwise, one output pixel (n, oh, ow): calls f(tap, xo) for every kernel tap whose
// input pixel lies inside the image; xo is the offset of that pixel's channel row in x.
template <typename F>
PBP_INLINE void for_pixel_taps(const Geom& g, int64_t n, int64_t oh, int64_t ow, const F& f) {
  for (int64_t i = 0; i < g.KH; ++i) {
    const int64_t ih = oh * g.SH - g.PH + i * g.DH;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t j = 0; j < g.KW; ++j) {
      const int64_t iw = ow * g.SW - g.PW + j * g.DW;
      if (iw < 0 || iw >= g.W) continue;
      f(i * g.KW + j, ((n * g.H + ih) * g.W + iw) * g.Cin);
    }
  }
}

// The taps of an NHWC depthwise conv for a block of output pixels along a row: tap t reads the
// channel row at x + xoff[t] (+ p * step for the block's pixel p) with weights w + woff[t].
template <typename T>
struct DwTaps {
  const T* x;
  const T* w;
  const int64_t* xoff;
  const int64_t* woff;
  int64_t nt, step;
  bool row3;  // dw_row3: in a block of pixels, the taps come in rows of three neighbours
};

// Stride 1, three kernel columns, no dilation: the taps of a block's kernel row read P + 2
// neighbouring input pixels, which dw_channels_row3 loads once for its 3 x P products.
inline bool dw_row3(const Geom& g) { return g.KW == 3 && g.SW == 1 && g.DW == 1; }

// out[p * C + c] = bias[c] + sum_t w[woff[t] + c] * x[xoff[t] + p * step + c] for channels
// c0 .. c0 + NV * W - 1 (W lanes a vector), with P x NV vector accumulators in registers.
template <int64_t P, int64_t NV, typename T>
PBP_INLINE void dw_channels(const DwTaps<T>& tp, const T* bias, int64_t C, int64_t c0, T* out) {
  using S = Simd<T>;
  typename S::V reg[P][NV];
  for (int64_t v = 0; v < NV; ++v) {
    const auto b0 = bias ? S::load(bias + c0 + v * S::W) : typename S::V{};
    for (int64_t p = 0; p < P; ++p) reg[p][v] = b0;
  }
  for (int64_t t = 0; t < tp.nt; ++t) {
    const T* xv = tp.x + tp.xoff[t] + c0;
    const T* wv = tp.w + tp.woff[t] + c0;
    for (int64_t v = 0; v < NV; ++v) {
      const auto wq = S::load(wv + v * S::W);
      for (int64_t p = 0; p < P; ++p) reg[p][v] += wq * S::load(xv + p * tp.step + v * S::W);
    }
  }
  for (int64_t p = 0; p < P; ++p)
    for (int64_t v = 0; v < NV; ++v) S::store(out + p * C + c0 + v * S::W, reg[p][v]);
}

// dw_channels for one vector of channels when tp.row3 (every kernel row whole, taps in row
// order): per kernel row, the P + 2 input vectors once, 3 x P multiply-adds (instead of 3 x P
// loads).  P accumulators, P + 2 inputs and 3 weights stay within 16 vector registers.
template <int64_t P, typename T>
PBP_INLINE void dw_channels_row3(const DwTaps<T>& tp, const T* bias, int64_t C, int64_t c0,
                                 T* out) {
  using S = Simd<T>;
  typename S::V reg[P], xr[P + 2];
  const auto b0 = bias ? S::load(bias + c0) : typename S::V{};
  for (int64_t p = 0; p < P; ++p) reg[p] = b0;
  for (int64_t t = 0; t < tp.nt; t += 3) {
    const T* xv = tp.x + tp.xoff[t] + c0;
    const T* wv = tp.w + tp.woff[t] + c0;
    const auto w0 = S::load(wv), w1 = S::load(wv + C), w2 = S::load(wv + 2 * C);
    for (int64_t q = 0; q < P + 2; ++q) xr[q] = S::load(xv + q * C);
    for (int64_t p = 0; p < P; ++p) reg[p] += w0 * xr[p] + w1 * xr[p + 1] + w2 * xr[p + 2];
  }
  for (int64_t p = 0; p < P; ++p) S::store(out + p * C + c0, reg[p]);
}

// The same for the channels left over (fewer than one vector): scalar accumulators.
template <int64_t P, typename T>
PBP_INLINE void dw_channel(const DwTaps<T>& tp, const T* bias, int64_t C, int64_t c, T* out) {
  T reg[P];
  for (int64_t p = 0; p < P; ++p) reg[p] = bias ? bias[c] : T(0);
  for (int64_t t = 0; t < tp.nt; ++t) {
    const T wv = tp.w[tp.woff[t] + c];
    for (int64_t p = 0; p < P; ++p) reg[p] += wv * tp.x[tp.xoff[t] + p * tp.step + c];
  }
  for (int64_t p = 0; p < P; ++p) out[p * C + c] = reg[p];
}

template <int64_t P, typename T>
PBP_INLINE void dw_pixels(const DwTaps<T>& tp, const T* bias, int64_t C, T* out) {
  constexpr int64_t W = Simd<T>::W;
  int64_t c0 = 0;
  if (P > 1 && tp.row3)
    for (; c0 + W <= C; c0 += W) dw_channels_row3<P>(tp, bias, C, c0, out);
  for (; c0 + 2 * W <= C; c0 += 2 * W) dw_channels<P, 2>(tp, bias, C, c0, out);
  for (; c0 + W <= C; c0 += W) dw_channels<P, 1>(tp, bias, C, c0, out);
  for (; c0 < C; ++c0) dw_channel<P>(tp, bias, C, c0, out);
}

// Kernel-tap gradients of a block of P pixels, all channels:
// grad[woff[t] + c] += sum_p g[p * C + c] * x[xoff[t] + p * step + c] (one load and store of
// grad per block and tap).
template <int64_t P, typename T>
PBP_INLINE void dw_tap_grads(const DwTaps<T>& tp, const T* g, int64_t C, T* grad) {
  using S = Simd<T>;
  for (int64_t t = 0; t < tp.nt; ++t) {
    const T* xv = tp.x + tp.xoff[t];
    T* gw = grad + tp.woff[t];
    int64_t c = 0;
    for (; c + S::W <= C; c += S::W) {
      auto acc = S::load(gw + c);
      for (int64_t p = 0; p < P; ++p)
        acc += S::load(g + p * C + c) * S::load(xv + p * tp.step + c);
      S::store(gw + c, acc);
    }
    for (; c < C; ++c) {
      T acc = gw[c];
      for (int64_t p = 0; p < P; ++p) acc += g[p * C + c] * xv[p * tp.step + c];
      gw[c] = acc;
    }
  }
}

// NHWC depthwise, output row (n, oh): calls f(ow, P, nt) for blocks of P = kPixBlock output
// pixels where every horizontal tap is inside the image (one tap list serves the block, and
// P x channel accumulators keep the FMA units busy), and for single pixels (P = 1) near the
// borders; P is a std::integral_constant (a template argument for the kernels), xoff / woff
// (KH*KW each) hold the pixels' nt taps as DwTaps reads them.
constexpr int64_t kPixBlock = 4;
template <int64_t P>
using Pixels = std::integral_constant<int64_t, P>;
template <typename F>
PBP_INLINE void for_pixel_blocks(const Geom& g, int64_t n, int64_t oh, int64_t* xoff,
                                 int64_t* woff, const F& f) {
  const int64_t ow_lo = (g.PW + g.SW - 1) / g.SW, last = g.W - 1 + g.PW - (g.KW - 1) * g.DW;
  const int64_t ow_hi = last < 0 ? 0 : std::min(g.Wo, last / g.SW + 1);
  for (int64_t ow = 0; ow < g.Wo;) {
    const bool block = ow >= ow_lo && ow + kPixBlock <= ow_hi;
    int64_t nt = 0;
    for_pixel_taps(g, n, oh, ow, [&](int64_t tap, int64_t xo) {
      xoff[nt] = xo;
      woff[nt++] = tap * g.Cout;
    });
    if (block) f(ow, Pixels<kPixBlock>{}, nt); else f(ow, Pixels<1>{}, nt);
    ow += block ? kPixBlock : 1;
  }
}

// row[ow] = bias + sum over taps of w[tap] * x[...]: one output row of an NCHW depthwise conv.
template <typename T>
PBP_INLINE void dw_row(const Geom& g, int64_t oh, const T* plane, const T* w, T bias, T* row) {
  std::fill(row, row + g.Wo, bias);
  for_row_taps(g, oh, plane, [&](int64_t tap, int64_t, const T* xo, int64_t lo, int64_t hi) {
    const T wv = w[tap];
    if (g.SW == 1)
      for (int64_t ow = lo; ow < hi; ++ow) row[ow] += wv * xo[ow];
    else
      for (int64_t ow = lo; ow < hi; ++ow) row[ow] += wv * xo[ow * g.SW];
  });
}

}  // namespace pbp
