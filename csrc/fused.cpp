// tokdistill_fast._fused_ext: RMSNorm, rotary embeddings, the gated MLP activation (SwiGLU, GeGLU) and causal
// attention over packed sequences, forward and backward, one CPU kernel each, in bf16 or fp32; and the held-out
// measure's comparison of two rows of logits (KL and top-1), fp32.
//
// At the student's pass sizes (about 120-240 rows of 576) each PyTorch operator is a pass over memory of tens of
// microseconds, and a decoder layer runs some two hundred of them forward and backward outside its products; here
// each piece is one or two passes over its rows, in fp32 with bf16 rounding where the Hugging Face modules round,
// so results equal theirs up to fp32 summation order. The activation's exponential is a polynomial that
// vectorizes (libm's expf does not). Arguments are contiguous buffers' addresses (tensor.data_ptr(); bf16 as
// uint16, statistics fp32, indices int64), sizes and the element type (fp32 or bf16), checked by the Python side
// (tokdistill_fast/modeling/fused.py), which also holds the PyTorch references these are tested against. Loops
// compile for AVX-512, AVX2 and a baseline, chosen at load time (target_clones; helpers are inlined into each);
// rows (attention: sequences and key/value heads) are split over PyTorch's OpenMP threads (the same libgomp and
// pool), each computed by one thread, so results do not depend on the thread count.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdint>
#include <cstring>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

using bf16 = uint16_t;

inline float load(float f) { return f; }

inline float load(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T store(float f);

template <>
inline float store<float>(float f) {
  return f;
}

template <>
inline bf16 store<bf16>(float f) {  // round to nearest even, as PyTorch converts; a NaN stays a quiet NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(((u & 0x7fffffffu) > 0x7f800000u ? (u | 0x400000u) : rounded) >> 16);
}

template <typename T>
inline float rnd(float f) {  // f rounded to T, as a float: where the Hugging Face modules round to the model dtype
  return load(store<T>(f));
}

#define INLINE __attribute__((always_inline)) inline

// y = norm(x) * w per row of d: offset 0 rounds x * rstd to T then multiplies by w in T (Llama, Qwen2, Mistral);
// offset 1 multiplies by (1 + w) in fp32 and rounds once (Gemma). rstd [rows] fp32 is kept for backward.
template <typename T>
INLINE void rms_norm_fwd(const T* x, const T* w, T* y, float* rstd, int64_t rows, int64_t d, float eps, int offset) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* xi = x + i * d;
    T* yi = y + i * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += load(xi[j]) * load(xi[j]);
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    rstd[i] = r;
    if (offset) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yi[j] = store<T>(load(xi[j]) * r * (1.0f + load(w[j])));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yi[j] = store<T>(load(w[j]) * rnd<T>(load(xi[j]) * r));
    }
  }
}

// The gradient at the normalized row: dy * w rounded to T where autograd rounds it (OFFSET 0), or dy * (1 + w).
template <int OFFSET, typename T>
INLINE float norm_grad(T dy, T w) {
  return OFFSET ? load(dy) * (1.0f + load(w)) : rnd<T>(load(dy) * load(w));
}

// dx of the above given dy: dx = rstd * (g - xhat * mean(g * xhat)), xhat = x * rstd, g = norm_grad(dy, w).
template <int OFFSET, typename T>
INLINE void rms_norm_bwd_row(const T* dy, const T* x, const T* w, float r, T* dx, int64_t d) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < d; ++j) dot += norm_grad<OFFSET>(dy[j], w[j]) * load(x[j]);
  const float c = dot * r * r / static_cast<float>(d);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) dx[j] = store<T>(r * (norm_grad<OFFSET>(dy[j], w[j]) - load(x[j]) * c));
}

template <typename T>
INLINE void rms_norm_bwd(const T* dy, const T* x, const T* w, const float* rstd, T* dx, int64_t rows, int64_t d,
                         int offset) {
  for (int64_t i = 0; i < rows; ++i) {
    if (offset) {
      rms_norm_bwd_row<1>(dy + i * d, x + i * d, w, rstd[i], dx + i * d, d);
    } else {
      rms_norm_bwd_row<0>(dy + i * d, x + i * d, w, rstd[i], dx + i * d, d);
    }
  }
}

