// CPU operators in MindSpore's AOT custom-operator calling convention (mindformers_ext/cpu_kernels.py).
//
// out[r, :] = w[idx[r]] @ x[r, :] for every row r: a matrix-vector product with the weight matrix that
// idx picks from a stack, read where it lies (MoE decode):
//
//   IndexedMatmul:     x (R, D) float32, w (E, O, D) float32, idx (R,) int32 in [0, E)  ->  out (R, O) float32
//   IndexedMatmulInt8: x (R, D) float32, w (E, O, D) int8, scale (E, O) float32, idx (R,)  ->  out (R, O),
//                      out[r, o] = scale[idx[r], o] * (w[idx[r], o] . x[r])  (W8A16)
//
// Rows are taken expert by expert, so a weight matrix is read once however many rows use it; each of
// its rows is multiplied with all of them while it is in the cache.
//
//   CacheWrite: cache (B, H, T, D), new (B, H, S, D) of the same dtype, slot (B,) int32  ->  done (1,) int32,
//               cache[b, h, slot[b] + j] = new[b, h, j] written into the cache input's own memory (the KV
//               cache's in-place write; the caller orders its reads of the cache after `done`).
//
//   Dequantize: values (..., D) int8, scales (..., 1) float32  ->  out (..., D) float32 = values * scales, the
//               int8 KV cache read back (a broadcasting Mul in a dynamic-shape graph takes 10x as long as a cast).
//
// The *InferShape functions give the output shape (MindSpore's C++ shape inference, which dynamic-shape
// graphs need). A nonzero return (bad shapes, an index out of range) fails the graph call.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

// Four output rows at a time: four independent sums, so the vectorised loop (-O3 -ffast-math) is not
// bound by the latency of one accumulator.
template <typename W>
static inline void dot4(const W *a, int64_t stride, const float *b, int64_t n, float *out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  const W *a1 = a + stride, *a2 = a + 2 * stride, *a3 = a + 3 * stride;
  for (int64_t i = 0; i < n; ++i) {
    s0 += static_cast<float>(a[i]) * b[i];
    s1 += static_cast<float>(a1[i]) * b[i];
    s2 += static_cast<float>(a2[i]) * b[i];
    s3 += static_cast<float>(a3[i]) * b[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

template <typename W>
static inline float dot(const W *a, const float *b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += static_cast<float>(a[i]) * b[i];
  return s;
}

// scale: (E, O), one per expert and output row; null for float weights
template <typename W>
static int Run(const float *x, const W *w, const float *scale, const int32_t *idx, float *out, int64_t rows,
               int64_t depth, int64_t experts, int64_t width) {
  std::vector<std::vector<int64_t>> by_expert(experts);
  for (int64_t r = 0; r < rows; ++r) {
    if (idx[r] < 0 || idx[r] >= experts) return 1;
    by_expert[idx[r]].push_back(r);
  }
  for (int64_t e = 0; e < experts; ++e) {
    const std::vector<int64_t> &mine = by_expert[e];
    if (mine.empty()) continue;
    const W *we = w + e * width * depth;
    const float *se = scale == nullptr ? nullptr : scale + e * width;
    int64_t o = 0;
    for (; o + 4 <= width; o += 4) {  // four weight rows stay in cache while every row of x uses them
      for (int64_t r : mine) {
        float *dst = out + r * width + o;
        dot4(we + o * depth, depth, x + r * depth, depth, dst);
        if (se != nullptr) dst[0] *= se[o], dst[1] *= se[o + 1], dst[2] *= se[o + 2], dst[3] *= se[o + 3];
      }
    }
    for (; o < width; ++o) {
      for (int64_t r : mine) {
        out[r * width + o] = (se == nullptr ? 1.f : se[o]) * dot(we + o * depth, x + r * depth, depth);
      }
    }
  }
  return 0;
}

extern "C" int IndexedMatmul(int nparam, void **params, int *ndims, int64_t **shapes, const char ** /*dtypes*/,
                             void * /*stream*/, void * /*extra*/) {
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 3 || ndims[2] != 1 || ndims[3] != 2) return 1;
  if (shapes[1][2] != shapes[0][1] || shapes[2][0] != shapes[0][0]) return 1;
  return Run(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]), nullptr,
             static_cast<const int32_t *>(params[2]), static_cast<float *>(params[3]), shapes[0][0], shapes[0][1],
             shapes[1][0], shapes[1][1]);
}

