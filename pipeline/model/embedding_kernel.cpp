// Fused evaluation of an se_e2_a embedding net and of its derivative with respect to its
// scalar input (inference, and the forward of a training step; embedding_net_backward gives
// the weights' gradients), and of a tabulated embedding net (tabulated_embedding, the
// compressed inference of pipeline/model/compress.py). Compiled on first use by
// pipeline/model/embedding_kernel.py; the math is that of pipeline/model/network.py.
//
// A layer maps x [rows, n_in] to  out = shortcut(x) + a ⊙ tanh(z),  z = x W + b,
// shortcut: 0 none, 1 x (n_out = n_in), 2 (x, x) (n_out = 2 n_in); a = the resnet timestep
// (or 1). The net's input is one scalar s per row, so forces need only dG/ds [rows, M1]:
// it is carried forward beside G (forward-mode tangent, t = dx/ds):
//     t_out = shortcut(t) + a ⊙ (1 − tanh²(z)) ⊙ (t W).
// Stacking [x; t] makes one GEMM per layer for both (small_gemm; with MKL, two). Rows are processed in blocks that
// stay in the L2 cache, one block per thread: every intermediate lives in cache and only
// G and dG/ds are written to memory, instead of the ~10 passes over [rows, M1] arrays the
// layer-by-layer evaluation makes. tanh is evaluated inline (tanh_exp), vectorised.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

