// out[r, :] = w[idx[r]] @ x[r, :] for every row r: a matrix-vector product with the weight matrix that
// idx picks from a stack, read where it lies (MindSpore's AOT custom-operator calling convention).
//
//   x (R, D) float32, w (E, O, D) float32, idx (R,) int32 in [0, E)  ->  out (R, O) float32
//
// Rows are taken expert by expert, so a weight matrix is read once however many rows use it; each of
// its rows is multiplied with all of them while it is in the cache. IndexedMatmulInferShape gives the
// output shape (MindSpore's C++ shape inference, which dynamic-shape graphs need).
#include <cstdint>
#include <vector>

static inline float dot(const float *a, const float *b, int64_t n) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

extern "C" int IndexedMatmul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)dtypes;
  (void)stream;
  (void)extra;
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 3 || ndims[2] != 1 || ndims[3] != 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const int32_t *idx = static_cast<const int32_t *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  const int64_t rows = shapes[0][0], depth = shapes[0][1];
  const int64_t experts = shapes[1][0], width = shapes[1][1];
  if (shapes[1][2] != depth || shapes[2][0] != rows) return 1;
  std::vector<std::vector<int64_t>> by_expert(experts);
  for (int64_t r = 0; r < rows; ++r) {
    if (idx[r] < 0 || idx[r] >= experts) return 1;
    by_expert[idx[r]].push_back(r);
  }
  for (int64_t e = 0; e < experts; ++e) {
    const std::vector<int64_t> &mine = by_expert[e];
    if (mine.empty()) continue;
    const float *we = w + e * width * depth;
    for (int64_t o = 0; o < width; ++o) {
      const float *row = we + o * depth;
      for (int64_t r : mine) out[r * width + o] = dot(row, x + r * depth, depth);
    }
  }
  return 0;
}

class AotExtra;

extern "C" std::vector<int64_t> IndexedMatmulInferShape(int *ndims, int64_t **shapes, AotExtra *extra) {
  (void)ndims;
  (void)extra;
  return {shapes[0][0], shapes[1][1]};
}