extern "C" int IndexedMatmulInt8(int nparam, void **params, int *ndims, int64_t **shapes, const char ** /*dtypes*/,
                                 void * /*stream*/, void * /*extra*/) {
  if (nparam != 5 || ndims[0] != 2 || ndims[1] != 3 || ndims[2] != 2 || ndims[3] != 1 || ndims[4] != 2) return 1;
  if (shapes[1][2] != shapes[0][1] || shapes[2][0] != shapes[1][0] || shapes[2][1] != shapes[1][1] ||
      shapes[3][0] != shapes[0][0])
    return 1;
  return Run(static_cast<const float *>(params[0]), static_cast<const int8_t *>(params[1]),
             static_cast<const float *>(params[2]), static_cast<const int32_t *>(params[3]),
             static_cast<float *>(params[4]), shapes[0][0], shapes[0][1], shapes[1][0], shapes[1][1]);
}

// Bytes per element of the cache dtypes CacheWrite is registered for (cpu_kernels.cache_write_op), else 0.
static int64_t ElementSize(const char *dtype) {
  const std::string name(dtype);
  if (name == "float32") return 4;
  if (name == "float16" || name == "bfloat16") return 2;
  if (name == "int8") return 1;
  return 0;
}

extern "C" int CacheWrite(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void * /*stream*/, void * /*extra*/) {
  if (nparam != 4 || ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 1) return 1;
  const int64_t *cache = shapes[0], *add = shapes[1];
  const int64_t batch = cache[0], heads = cache[1], capacity = cache[2], seq = add[2];
  const int64_t bytes = ElementSize(dtypes[0]) * cache[3];
  if (bytes == 0 || std::string(dtypes[0]) != dtypes[1] || add[0] != batch || add[1] != heads ||
      add[3] != cache[3] || shapes[2][0] != batch)
    return 1;
  char *dst = static_cast<char *>(params[0]);
  const char *src = static_cast<const char *>(params[1]);
  const int32_t *slot = static_cast<const int32_t *>(params[2]);
  for (int64_t b = 0; b < batch; ++b) {
    if (slot[b] < 0 || slot[b] + seq > capacity) return 2;  // before any write: a failed call changes nothing
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      std::memcpy(dst + ((b * heads + h) * capacity + slot[b]) * bytes, src + (b * heads + h) * seq * bytes,
                  seq * bytes);
    }
  }
  *static_cast<int32_t *>(params[3]) = 0;
  return 0;
}

extern "C" int Dequantize(int nparam, void **params, int *ndims, int64_t **shapes, const char ** /*dtypes*/,
                          void * /*stream*/, void * /*extra*/) {
  if (nparam != 3 || ndims[0] < 1 || ndims[1] != ndims[0] || shapes[1][ndims[1] - 1] != 1) return 1;
  int64_t rows = 1;
  for (int i = 0; i + 1 < ndims[0]; ++i) {
    if (shapes[1][i] != shapes[0][i]) return 1;
    rows *= shapes[0][i];
  }
  const int64_t depth = shapes[0][ndims[0] - 1];
  const int8_t *values = static_cast<const int8_t *>(params[0]);
  const float *scales = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = scales[r];
    for (int64_t i = 0; i < depth; ++i) out[r * depth + i] = scale * static_cast<float>(values[r * depth + i]);
  }
  return 0;
}

class AotExtra;

extern "C" std::vector<int64_t> IndexedMatmulInferShape(int * /*ndims*/, int64_t **shapes, AotExtra * /*extra*/) {
  return {shapes[0][0], shapes[1][1]};
}

extern "C" std::vector<int64_t> IndexedMatmulInt8InferShape(int *ndims, int64_t **shapes, AotExtra *extra) {
  return IndexedMatmulInferShape(ndims, shapes, extra);
}

extern "C" std::vector<int64_t> CacheWriteInferShape(int * /*ndims*/, int64_t ** /*shapes*/, AotExtra * /*extra*/) {
  return {1};
}

extern "C" std::vector<int64_t> DequantizeInferShape(int *ndims, int64_t **shapes, AotExtra * /*extra*/) {
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