// Rotary embedding of x [rows, heads, hd] by cos/sin [rows, hd], as Hugging Face's apply_rotary_pos_emb rounds it:
// y = T(T(x * cos) + T(rotate_half(x) * sin)), rotate_half(x) = (-x[half:], x[:half]). backward: the input gradient
// from the output's (the transposed rotation, rounded where autograd rounds).
template <typename T>
INLINE void rotary(const T* x, const T* cos, const T* sin, T* y, int64_t rows, int64_t heads, int64_t hd,
                   bool backward) {
  const int64_t half = hd / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * hd;
    const T* s = sin + r * hd;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xi = x + (r * heads + h) * hd;
      T* yi = y + (r * heads + h) * hd;
      if (backward) {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = load(xi[i]), b = load(xi[i + half]);
          yi[i] = store<T>(rnd<T>(a * load(c[i])) + rnd<T>(b * load(s[i + half])));
          yi[i + half] = store<T>(rnd<T>(b * load(c[i + half])) - rnd<T>(a * load(s[i])));
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = load(xi[i]), b = load(xi[i + half]);
          yi[i] = store<T>(rnd<T>(a * load(c[i])) + rnd<T>(-b * load(s[i])));
          yi[i + half] = store<T>(rnd<T>(b * load(c[i + half])) + rnd<T>(a * load(s[i + half])));
        }
      }
    }
  }
}

// e^x in fp32 for the activations: Cephes' expf polynomial on x - n ln2, scaled by 2^n through the exponent bits
// (relative error ~1e-7). x is clamped to [-87, 87], where e^x stays a normal float, on its bits (an integer min
// of the magnitude): with a float select GCC computes the clamped branch's constant result on every lane, whose
// products with the gate are denormal (4x slower), and fmin/fmax do not vectorize.
INLINE float exp_poly(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x), magnitude = bits & 0x7fffffffu;
  x = __builtin_bit_cast(float, (magnitude < 0x42ae0000u ? magnitude : 0x42ae0000u) | (bits & 0x80000000u));
  const float n = std::floor(x * 1.44269504089f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

// The gate's activation is a = g s with s a sigmoid: ACT 0 SiLU, s = sigmoid(g) (Llama, Qwen, Mistral); 1 GELU with
// PyTorch's tanh approximation (Gemma), 0.5 g (1 + tanh(z)) = g sigmoid(2z), written with the sigmoid so that the
// far negative side keeps its relative precision (1 + tanh(z) cancels there). This returns s.
template <int ACT>
INLINE float gate_sigmoid(float g) {
  const float z = ACT == 0 ? g : 2.0f * 0.7978845608028654f * (g + 0.044715f * g * g * g);
  return 1.0f / (1.0f + exp_poly(-z));
}

// da/dg from g and its sigmoid s.
template <int ACT>
INLINE float gate_derivative(float g, float s) {
  if (ACT == 0) return s * (1.0f + g * (1.0f - s));
  return s + 2.0f * g * s * (1.0f - s) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * g * g);
}

// The gated MLP's middle, h = a(gate) * up, from one [rows, 2 * inter] buffer holding gate then up per row (the two
// projections as one product); rounded where the Hugging Face module rounds (a(gate), then the product).
// backward: d[gate, up] from dh into the same layout.
template <int ACT, typename T>
INLINE void gated(const T* gu, const T* dh, T* out, int64_t rows, int64_t inter, bool backward) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* g = gu + i * 2 * inter;
    const T* u = g + inter;
    if (backward) {
      const T* dhi = dh + i * inter;
      T* dg = out + i * 2 * inter;
      T* du = dg + inter;
#pragma omp simd
      for (int64_t j = 0; j < inter; ++j) {
        const float x = load(g[j]), s = gate_sigmoid<ACT>(x);
        dg[j] = store<T>(rnd<T>(load(dhi[j]) * load(u[j])) * gate_derivative<ACT>(x, s));
        du[j] = store<T>(load(dhi[j]) * rnd<T>(x * s));
      }
    } else {
      T* h = out + i * inter;
#pragma omp simd
      for (int64_t j = 0; j < inter; ++j) {
        const float x = load(g[j]);
        h[j] = store<T>(rnd<T>(x * gate_sigmoid<ACT>(x)) * load(u[j]));
      }
    }
  }
}