namespace {

// tanh(z) = (1 − e)/(1 + e), e = exp(−2z), written so that GCC vectorises it inside the loops
// below (ATen's float64 exp runs ~2.6 ns an element here). exp: x = n ln2 + r, |r| ≤ ln2/2,
// e^r by its Taylor series to r^13 (relative error < 1e-17 before rounding), 2^n put in the
// exponent bits. |2z| is capped at 40, where tanh rounds to ±1 exactly; any NaN stays NaN.
inline double tanh_exp(double z) {
  double x = -2.0 * z;
  x = x < -40.0 ? -40.0 : (x > 40.0 ? 40.0 : x);
  const double shifter = 6755399441055744.0;  // 1.5 · 2^52: adding it rounds to an integer in the low bits
  const double kd = x * 1.4426950408889634 + shifter;
  const double k = kd - shifter;
  double r = x - k * 6.93147180369123816490e-01;  // ln2 split in two for an exact reduction
  r = r - k * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t kbits;
  __builtin_memcpy(&kbits, &kd, sizeof kbits);
  int64_t pbits;
  __builtin_memcpy(&pbits, &p, sizeof pbits);
  pbits += (kbits - 0x4338000000000000LL) << 52;  // multiply by 2^k, |k| ≤ 58
  double e;
  __builtin_memcpy(&e, &pbits, sizeof e);
  const double y = (1.0 - e) / (1.0 + e);
  return z != z ? z : y;  // a NaN's payload bits could have turned e finite: keep the NaN
}

#if defined(__AVX2__) && defined(__FMA__)
// C[rows, N] = A[rows, K] W[K, N], all row-major and contiguous: a register-blocked GEMM for
// the embedding nets' narrow shapes (K, N ~ 25-100): 6 rows × 8 columns of C in 12 AVX2
// registers (AVX-512: 12 rows × 16 columns), k innermost. Every element sums over k in
// ascending order whatever the block's shape, so a row's values do not depend on the rows
// evaluated with it, nor on the instruction set. That, not speed, is why it is kept: on the
// AVX-512 machines here MKL called from C++ runs [512, 50] × [50, 100] at ~67 GFLOPS on one
// core and this at ~54 (it was ~1.2× MKL's AVX2 path when written).
#define DPELT_SMALL_GEMM 1
template <int MR>
inline void panel8(const double* A, int64_t K, const double* W, int64_t N, double* C) {
  __m256d c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    c0[i] = _mm256_setzero_pd();
    c1[i] = _mm256_setzero_pd();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256d w0 = _mm256_loadu_pd(W + k * N);
    const __m256d w1 = _mm256_loadu_pd(W + k * N + 4);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256d b = _mm256_broadcast_sd(A + i * K + k);
      c0[i] = _mm256_fmadd_pd(b, w0, c0[i]);
      c1[i] = _mm256_fmadd_pd(b, w1, c1[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_pd(C + i * N, c0[i]);
    _mm256_storeu_pd(C + i * N + 4, c1[i]);
  }
}

template <int MR>
inline void panel4(const double* A, int64_t K, const double* W, int64_t N, double* C) {
  __m256d c0[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c0[i] = _mm256_setzero_pd();
  for (int64_t k = 0; k < K; ++k) {
    const __m256d w0 = _mm256_loadu_pd(W + k * N);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) c0[i] = _mm256_fmadd_pd(_mm256_broadcast_sd(A + i * K + k), w0, c0[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) _mm256_storeu_pd(C + i * N, c0[i]);
}

#if defined(__AVX512F__)
// The AVX-512 panel: MR rows × 16 columns of C in 2·MR registers; ``m0``/``m1`` mask the
// columns past N (masked loads read no memory there). The same FMA in the same k order as
// panel8, so the values are those of the AVX2 path bit for bit.
template <int MR>
inline void panel16(const double* A, int64_t K, const double* W, int64_t N, double* C, __mmask8 m0, __mmask8 m1) {
  __m512d c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    c0[i] = _mm512_setzero_pd();
    c1[i] = _mm512_setzero_pd();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512d w0 = _mm512_maskz_loadu_pd(m0, W + k * N);
    const __m512d w1 = _mm512_maskz_loadu_pd(m1, W + k * N + 8);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512d b = _mm512_set1_pd(A[i * K + k]);
      c0[i] = _mm512_fmadd_pd(b, w0, c0[i]);
      c1[i] = _mm512_fmadd_pd(b, w1, c1[i]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_pd(C + i * N, m0, c0[i]);
    _mm512_mask_storeu_pd(C + i * N + 8, m1, c1[i]);
  }
}

void small_gemm(const double* A, int64_t rows, int64_t K, const double* W, int64_t N, double* C) {
  constexpr int MR = 12;
  for (int64_t j = 0; j < N; j += 16) {
    const int64_t left = N - j;
    const __mmask8 m0 = left >= 8 ? 0xFF : static_cast<__mmask8>((1u << left) - 1u);
    const __mmask8 m1 = left >= 16 ? 0xFF : (left > 8 ? static_cast<__mmask8>((1u << (left - 8)) - 1u) : 0);
    int64_t r = 0;
    for (; r + MR <= rows; r += MR) panel16<MR>(A + r * K, K, W + j, N, C + r * N + j, m0, m1);
    for (; r + 4 <= rows; r += 4) panel16<4>(A + r * K, K, W + j, N, C + r * N + j, m0, m1);
    for (; r < rows; ++r) panel16<1>(A + r * K, K, W + j, N, C + r * N + j, m0, m1);
  }
}
#else
void small_gemm(const double* A, int64_t rows, int64_t K, const double* W, int64_t N, double* C) {
  constexpr int MR = 6;
  int64_t j = 0;
  for (; j + 8 <= N; j += 8) {
    int64_t r = 0;
    for (; r + MR <= rows; r += MR) panel8<MR>(A + r * K, K, W + j, N, C + r * N + j);
    for (; r < rows; ++r) panel8<1>(A + r * K, K, W + j, N, C + r * N + j);
  }
  for (; j + 4 <= N; j += 4) {
    int64_t r = 0;
    for (; r + MR <= rows; r += MR) panel4<MR>(A + r * K, K, W + j, N, C + r * N + j);
    for (; r < rows; ++r) panel4<1>(A + r * K, K, W + j, N, C + r * N + j);
  }
  for (; j < N; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += A[r * K + k] * W[k * N + j];
      C[r * N + j] = acc;
    }
}
#endif  // __AVX512F__

#endif

struct Layer {
  const double* w;   // [n_in, n_out]
  const double* b;   // [n_out]
  const double* a;   // [n_out] timestep (ones when the layer has none)
  int64_t n_in;
  int64_t n_out;
  int64_t shortcut;
  at::Tensor weight;  // the same weights as a tensor, for the GEMM
  bool has_dt;        // a trainable timestep (else a points at ones)
};

// The checked layers of one net (``op`` names the caller in errors). ``ones`` keeps the
// unit timesteps of layers without one alive; ``width`` is the output width M1.
struct Net {
  std::vector<Layer> layers;
  std::vector<at::Tensor> ones;
  int64_t width;
};

Net checked_net(const char* op, const at::Tensor& s, at::TensorList weights, at::TensorList biases,
                at::TensorList timesteps, at::IntArrayRef shortcuts, int64_t block) {
  TORCH_CHECK(s.dim() == 1 && s.scalar_type() == at::kDouble && s.is_contiguous() && s.device().is_cpu(),
              op, ": s must be a contiguous float64 CPU vector");
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(timesteps.size()) == L &&
                  static_cast<int64_t>(shortcuts.size()) == L,
              op, ": one weight, bias, timestep and shortcut per layer");
  TORCH_CHECK(block >= 1, op, ": block must be positive");
  Net net;
  int64_t width = 1;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.size(0) == width && w.scalar_type() == at::kDouble && w.is_contiguous(),
                op, ": weight ", l, " must be a contiguous float64 [", width, ", n_out] matrix");
    const int64_t n = w.size(1);
    const at::Tensor& b = biases[l];
    TORCH_CHECK(b.numel() == n && b.scalar_type() == at::kDouble && b.is_contiguous(), op, ": bias ", l);
    const int64_t sc = shortcuts[l];
    TORCH_CHECK((sc == 0) || (sc == 1 && n == width) || (sc == 2 && n == 2 * width), op, ": shortcut ", l);
    const at::Tensor& a = timesteps[l];
    const bool has_dt = a.numel() > 0;
    const double* ap;
    if (!has_dt) {
      net.ones.push_back(at::ones({n}, s.options()));
      ap = net.ones.back().data_ptr<double>();
    } else {
      TORCH_CHECK(a.numel() == n && a.scalar_type() == at::kDouble && a.is_contiguous(), op, ": timestep ", l);
      ap = a.data_ptr<double>();
    }
    net.layers.push_back(Layer{w.data_ptr<double>(), b.data_ptr<double>(), ap, width, n, sc, w, has_dt});
    width = n;
  }
  net.width = width;
  return net;
}

// h[r, k] = shortcut(x)[r, k] + a[k] * y[r, k] over one block, y = tanh(z) read from ys;
// with tangents, t[r, k] = shortcut(xt)[r, k] + a[k] * (1 − y²) * zt[r, k].
template <int SC>
void combine(int64_t rows, int64_t n_in, int64_t n, const double* a, const double* ys, const double* zt,
             int64_t zt_stride, const double* x, const double* xt, double* h, double* t) {
  for (int64_t r = 0; r < rows; ++r) {
    const double* yr = ys + r * n;
    const double* xr = x + r * n_in;
    double* hr = h + r * n;
    if (SC == 0) {
      for (int64_t k = 0; k < n; ++k) hr[k] = a[k] * yr[k];
    } else if (SC == 1) {
      for (int64_t k = 0; k < n; ++k) hr[k] = xr[k] + a[k] * yr[k];
    } else {
      for (int64_t k = 0; k < n_in; ++k) hr[k] = xr[k] + a[k] * yr[k];
      for (int64_t k = n_in; k < n; ++k) hr[k] = xr[k - n_in] + a[k] * yr[k];
    }
    if (t == nullptr) continue;
    const double* ztr = zt + r * zt_stride;
    const double* xtr = xt + r * n_in;
    double* tr = t + r * n;
    for (int64_t k = 0; k < n; ++k) {
      const double y = yr[k];
      tr[k] = a[k] * (1.0 - y * y) * ztr[k];
    }
    if (SC == 1) {
      for (int64_t k = 0; k < n; ++k) tr[k] += xtr[k];
    } else if (SC == 2) {
      for (int64_t k = 0; k < n_in; ++k) tr[k] += xtr[k];
      for (int64_t k = n_in; k < n; ++k) tr[k] += xtr[k - n_in];
    }
  }
}

void combine_any(int64_t sc, int64_t rows, int64_t n_in, int64_t n, const double* a, const double* ys,
                 const double* zt, int64_t zt_stride, const double* x, const double* xt, double* h, double* t) {
  if (sc == 1) {
    combine<1>(rows, n_in, n, a, ys, zt, zt_stride, x, xt, h, t);
  } else if (sc == 2) {
    combine<2>(rows, n_in, n, a, ys, zt, zt_stride, x, xt, h, t);
  } else {
    combine<0>(rows, n_in, n, a, ys, zt, zt_stride, x, xt, h, t);
  }
}

// One block of B rows: s [B] -> G [B, M1] (row stride M1) and, when Gp is not null, dG/ds.
void run_block(const double* s, int64_t B, const std::vector<Layer>& layers, double* G, double* Gp) {
  const bool tangent = Gp != nullptr;
  const int64_t nrows = tangent ? 2 * B : B;  // rows of the stacked [h; t] buffer
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const int64_t L = static_cast<int64_t>(layers.size());

  // Layer 0 has one input: z = s w + b, dz/ds = w.
  const Layer& l0 = layers[0];
  int64_t n = l0.n_out;
  at::Tensor y0 = at::empty({B, n}, opts);
  {
    double* y = y0.data_ptr<double>();
    for (int64_t r = 0; r < B; ++r)
      for (int64_t k = 0; k < n; ++k) y[r * n + k] = tanh_exp(s[r] * l0.w[k] + l0.b[k]);
  }
  // A layer's output: G and dG/ds for the last layer, else a fresh [nrows, n] buffer with
  // the values in rows [0, B) and the tangents in rows [B, 2B).
  auto output = [&](bool last, int64_t width, at::Tensor& buffer, double*& values, double*& tangents) {
    if (last) {
      values = G;
      tangents = Gp;
      return;
    }
    buffer = at::empty({nrows, width}, opts);
    values = buffer.data_ptr<double>();
    tangents = tangent ? values + B * width : nullptr;
  };
  at::Tensor H;
  double* h;
  double* t;
  output(L == 1, n, H, h, t);
  {
    // the input tangent is 1: shortcut(xt) = 1, and zt[r, k] = w[k] for every row
    std::vector<double> ones(B, 1.0);
    combine_any(l0.shortcut, B, 1, n, l0.a, y0.data_ptr<double>(), l0.w, 0, s, ones.data(), h, t);
  }
  for (int64_t l = 1; l < L; ++l) {
    const Layer& ly = layers[l];
    const int64_t n_in = n;
    n = ly.n_out;
    // [nrows, n]: x W on top, t W below
    at::Tensor Z = at::empty({nrows, n}, opts);
#ifdef DPELT_SMALL_GEMM
    small_gemm(H.data_ptr<double>(), nrows, n_in, ly.w, n, Z.data_ptr<double>());
#else
    // two GEMMs, so that the values do not depend on whether tangents are computed (MKL's
    // rounding depends on the number of rows)
    at::Tensor z_top = Z.narrow(0, 0, B);
    at::mm_out(z_top, H.narrow(0, 0, B), ly.weight);
    if (tangent) {
      at::Tensor z_bottom = Z.narrow(0, B, B);
      at::mm_out(z_bottom, H.narrow(0, B, B), ly.weight);
    }
#endif
    double* z = Z.data_ptr<double>();
    for (int64_t r = 0; r < B; ++r)  // top half: y = tanh(x W + b) in place
      for (int64_t k = 0; k < n; ++k) z[r * n + k] = tanh_exp(z[r * n + k] + ly.b[k]);
    double* zt = tangent ? z + B * n : nullptr;
    at::Tensor next;
    double* hn;
    double* tn;
    output(l == L - 1, n, next, hn, tn);
    const double* x = H.data_ptr<double>();
    combine_any(ly.shortcut, B, n_in, n, ly.a, z, zt, n, x, tangent ? x + B * n_in : nullptr, hn, tn);
    H = next;
  }
}

// s [R] float64; weights[l] [n_in, n_out], biases[l] [n_out], timesteps[l] [n_out] or empty;
// shortcuts[l] in {0, 1, 2}. Returns (G [R, M1], dG/ds [R, M1] or an empty tensor).
std::vector<at::Tensor> embedding_net(const at::Tensor& s, at::TensorList weights, at::TensorList biases,
                                      at::TensorList timesteps, at::IntArrayRef shortcuts, bool tangent,
                                      int64_t block) {
  const Net net = checked_net("embedding_net", s, weights, biases, timesteps, shortcuts, block);
  const std::vector<Layer>& layers = net.layers;
  const int64_t width = net.width;
  const int64_t R = s.size(0);
  at::Tensor G = at::empty({R, width}, s.options());
  at::Tensor Gp = tangent ? at::empty({R, width}, s.options()) : at::empty({0}, s.options());
  if (R == 0) return {G, Gp};
  const double* sp = s.data_ptr<double>();
  double* g = G.data_ptr<double>();
  double* gp = tangent ? Gp.data_ptr<double>() : nullptr;
  const int64_t nblocks = (R + block - 1) / block;
  at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t r0 = q * block;
      const int64_t rows = std::min(block, R - r0);
      run_block(sp + r0, rows, layers, g + r0 * width, tangent ? gp + r0 * width : nullptr);
    }
  });
  return {G, Gp};
}

