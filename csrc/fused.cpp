// tokdistill_fast._fused_ext: RMSNorm and rotary embeddings, forward and backward, one CPU kernel each, in bf16.
//
// At the student's pass sizes (about 120 rows of 576) each PyTorch element-wise operator is a pass over memory of
// tens of microseconds, and a decoder layer's two RMSNorms and its queries' and keys' rotations are some sixty of
// them forward and backward; here each is one or two passes over its rows, in fp32 with bf16 rounding where the Hugging Face modules round, so results
// equal theirs up to fp32 summation order (SmolLM2's shapes: 210 against 380 us forward and backward). A SwiGLU
// kernel was slower than PyTorch's two threaded operators (its exponential) and is not here. Arguments are contiguous buffers' addresses (tensor.data_ptr(); bf16 as
// uint16, statistics fp32) and sizes, checked by the Python side (tokdistill_fast/modeling/fused.py), which also
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

inline float to_f32(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline bf16 to_bf16(float f) {  // round to nearest even, as PyTorch converts; a NaN stays a quiet NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(((u & 0x7fffffffu) > 0x7f800000u ? (u | 0x400000u) : rounded) >> 16);
}

inline float rbf(float f) { return to_f32(to_bf16(f)); }  // f rounded to bf16, as a float

// y = norm(x) * w per row of d: offset 0 rounds x * rstd to bf16 then multiplies by w in bf16 (Llama, Qwen2,
// Mistral); offset 1 multiplies by (1 + w) in fp32 and rounds once (Gemma). rstd [rows] fp32 is kept for backward.
CLONES void rms_norm_fwd_rows(const bf16* x, const bf16* w, bf16* y, float* rstd, int64_t rows, int64_t d, float eps,
                              int offset) {
  for (int64_t i = 0; i < rows; ++i) {
    const bf16* xi = x + i * d;
    bf16* yi = y + i * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += to_f32(xi[j]) * to_f32(xi[j]);
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    rstd[i] = r;
    if (offset) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yi[j] = to_bf16(to_f32(xi[j]) * r * (1.0f + to_f32(w[j])));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yi[j] = to_bf16(to_f32(w[j]) * rbf(to_f32(xi[j]) * r));
    }
  }
}

// The gradient at the normalized row: dy * w rounded to bf16 where autograd rounds it (OFFSET 0), or dy * (1 + w).
template <int OFFSET>
__attribute__((always_inline)) inline float norm_grad(bf16 dy, bf16 w) {
  return OFFSET ? to_f32(dy) * (1.0f + to_f32(w)) : rbf(to_f32(dy) * to_f32(w));
}

// dx of the above given dy: dx = rstd * (g - xhat * mean(g * xhat)), xhat = x * rstd, g = norm_grad(dy, w).
template <int OFFSET>
__attribute__((always_inline)) inline void rms_norm_bwd_row(const bf16* dy, const bf16* x, const bf16* w, float r, bf16* dx, int64_t d) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < d; ++j) dot += norm_grad<OFFSET>(dy[j], w[j]) * to_f32(x[j]);
  const float c = dot * r * r / static_cast<float>(d);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) dx[j] = to_bf16(r * (norm_grad<OFFSET>(dy[j], w[j]) - to_f32(x[j]) * c));
}

CLONES void rms_norm_bwd_rows(const bf16* dy, const bf16* x, const bf16* w, const float* rstd, bf16* dx, int64_t rows,
                              int64_t d, int offset) {
  for (int64_t i = 0; i < rows; ++i) {
    if (offset) {
      rms_norm_bwd_row<1>(dy + i * d, x + i * d, w, rstd[i], dx + i * d, d);
    } else {
      rms_norm_bwd_row<0>(dy + i * d, x + i * d, w, rstd[i], dx + i * d, d);
    }
  }
}

// Rotary embedding of x [rows, heads, hd] by cos/sin [rows, hd], as Hugging Face's apply_rotary_pos_emb rounds it:
// y = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = (-x[half:], x[:half]). SIGN -1 gives
// the input gradient from the output's (the transposed rotation, rounded where autograd rounds).
template <int SIGN>
__attribute__((always_inline)) inline void rotary_rows(const bf16* x, const bf16* cos, const bf16* sin, bf16* y,
                                                       int64_t rows, int64_t heads, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const bf16* c = cos + r * hd;
    const bf16* s = sin + r * hd;
    for (int64_t h = 0; h < heads; ++h) {
      const bf16* xi = x + (r * heads + h) * hd;
      bf16* yi = y + (r * heads + h) * hd;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = to_f32(xi[i]), b = to_f32(xi[i + half]);
        if (SIGN > 0) {
          yi[i] = to_bf16(rbf(a * to_f32(c[i])) + rbf(-b * to_f32(s[i])));
          yi[i + half] = to_bf16(rbf(b * to_f32(c[i + half])) + rbf(a * to_f32(s[i + half])));
        } else {
          yi[i] = to_bf16(rbf(a * to_f32(c[i])) + rbf(b * to_f32(s[i + half])));
          yi[i + half] = to_bf16(rbf(b * to_f32(c[i + half])) - rbf(a * to_f32(s[i])));
        }
      }
    }
  }
}

CLONES void rotary_fwd_rows(const bf16* x, const bf16* cos, const bf16* sin, bf16* y, int64_t rows, int64_t heads,
                            int64_t hd) {
  rotary_rows<1>(x, cos, sin, y, rows, heads, hd);
}

CLONES void rotary_bwd_rows(const bf16* dy, const bf16* cos, const bf16* sin, bf16* dx, int64_t rows, int64_t heads,
                            int64_t hd) {
  rotary_rows<-1>(dy, cos, sin, dx, rows, heads, hd);
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_fused_ext, m) {
  m.doc() = "RMSNorm and rotary embeddings, forward and backward, in bf16 on CPU (csrc/fused.cpp)";
  m.def("rms_norm_fwd", [](uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t d, float eps,
                           int offset) {
    pybind11::gil_scoped_release release;
    rms_norm_fwd_rows(ptr<const bf16>(x), ptr<const bf16>(w), ptr<bf16>(y), ptr<float>(rstd), rows, d, eps, offset);
  });
  m.def("rms_norm_bwd", [](uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx, int64_t rows,
                           int64_t d, int offset) {
    pybind11::gil_scoped_release release;
    rms_norm_bwd_rows(ptr<const bf16>(dy), ptr<const bf16>(x), ptr<const bf16>(w), ptr<const float>(rstd),
                      ptr<bf16>(dx), rows, d, offset);
  });
  m.def("rotary", [](uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t y, int64_t rows, int64_t heads, int64_t hd,
                     bool backward) {
    pybind11::gil_scoped_release release;
    (backward ? rotary_bwd_rows : rotary_fwd_rows)(ptr<const bf16>(x), ptr<const bf16>(cos), ptr<const bf16>(sin),
                                                   ptr<bf16>(y), rows, heads, hd);
  });
}