// Causal attention over packed sequences (the packed passes' attention on CPU), forward and backward, bottom-right
// aligned per sequence, grouped-query heads. Sequence b has the queries cu_q[b]..cu_q[b+1]-1 (rows of q
// [Nq, H, hd]) and nk = cu_k[b+1] - cu_k[b] keys, key t at row key_row[cu_k[b] + t] of cat(context, own) (context
// [n_ctx, Hkv, hd], own [*, Hkv, hd]; values alike); its query i sees keys t <= i + nk - nq. fp32 arithmetic, as the
// PyTorch dense path (attention.DenseAttention) computes it. A work item is one sequence and key/value head: its
// keys and values converted to fp32 once, its group's query heads attended, its own keys' gradients written by it
// alone (context rows are constants).
struct Attention {
  const void *q, *k, *v, *k_ctx, *v_ctx;
  const int64_t *key_row, *cu_q, *cu_k;
  int64_t n_ctx, heads, kv_heads, hd;
  float scale;
  void* out;     // forward: out [Nq, H, hd]; backward: dq
  float* lse;    // [Nq, H]: written forward, read backward
  const void* dout;  // backward: the output's gradient [Nq, H, hd]
  void *dk, *dv;     // backward: own rows' gradients [N own, Hkv, hd], rows not written left as they are
};

// Keys or values of item (b, h) into rows [nk, hd] of fp32.
template <typename T>
INLINE void gather_keys(const T* own, const T* ctx, const Attention& a, int64_t first, int64_t nk, int64_t h,
                        float* rows) {
  for (int64_t t = 0; t < nk; ++t) {
    const int64_t r = a.key_row[first + t];
    const T* src = r < a.n_ctx ? ctx + (r * a.kv_heads + h) * a.hd : own + ((r - a.n_ctx) * a.kv_heads + h) * a.hd;
    float* dst = rows + t * a.hd;
#pragma omp simd
    for (int64_t d = 0; d < a.hd; ++d) dst[d] = load(src[d]);
  }
}

// Scores s[t] = scale * q . K[t] of the n keys a query sees.
INLINE void scores(const float* q, const float* K, int64_t n, int64_t hd, float scale, float* s) {
  for (int64_t t = 0; t < n; ++t) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hd; ++d) dot += q[d] * K[t * hd + d];
    s[t] = dot * scale;
  }
}