// The backward of G = net(s) gathered as G[rows]: out[i] = Σ_k grad[i, k] · dG/ds[rows[i], k]
// (grad [N, M1], tangents [R, M1], rows [N] int64; rows empty: the identity), in one pass.
at::Tensor gathered_row_dot(const at::Tensor& grad, const at::Tensor& tangents, const at::Tensor& rows) {
  TORCH_CHECK(grad.dim() == 2 && tangents.dim() == 2 && grad.size(1) == tangents.size(1), "gathered_row_dot: shapes");
  TORCH_CHECK(grad.scalar_type() == at::kDouble && tangents.scalar_type() == at::kDouble, "gathered_row_dot: float64");
  const at::Tensor g = grad.contiguous();
  const at::Tensor tp = tangents.contiguous();
  const bool gather = rows.numel() > 0;
  const int64_t N = g.size(0);
  const int64_t M = g.size(1);
  const int64_t R = tp.size(0);
  TORCH_CHECK(gather ? (rows.numel() == N && rows.scalar_type() == at::kLong) : N == R, "gathered_row_dot: rows");
  const at::Tensor idx = gather ? rows.contiguous() : rows;
  at::Tensor out = at::empty({N}, g.options());
  const double* gp = g.data_ptr<double>();
  const double* tpp = tp.data_ptr<double>();
  const int64_t* ip = gather ? idx.data_ptr<int64_t>() : nullptr;
  double* op = out.data_ptr<double>();
  at::parallel_for(0, N, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = gather ? ip[i] : i;
      TORCH_CHECK(r >= 0 && r < R, "gathered_row_dot: row index out of range");
      const double* a = gp + i * M;
      const double* b = tpp + r * M;
      double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};  // 8 lanes: vectorised, a fixed order
      int64_t k = 0;
      for (; k + 8 <= M; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += a[k + j] * b[k + j];
      double tail = 0.0;
      for (; k < M; ++k) tail += a[k] * b[k];
      op[i] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
    }
  });
  return out;
}


