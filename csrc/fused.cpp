// tokdistill_fast._fused_ext: RMSNorm and rotary embeddings, forward and backward, one CPU kernel each, in bf16 or
// fp32.
//
// At the student's pass sizes (about 120 rows of 576) each PyTorch element-wise operator is a pass over memory of
// tens of microseconds, and a decoder layer's two RMSNorms and its queries' and keys' rotations are some sixty of
// them forward and backward; here each is one or two passes over its rows, in fp32 with bf16 rounding where the Hugging Face modules round, so results
// equal theirs up to fp32 summation order (SmolLM2's shapes: 210 against 380 us forward and backward). A SwiGLU
// kernel was slower than PyTorch's two threaded operators (its exponential) and is not here. Arguments are contiguous buffers' addresses (tensor.data_ptr(); bf16 as
// uint16, statistics fp32), sizes and the element type (fp32 or bf16), checked by the Python side (tokdistill_fast/modeling/fused.py), which also
// holds the PyTorch references these are tested against. Loops compile for AVX-512, AVX2 and a baseline, chosen
// at load time (target_clones; helpers are inlined into each).
#include <pybind11/pybind11.h>

#include <cmath>
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

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_fused_ext, m) {
  m.doc() = "RMSNorm and rotary embeddings, forward and backward, in bf16 or fp32 on CPU (csrc/fused.cpp)";
  m.def("rms_norm_fwd", [](uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t d, float eps,
                           int offset, bool fp32) {
    pybind11::gil_scoped_release release;
    if (fp32) {
      rms_norm_fwd_f32(ptr<const float>(x), ptr<const float>(w), ptr<float>(y), ptr<float>(rstd), rows, d, eps,
                       offset);
    } else {
      rms_norm_fwd_bf16(ptr<const bf16>(x), ptr<const bf16>(w), ptr<bf16>(y), ptr<float>(rstd), rows, d, eps, offset);
    }
  });
  m.def("rms_norm_bwd", [](uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx, int64_t rows,
                           int64_t d, int offset, bool fp32) {
    pybind11::gil_scoped_release release;
    if (fp32) {
      rms_norm_bwd_f32(ptr<const float>(dy), ptr<const float>(x), ptr<const float>(w), ptr<const float>(rstd),
                       ptr<float>(dx), rows, d, offset);
    } else {
      rms_norm_bwd_bf16(ptr<const bf16>(dy), ptr<const bf16>(x), ptr<const bf16>(w), ptr<const float>(rstd),
                        ptr<bf16>(dx), rows, d, offset);
    }
  });
  m.def("rotary", [](uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t y, int64_t rows, int64_t heads, int64_t hd,
                     bool backward, bool fp32) {
    pybind11::gil_scoped_release release;
    if (fp32) {
      rotary_f32(ptr<const float>(x), ptr<const float>(cos), ptr<const float>(sin), ptr<float>(y), rows, heads, hd,
                 backward);
    } else {
      rotary_bf16(ptr<const bf16>(x), ptr<const bf16>(cos), ptr<const bf16>(sin), ptr<bf16>(y), rows, heads, hd,
                  backward);
    }
  });
}