// Items [begin, begin + count) of the forward (backward: BACKWARD true); scratch: per-thread buffers.
template <bool BACKWARD, typename T>
INLINE void attention(const Attention& a, int64_t begin, int64_t count, int64_t max_k) {
  const int64_t hd = a.hd, groups = a.heads / a.kv_heads;
  std::vector<float> K(max_k * hd), V(max_k * hd), dK(BACKWARD ? max_k * hd : 0), dV(BACKWARD ? max_k * hd : 0);
  std::vector<float> s(max_k), dp(max_k), qf(hd), gf(hd), acc(hd);
  const T* q = static_cast<const T*>(a.q);
  for (int64_t item = begin; item < begin + count; ++item) {
    const int64_t b = item / a.kv_heads, h = item % a.kv_heads;
    const int64_t q0 = a.cu_q[b], nq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], nk = a.cu_k[b + 1] - k0;
    gather_keys(static_cast<const T*>(a.k), static_cast<const T*>(a.k_ctx), a, k0, nk, h, K.data());
    gather_keys(static_cast<const T*>(a.v), static_cast<const T*>(a.v_ctx), a, k0, nk, h, V.data());
    if (BACKWARD) {
      std::fill(dK.begin(), dK.begin() + nk * hd, 0.0f);
      std::fill(dV.begin(), dV.begin() + nk * hd, 0.0f);
    }
    for (int64_t hq = h * groups; hq < (h + 1) * groups; ++hq) {
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t row = (q0 + i) * a.heads + hq, n = std::min(nk, i + nk - nq + 1);
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) qf[d] = load(q[row * hd + d]);
        scores(qf.data(), K.data(), n, hd, a.scale, s.data());
        std::fill(acc.begin(), acc.end(), 0.0f);
        if (!BACKWARD) {  // p = softmax(s); out = p V; lse = log sum exp(s)
          const float most = *std::max_element(s.begin(), s.begin() + n);
          float total = 0.0f;
          for (int64_t t = 0; t < n; ++t) total += (s[t] = std::exp(s[t] - most));
          for (int64_t t = 0; t < n; ++t) {
            const float p = s[t] / total;
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) acc[d] += p * V[t * hd + d];
          }
          T* out = static_cast<T*>(a.out) + row * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) out[d] = store<T>(acc[d]);
          a.lse[row] = most + std::log(total);
          continue;
        }
        // p from lse; dp = dout . V; ds = p (dp - sum p dp) scale; dq = ds K; dK += ds q; dV += p dout.
        const T* g = static_cast<const T*>(a.dout) + row * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) gf[d] = load(g[d]);
        float mean = 0.0f;
        for (int64_t t = 0; t < n; ++t) {
          s[t] = std::exp(s[t] - a.lse[row]);
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < hd; ++d) dot += gf[d] * V[t * hd + d];
          dp[t] = dot;
          mean += s[t] * dot;
        }
        for (int64_t t = 0; t < n; ++t) {
          const float p = s[t], ds = p * (dp[t] - mean) * a.scale;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) {
            acc[d] += ds * K[t * hd + d];
            dK[t * hd + d] += ds * qf[d];
            dV[t * hd + d] += p * gf[d];
          }
        }
        T* dq = static_cast<T*>(a.out) + row * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) dq[d] = store<T>(acc[d]);
      }
    }
    if (BACKWARD) {
      for (int64_t t = 0; t < nk; ++t) {
        const int64_t r = a.key_row[k0 + t];
        if (r < a.n_ctx) continue;
        T* dk = static_cast<T*>(a.dk) + ((r - a.n_ctx) * a.kv_heads + h) * hd;
        T* dv = static_cast<T*>(a.dv) + ((r - a.n_ctx) * a.kv_heads + h) * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) {
          dk[d] = store<T>(dK[t * hd + d]);
          dv[d] = store<T>(dV[t * hd + d]);
        }
      }
    }
  }
}

// The entry points, one per kernel and element type, each compiled per target (templates cannot be cloned).
CLONES void rms_norm_fwd_bf16(const bf16* x, const bf16* w, bf16* y, float* rstd, int64_t rows, int64_t d, float eps,
                              int offset) {
  rms_norm_fwd(x, w, y, rstd, rows, d, eps, offset);
}
CLONES void rms_norm_fwd_f32(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t d,
                             float eps, int offset) {
  rms_norm_fwd(x, w, y, rstd, rows, d, eps, offset);
}
CLONES void rms_norm_bwd_bf16(const bf16* dy, const bf16* x, const bf16* w, const float* rstd, bf16* dx, int64_t rows,
                              int64_t d, int offset) {
  rms_norm_bwd(dy, x, w, rstd, dx, rows, d, offset);
}
CLONES void rms_norm_bwd_f32(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                             int64_t rows, int64_t d, int offset) {
  rms_norm_bwd(dy, x, w, rstd, dx, rows, d, offset);
}
CLONES void rotary_bf16(const bf16* x, const bf16* cos, const bf16* sin, bf16* y, int64_t rows, int64_t heads,
                        int64_t hd, bool backward) {
  rotary(x, cos, sin, y, rows, heads, hd, backward);
}
CLONES void rotary_f32(const float* x, const float* cos, const float* sin, float* y, int64_t rows, int64_t heads,
                       int64_t hd, bool backward) {
  rotary(x, cos, sin, y, rows, heads, hd, backward);
}
CLONES void gated_bf16(const bf16* gu, const bf16* dh, bf16* out, int64_t rows, int64_t inter, int act,
                       bool backward) {
  if (act) return gated<1>(gu, dh, out, rows, inter, backward);
  gated<0>(gu, dh, out, rows, inter, backward);
}
CLONES void gated_f32(const float* gu, const float* dh, float* out, int64_t rows, int64_t inter, int act,
                      bool backward) {
  if (act) return gated<1>(gu, dh, out, rows, inter, backward);
  gated<0>(gu, dh, out, rows, inter, backward);
}