// The parameter gradients of one block of B rows of (G, dG/ds) = net(s), given their
// cotangents gG and gGp [B, M1] (gGp null: zero). The forward is recomputed in the block
// (cheaper than storing and re-reading every layer's activations), keeping per layer the
// stacked input X = [x; t] [2B, n_in], y = tanh(z) and zt = t W. Backward, per layer, with
// (gx, gt) the cotangents of its outputs (x_out = sc(x) + a y, t_out = sc(t) + a (1 − y²) zt):
//     gzt = a (1 − y²) gt,   gz = a (gx − 2 y zt gt) (1 − y²),
//     da = Σ_rows gx y + gt (1 − y²) zt,   db = Σ_rows gz,   dW = Xᵀ [gz; gzt],
//     (gx_in; gt_in) = [gz; gzt] Wᵀ + sc_back(gx; gt).
// out [P] receives every layer's (dW, db, da) flattened, in layer order (da only when the
// layer has a timestep).
// C[n_in, n] = Xᵀ G for X [rows, n_in], G [rows, n], every element summed over the rows in
// ascending order: the same bits whatever the thread count (MKL may thread a lone call).
void gemm_tn_ordered(const double* X, int64_t rows, int64_t n_in, const double* G, int64_t n, double* C) {
  std::fill(C, C + n_in * n, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const double* __restrict__ g = G + r * n;
    for (int64_t i = 0; i < n_in; ++i) {
      const double x = X[r * n_in + i];
      double* __restrict__ c = C + i * n;
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) c[j] += x * g[j];
    }
  }
}

// C[rows, N] = A[rows, K] W[K, N] in a fixed order (the fallback of small_gemm without AVX2).
void gemm_nn_ordered(const double* A, int64_t rows, int64_t K, const double* W, int64_t N, double* C) {
  for (int64_t r = 0; r < rows; ++r) {
    double* __restrict__ c = C + r * N;
    std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[r * K + k];
      const double* __restrict__ w = W + k * N;
#pragma GCC ivdep
      for (int64_t j = 0; j < N; ++j) c[j] += a * w[j];
    }
  }
}

void backward_block(const double* s, int64_t B, const std::vector<Layer>& layers,
                    const std::vector<at::Tensor>& w_t, bool ordered, const double* gG, const double* gGp, double* out) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const int64_t L = static_cast<int64_t>(layers.size());
  std::vector<at::Tensor> X(L), Z(L);  // X[l] [2B, n_in]; Z[l] [2B, n_out]: y on top, zt below
  X[0] = at::empty({2 * B, 1}, opts);
  {
    double* x0 = X[0].data_ptr<double>();
    for (int64_t r = 0; r < B; ++r) {
      x0[r] = s[r];
      x0[B + r] = 1.0;  // ds/ds
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    const Layer& ly = layers[l];
    const int64_t n_in = ly.n_in, n = ly.n_out;
    Z[l] = at::empty({2 * B, n}, opts);
    double* z = Z[l].data_ptr<double>();
    const double* x = X[l].data_ptr<double>();
    if (l == 0) {  // one input: z = s w + b, zt = w
      for (int64_t r = 0; r < B; ++r)
        for (int64_t k = 0; k < n; ++k) z[r * n + k] = s[r] * ly.w[k];
      for (int64_t r = 0; r < B; ++r)
        for (int64_t k = 0; k < n; ++k) z[(B + r) * n + k] = ly.w[k];
    } else {
#ifdef DPELT_SMALL_GEMM
      small_gemm(x, 2 * B, n_in, ly.w, n, z);
#else
      at::Tensor zt_ = Z[l];
      at::mm_out(zt_, X[l], ly.weight);
#endif
    }
    for (int64_t r = 0; r < B; ++r)
      for (int64_t k = 0; k < n; ++k) z[r * n + k] = tanh_exp(z[r * n + k] + ly.b[k]);
    if (l + 1 < L) {
      X[l + 1] = at::empty({2 * B, n}, opts);
      double* h = X[l + 1].data_ptr<double>();
      combine_any(ly.shortcut, B, n_in, n, ly.a, z, z + B * n, n, x, x + B * n_in, h, h + B * n);
    }
  }
  const int64_t M = layers[L - 1].n_out;
  at::Tensor GO = at::empty({2 * B, M}, opts);  // cotangents of the last outputs: gG on top, gGp below
  {
    double* go = GO.data_ptr<double>();
    std::copy(gG, gG + B * M, go);
    if (gGp != nullptr) {
      std::copy(gGp, gGp + B * M, go + B * M);
    } else {
      std::fill(go + B * M, go + 2 * B * M, 0.0);
    }
  }
  std::vector<int64_t> offset(L + 1, 0);
  for (int64_t l = 0; l < L; ++l)
    offset[l + 1] = offset[l] + layers[l].n_in * layers[l].n_out + layers[l].n_out + (layers[l].has_dt ? layers[l].n_out : 0);
  for (int64_t l = L - 1; l >= 0; --l) {
    const Layer& ly = layers[l];
    const int64_t n_in = ly.n_in, n = ly.n_out;
    const double* y = Z[l].data_ptr<double>();
    const double* zt = y + B * n;
    const double* go = GO.data_ptr<double>();
    at::Tensor GZ = at::empty({2 * B, n}, opts);
    double* gz = GZ.data_ptr<double>();
    double* dW = out + offset[l];
    double* db = dW + n_in * n;
    double* da = db + n;
    std::fill(db, db + n + (ly.has_dt ? n : 0), 0.0);
    const double* __restrict__ a = ly.a;
    for (int64_t r = 0; r < B; ++r) {  // restrict + ivdep: the loops vectorise (GCC cannot prove the rows disjoint)
      const double* __restrict__ gxr = go + r * n;
      const double* __restrict__ gtr = go + (B + r) * n;
      const double* __restrict__ yr = y + r * n;
      const double* __restrict__ ztr = zt + r * n;
      double* __restrict__ gzr = gz + r * n;
      double* __restrict__ gztr = gz + (B + r) * n;
      double* __restrict__ dbr = db;
#pragma GCC ivdep
      for (int64_t k = 0; k < n; ++k) {
        const double yk = yr[k];
        const double d = 1.0 - yk * yk;
        const double v = a[k] * (gxr[k] - 2.0 * yk * ztr[k] * gtr[k]) * d;
        gztr[k] = a[k] * d * gtr[k];
        gzr[k] = v;
        dbr[k] += v;
      }
      if (ly.has_dt) {
        double* __restrict__ dar = da;
#pragma GCC ivdep
        for (int64_t k = 0; k < n; ++k) dar[k] += gxr[k] * yr[k] + gtr[k] * (1.0 - yr[k] * yr[k]) * ztr[k];
      }
    }
    // ordered: a lone block outside a parallel region, where MKL may use several threads and
    // round differently; the fixed-order products keep the result independent of threads
    if (ordered) {
      gemm_tn_ordered(X[l].data_ptr<double>(), 2 * B, n_in, gz, n, dW);
    } else {
      at::Tensor dW_t = at::from_blob(dW, {n_in, n}, opts);
      at::mm_out(dW_t, X[l].t(), GZ);
    }
    if (l == 0) break;
    at::Tensor GI = at::empty({2 * B, n_in}, opts);  // [gz; gzt] Wᵀ
    if (ordered) {
#ifdef DPELT_SMALL_GEMM
      small_gemm(gz, 2 * B, n, w_t[l].data_ptr<double>(), n_in, GI.data_ptr<double>());
#else
      gemm_nn_ordered(gz, 2 * B, n, w_t[l].data_ptr<double>(), n_in, GI.data_ptr<double>());
#endif
    } else {
      at::mm_out(GI, GZ, w_t[l]);
    }
    double* __restrict__ gi = GI.data_ptr<double>();
    const double* __restrict__ gor = go;
    if (ly.shortcut == 1) {
#pragma GCC ivdep
      for (int64_t i = 0; i < 2 * B * n; ++i) gi[i] += gor[i];
    } else if (ly.shortcut == 2) {
      for (int64_t r = 0; r < 2 * B; ++r) {
#pragma GCC ivdep
        for (int64_t k = 0; k < n_in; ++k) gi[r * n_in + k] += gor[r * n + k] + gor[r * n + n_in + k];
      }
    }
    GO = GI;
  }
}