CLONES void attention_bf16(const Attention& a, int64_t begin, int64_t count, int64_t max_k, bool backward) {
  if (backward) return attention<true, bf16>(a, begin, count, max_k);
  attention<false, bf16>(a, begin, count, max_k);
}
CLONES void attention_f32(const Attention& a, int64_t begin, int64_t count, int64_t max_k, bool backward) {
  if (backward) return attention<true, float>(a, begin, count, max_k);
  attention<false, float>(a, begin, count, max_k);
}

// Held-out scoring (evaluation/heldout.py): per row of teacher logits t [V] and student logits s (row stride W >= V,
// its first V columns the original vocabulary's), fp32: KL(softmax(t) || softmax(s[:V])) and the first largest
// column of each, in two passes over the row instead of the dozen that PyTorch's log_softmax, exp, products and
// max make over [rows, 262k] temporaries. KL = sum p_t (t - s) - lse(t) + lse(s), its sums in double.
CLONES void logit_stats_rows(const float* t, const float* s, int64_t rows, int64_t V, int64_t W, double* kl,
                             int64_t* top_t, int64_t* top_s) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* ti = t + i * V;
    const float* si = s + i * W;
    float mt = ti[0], ms = si[0];
#pragma omp simd reduction(max : mt, ms)
    for (int64_t j = 0; j < V; ++j) mt = std::max(mt, ti[j]), ms = std::max(ms, si[j]);
    int64_t at = V, as = V;  // the first column holding each maximum, as torch.max
    double zt = 0.0, zs = 0.0, a = 0.0;
#pragma omp simd reduction(+ : zt, zs, a) reduction(min : at, as)
    for (int64_t j = 0; j < V; ++j) {
      const float pt = exp_poly(ti[j] - mt);
      zt += pt;
      zs += exp_poly(si[j] - ms);
      a += static_cast<double>(pt) * (static_cast<double>(ti[j]) - static_cast<double>(si[j]));
      at = ti[j] == mt && j < at ? j : at;
      as = si[j] == ms && j < as ? j : as;
    }
    kl[i] = a / zt - (mt + std::log(zt)) + (ms + std::log(zs));
    top_t[i] = at;
    top_s[i] = as;
  }
}

constexpr int64_t MIN_THREAD_WORK = 16384;  // elements per thread below which a thread costs more than it saves