// The parameter gradients of (G, dG/ds) = net(s) for cotangents gG [R, M1] and gGp [R, M1]
// (empty: zero), as the forward pass of embedding_net sees the layers. Returns per layer
// (dW [n_in, n_out], db [n_out], da [n_out] or an empty tensor when it has no timestep), summed
// over the rows in an order fixed by R alone (chunks of blocks), so the result does not depend
// on the number of threads.
std::vector<at::Tensor> embedding_net_backward(const at::Tensor& s, at::TensorList weights, at::TensorList biases,
                                               at::TensorList timesteps, at::IntArrayRef shortcuts,
                                               const at::Tensor& gG, const at::Tensor& gGp, int64_t block) {
  const Net net = checked_net("embedding_net_backward", s, weights, biases, timesteps, shortcuts, block);
  const std::vector<Layer>& layers = net.layers;
  const int64_t width = net.width;
  int64_t P = 0;  // gradient entries: per layer dW, db and (with a timestep) da
  for (const Layer& ly : layers) P += ly.n_in * ly.n_out + ly.n_out + (ly.has_dt ? ly.n_out : 0);
  const int64_t R = s.size(0);
  TORCH_CHECK(gG.dim() == 2 && gG.size(0) == R && gG.size(1) == width && gG.scalar_type() == at::kDouble,
              "embedding_net_backward: gG must be [R, M1] float64");
  const bool with_t = gGp.numel() > 0;
  TORCH_CHECK(!with_t || (gGp.dim() == 2 && gGp.size(0) == R && gGp.size(1) == width && gGp.scalar_type() == at::kDouble),
              "embedding_net_backward: gGp must be [R, M1] float64 or empty");
  const at::Tensor g = gG.contiguous();
  const at::Tensor gt = with_t ? gGp.contiguous() : gGp;
  std::vector<at::Tensor> w_t;  // per layer Wᵀ [n_out, n_in], contiguous: the GEMM of the input gradients
  for (const Layer& ly : layers) w_t.push_back(ly.weight.t().contiguous());
  // Blocks are grouped in at most 64 chunks of consecutive blocks (fixed by R, not by the
  // threads); a chunk sums its blocks' gradients in block order, then the chunks are summed in
  // order: the result does not depend on the thread count, and the partial sums take at most
  // 64 gradient vectors whatever the number of rows.
  const int64_t nblocks = (R + block - 1) / block;
  const int64_t nchunks = std::max<int64_t>(std::min<int64_t>(nblocks, 64), 1);
  at::Tensor partial = at::zeros({nchunks, P}, s.options());
  const double* sp = s.data_ptr<double>();
  const double* gp = g.data_ptr<double>();
  const double* gtp = with_t ? gt.data_ptr<double>() : nullptr;
  double* pp = partial.data_ptr<double>();
  const bool ordered = nblocks == 1;  // a lone block runs outside any parallel region (see backward_block)
  at::parallel_for(0, nchunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> one(P);
    for (int64_t c = lo; c < hi; ++c) {
      double* acc = pp + c * P;
      for (int64_t q = c * nblocks / nchunks; q < (c + 1) * nblocks / nchunks; ++q) {
        const int64_t r0 = q * block;
        const int64_t rows = std::min(block, R - r0);
        backward_block(sp + r0, rows, layers, w_t, ordered, gp + r0 * width, with_t ? gtp + r0 * width : nullptr, one.data());
        for (int64_t p = 0; p < P; ++p) acc[p] += one[p];
      }
    }
  });
  at::Tensor total = at::empty({P}, s.options());
  double* tp = total.data_ptr<double>();
  at::parallel_for(0, P, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      double acc = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) acc += pp[c * P + p];
      tp[p] = acc;
    }
  });
  std::vector<at::Tensor> result;
  int64_t off = 0;
  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
    const int64_t n_in = layers[l].n_in, n = layers[l].n_out;
    result.push_back(total.narrow(0, off, n_in * n).view({n_in, n}));
    off += n_in * n;
    result.push_back(total.narrow(0, off, n));
    off += n;
    if (layers[l].has_dt) {
      result.push_back(total.narrow(0, off, n));
      off += n;
    } else {
      result.push_back(at::empty({0}, s.options()));
    }
  }
  return result;
}

}  // namespace