// f(begin, count) over row ranges, one per OpenMP thread (PyTorch's count), or one call where the work is small.
// The region calls the cloned kernels: GCC outlines an OpenMP region before it clones, so a region inside a clone
// would compile for the baseline only.
template <typename F>
void over_rows(int64_t rows, int64_t row_elems, F f) {
  const int64_t most = std::min<int64_t>(rows, rows * row_elems / MIN_THREAD_WORK);
  const int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), most));
  if (threads <= 1) {
    f(0, rows);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t begin = rows * t / n, end = rows * (t + 1) / n;
    f(begin, end - begin);
  }
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_fused_ext, m) {
  m.doc() = "RMSNorm, rotary embeddings, gated activations and packed causal attention, forward and backward, bf16 or "
            "fp32 on CPU, and held-out scoring's logit comparison (csrc/fused.cpp)";
  m.def("rms_norm_fwd", [](uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t d, float eps,
                           int offset, bool fp32) {
    pybind11::gil_scoped_release release;
    over_rows(rows, d, [&](int64_t i, int64_t n) {
      if (fp32) {
        rms_norm_fwd_f32(ptr<const float>(x) + i * d, ptr<const float>(w), ptr<float>(y) + i * d,
                         ptr<float>(rstd) + i, n, d, eps, offset);
      } else {
        rms_norm_fwd_bf16(ptr<const bf16>(x) + i * d, ptr<const bf16>(w), ptr<bf16>(y) + i * d, ptr<float>(rstd) + i,
                          n, d, eps, offset);
      }
    });
  });
  m.def("rms_norm_bwd", [](uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx, int64_t rows,
                           int64_t d, int offset, bool fp32) {
    pybind11::gil_scoped_release release;
    over_rows(rows, d, [&](int64_t i, int64_t n) {
      if (fp32) {
        rms_norm_bwd_f32(ptr<const float>(dy) + i * d, ptr<const float>(x) + i * d, ptr<const float>(w),
                         ptr<const float>(rstd) + i, ptr<float>(dx) + i * d, n, d, offset);
      } else {
        rms_norm_bwd_bf16(ptr<const bf16>(dy) + i * d, ptr<const bf16>(x) + i * d, ptr<const bf16>(w),
                          ptr<const float>(rstd) + i, ptr<bf16>(dx) + i * d, n, d, offset);
      }
    });
  });
  m.def("rotary", [](uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t y, int64_t rows, int64_t heads, int64_t hd,
                     bool backward, bool fp32) {
    pybind11::gil_scoped_release release;
    const int64_t row = heads * hd;
    over_rows(rows, row, [&](int64_t i, int64_t n) {
      if (fp32) {
        rotary_f32(ptr<const float>(x) + i * row, ptr<const float>(cos) + i * hd, ptr<const float>(sin) + i * hd,
                   ptr<float>(y) + i * row, n, heads, hd, backward);
      } else {
        rotary_bf16(ptr<const bf16>(x) + i * row, ptr<const bf16>(cos) + i * hd, ptr<const bf16>(sin) + i * hd,
                    ptr<bf16>(y) + i * row, n, heads, hd, backward);
      }
    });
  });
  m.def("gated", [](uintptr_t gu, uintptr_t dh, uintptr_t out, int64_t rows, int64_t inter, int act, bool backward,
                    bool fp32) {
    pybind11::gil_scoped_release release;
    const int64_t out_row = backward ? 2 * inter : inter;
    over_rows(rows, 2 * inter, [&](int64_t i, int64_t n) {
      if (fp32) {
        gated_f32(ptr<const float>(gu) + i * 2 * inter, backward ? ptr<const float>(dh) + i * inter : nullptr,
                  ptr<float>(out) + i * out_row, n, inter, act, backward);
      } else {
        gated_bf16(ptr<const bf16>(gu) + i * 2 * inter, backward ? ptr<const bf16>(dh) + i * inter : nullptr,
                   ptr<bf16>(out) + i * out_row, n, inter, act, backward);
      }
    });
  });
  m.def("logit_stats", [](uintptr_t t, uintptr_t s, int64_t rows, int64_t V, int64_t W, uintptr_t kl, uintptr_t top_t,
                          uintptr_t top_s) {
    pybind11::gil_scoped_release release;
    over_rows(rows, V, [&](int64_t i, int64_t n) {
      logit_stats_rows(ptr<const float>(t) + i * V, ptr<const float>(s) + i * W, n, V, W, ptr<double>(kl) + i,
                       ptr<int64_t>(top_t) + i, ptr<int64_t>(top_s) + i);
    });
  });
  m.def("attention", [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t k_ctx, uintptr_t v_ctx, uintptr_t key_row,
                        uintptr_t cu_q, uintptr_t cu_k, int64_t sequences, int64_t n_ctx, int64_t heads,
                        int64_t kv_heads, int64_t hd, int64_t max_q, int64_t max_k, float scale, uintptr_t out,
                        uintptr_t lse, uintptr_t dout, uintptr_t dk, uintptr_t dv, bool backward, bool fp32) {
    pybind11::gil_scoped_release release;
    const Attention a{ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), ptr<const void>(k_ctx),
                      ptr<const void>(v_ctx), ptr<const int64_t>(key_row), ptr<const int64_t>(cu_q),
                      ptr<const int64_t>(cu_k), n_ctx, heads, kv_heads, hd, scale, ptr<void>(out), ptr<float>(lse),
                      ptr<const void>(dout), ptr<void>(dk), ptr<void>(dv)};
    over_rows(sequences * kv_heads, heads / kv_heads * max_q * max_k * hd / 8, [&](int64_t i, int64_t n) {
      if (fp32) {
        attention_f32(a, i, n, max_k, backward);
      } else {
        attention_bf16(a, i, n, max_k, backward);
      }
    });
  });
}