// A tabulated embedding net (pipeline/model/compress.py): on interval k = floor((x − x0)/h)
// of a uniform grid, G(x) = Σ_p c[k, p, :] t^p with t = (x − x0)/h − k, p = 0 … 5.
// x [R] float64 (every row inside the table: the caller sends the others to the net),
// coeffs [n, 6, M1]. Returns (G [R, M1], dG/dx [R, M1] or an empty tensor).
std::vector<at::Tensor> tabulated_embedding(const at::Tensor& x, const at::Tensor& coeffs, double x0, double h,
                                            bool tangent) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kDouble && x.is_contiguous(), "tabulated_embedding: x [R] float64");
  TORCH_CHECK(coeffs.dim() == 3 && coeffs.size(1) == 6 && coeffs.scalar_type() == at::kDouble && coeffs.is_contiguous(),
              "tabulated_embedding: coeffs [n, 6, M1] float64");
  const int64_t R = x.size(0);
  const int64_t n = coeffs.size(0);
  const int64_t M = coeffs.size(2);
  at::Tensor G = at::empty({R, M}, x.options());
  at::Tensor Gp = tangent ? at::empty({R, M}, x.options()) : at::empty({0}, x.options());
  if (R == 0) return {G, Gp};
  const double* xp = x.data_ptr<double>();
  const double* cp = coeffs.data_ptr<double>();
  double* g = G.data_ptr<double>();
  double* gp = tangent ? Gp.data_ptr<double>() : nullptr;
  const double inv_h = 1.0 / h;
  at::parallel_for(0, R, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const double u = (xp[r] - x0) * inv_h;
      int64_t k = static_cast<int64_t>(u);  // u >= 0 inside the table
      k = k < 0 ? 0 : (k >= n ? n - 1 : k);
      const double t = u - static_cast<double>(k);
      const double* c = cp + k * 6 * M;
      double* out = g + r * M;
      for (int64_t m = 0; m < M; ++m) {
        out[m] = c[m] + t * (c[M + m] + t * (c[2 * M + m] + t * (c[3 * M + m] + t * (c[4 * M + m] + t * c[5 * M + m]))));
      }
      if (tangent) {
        double* d = gp + r * M;
        for (int64_t m = 0; m < M; ++m) {
          d[m] = inv_h * (c[M + m] + t * (2.0 * c[2 * M + m] + t * (3.0 * c[3 * M + m] + t * (4.0 * c[4 * M + m] + t * 5.0 * c[5 * M + m]))));
        }
      }
    }
  });
  return {G, Gp};
}

// The row G(x) [M] and, when gp is not null, dG/dx [M] of a tabulated net (coeffs [n, 6, M]).
inline void table_row(const double* cp, int64_t n, int64_t M, double x0, double inv_h, double x, double* g, double* gp) {
  const double u = (x - x0) * inv_h;
  int64_t k = static_cast<int64_t>(u);
  k = k < 0 ? 0 : (k >= n ? n - 1 : k);
  const double t = u - static_cast<double>(k);
  const double* c = cp + k * 6 * M;
  for (int64_t m = 0; m < M; ++m) {
    g[m] = c[m] + t * (c[M + m] + t * (c[2 * M + m] + t * (c[3 * M + m] + t * (c[4 * M + m] + t * c[5 * M + m]))));
  }
  if (gp != nullptr) {
    for (int64_t m = 0; m < M; ++m) {
      gp[m] = inv_h * (c[M + m] + t * (2.0 * c[2 * M + m] + t * (3.0 * c[3 * M + m] + t * (4.0 * c[4 * M + m] + t * 5.0 * c[5 * M + m]))));
    }
  }
}

void check_contraction(const at::Tensor& x, const at::Tensor& rr, const at::Tensor& coeffs) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kDouble && x.is_contiguous(), "tabulated_contraction: x [n, c] float64");
  TORCH_CHECK(rr.dim() == 3 && rr.size(0) == x.size(0) && rr.size(1) == x.size(1) && rr.size(2) == 4 &&
                  rr.scalar_type() == at::kDouble && rr.is_contiguous(),
              "tabulated_contraction: rr [n, c, 4] float64");
  TORCH_CHECK(coeffs.dim() == 3 && coeffs.size(1) == 6 && coeffs.scalar_type() == at::kDouble && coeffs.is_contiguous(),
              "tabulated_contraction: coeffs [n_int, 6, M1] float64");
}

// T[i] = Σ_j rr[i, j]ᵀ G(x[i, j]) [4, M1] for x [n, c] (every entry inside the table), rr [n, c, 4]:
// the descriptor's contraction with the tabulated net, G never written to memory.
at::Tensor tabulated_contraction(const at::Tensor& x, const at::Tensor& rr, const at::Tensor& coeffs, double x0, double h) {
  check_contraction(x, rr, coeffs);
  const int64_t n = x.size(0), c = x.size(1), nint = coeffs.size(0), M = coeffs.size(2);
  at::Tensor T = at::zeros({n, 4, M}, x.options());
  const double* xp = x.data_ptr<double>();
  const double* rp = rr.data_ptr<double>();
  const double* cp = coeffs.data_ptr<double>();
  double* tp = T.data_ptr<double>();
  const double inv_h = 1.0 / h;
  at::parallel_for(0, n, 8, [&](int64_t lo, int64_t hi) {
    std::vector<double> g(M);
    for (int64_t i = lo; i < hi; ++i) {
      double* ti = tp + i * 4 * M;
      for (int64_t j = 0; j < c; ++j) {
        table_row(cp, nint, M, x0, inv_h, xp[i * c + j], g.data(), nullptr);
        const double* r = rp + (i * c + j) * 4;
        for (int64_t q = 0; q < 4; ++q) {
          const double rq = r[q];
          double* tq = ti + q * M;
          for (int64_t m = 0; m < M; ++m) tq[m] += rq * g[m];
        }
      }
    }
  });
  return T;
}

// The backward of tabulated_contraction for dT [n, 4, M1]: (dx [n, c], drr [n, c, 4]) with
// drr[i, j, q] = Σ_m dT[i, q, m] G_m,  dx[i, j] = Σ_q rr[i, j, q] Σ_m dT[i, q, m] G'_m.
std::vector<at::Tensor> tabulated_contraction_backward(const at::Tensor& x, const at::Tensor& rr, const at::Tensor& coeffs,
                                                       double x0, double h, const at::Tensor& dT) {
  check_contraction(x, rr, coeffs);
  const int64_t n = x.size(0), c = x.size(1), nint = coeffs.size(0), M = coeffs.size(2);
  TORCH_CHECK(dT.dim() == 3 && dT.size(0) == n && dT.size(1) == 4 && dT.size(2) == M && dT.scalar_type() == at::kDouble,
              "tabulated_contraction_backward: dT [n, 4, M1] float64");
  const at::Tensor dTc = dT.contiguous();
  at::Tensor dx = at::empty({n, c}, x.options());
  at::Tensor drr = at::empty({n, c, 4}, x.options());
  const double* xp = x.data_ptr<double>();
  const double* rp = rr.data_ptr<double>();
  const double* cp = coeffs.data_ptr<double>();
  const double* dtp = dTc.data_ptr<double>();
  double* dxp = dx.data_ptr<double>();
  double* drp = drr.data_ptr<double>();
  const double inv_h = 1.0 / h;
  at::parallel_for(0, n, 8, [&](int64_t lo, int64_t hi) {
    std::vector<double> g(M), gp(M);
    for (int64_t i = lo; i < hi; ++i) {
      const double* di = dtp + i * 4 * M;
      for (int64_t j = 0; j < c; ++j) {
        table_row(cp, nint, M, x0, inv_h, xp[i * c + j], g.data(), gp.data());
        const double* r = rp + (i * c + j) * 4;
        double* dr = drp + (i * c + j) * 4;
        double acc_x = 0.0;
        for (int64_t q = 0; q < 4; ++q) {
          const double* dq = di + q * M;
          double a = 0.0, b = 0.0;
          for (int64_t m = 0; m < M; ++m) {
            a += dq[m] * g[m];
            b += dq[m] * gp[m];
          }
          dr[q] = a;
          acc_x += r[q] * b;
        }
        dxp[i * c + j] = acc_x;
      }
    }
  });
  return {dx, drr};
}

TORCH_LIBRARY(dpelt, m) {
  m.def("embedding_net(Tensor s, Tensor[] weights, Tensor[] biases, Tensor[] timesteps, int[] shortcuts, bool tangent, int block) -> Tensor[]");
  m.def("gathered_row_dot(Tensor grad, Tensor tangents, Tensor rows) -> Tensor");
  m.def("embedding_net_backward(Tensor s, Tensor[] weights, Tensor[] biases, Tensor[] timesteps, int[] shortcuts, Tensor gG, Tensor gGp, int block) -> Tensor[]");
  m.def("tabulated_embedding(Tensor x, Tensor coeffs, float x0, float h, bool tangent) -> Tensor[]");
  m.def("tabulated_contraction(Tensor x, Tensor rr, Tensor coeffs, float x0, float h) -> Tensor");
  m.def("tabulated_contraction_backward(Tensor x, Tensor rr, Tensor coeffs, float x0, float h, Tensor dT) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(dpelt, CPU, m) {
  m.impl("embedding_net", &embedding_net);
  m.impl("gathered_row_dot", &gathered_row_dot);
  m.impl("embedding_net_backward", &embedding_net_backward);
  m.impl("tabulated_embedding", &tabulated_embedding);
  m.impl("tabulated_contraction", &tabulated_contraction);
  m.impl("tabulated_contraction_backward", &tabulated_contraction_backward);
}
