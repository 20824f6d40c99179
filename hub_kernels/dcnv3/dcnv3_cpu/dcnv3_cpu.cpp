// DCNv3 on the CPU: forward parallel over output pixels, backward parallel over (image, block of groups) pairs,
// which own disjoint slices of the value gradient (no atomics; each element sums its terms in the same order for
// any thread count). Accumulation in float (double for double).
//
// The channels of one group are contiguous (channels-last), so every sample is a short vector multiply-add. The
// loops are compiled for the common group widths (8, 16, 32, 64) with the width known, and on x86 a second time for
// AVX2/FMA, chosen at run time; other widths take the generic loop. In float with those widths the points'
// footprints are computed eight at a time (the forward's for all points, branch-free; the backward's for the points
// away from the border), which leaves the per-point work to the multiply-adds.
//
// `dcnv3_softmax_forward` takes the weights as logits and normalises each item's points by a softmax on the way in
// (as InternImage does before the original operator), so the weights are never written to memory and read back.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "dcnv3_common/dcnv3_checks.h"
#include "dcnv3_common/dcnv3_sampling.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DCNV3_X86_DISPATCH 1
#define DCNV3_AVX2 __attribute__((target("avx2,fma")))
#else
#define DCNV3_X86_DISPATCH 0
#endif

namespace {

using dcnv3::Geometry;

// DEPTH > 0: the group width, known at compile time, so per-item buffers live in registers; DEPTH == 0: any width.
template <typename acc_t, int DEPTH>
struct ChannelBuffer {
  acc_t data[DEPTH];
  explicit ChannelBuffer(int64_t) {}
  static constexpr int64_t size(int64_t) { return DEPTH; }
};

template <typename acc_t>
struct ChannelBuffer<acc_t, 0> {
  std::vector<acc_t> storage;
  acc_t* data;
  explicit ChannelBuffer(int64_t depth) : storage(depth), data(storage.data()) {}
  static int64_t size(int64_t depth) { return depth; }
};

// Pointers to the four corners of a footprint and their weights.
template <typename scalar_t, typename acc_t>
struct Corners {
  const scalar_t* pointer[4];
  acc_t weight[4];
};

// Corners of a sample near the border: those outside the map point at `zero_pixel` (zero padding, never a pixel of
// the map, so a non-finite value there cannot leak in), and the loop over corners needs no branch.
template <typename scalar_t, typename acc_t>
inline Corners<scalar_t, acc_t> corners_of(const dcnv3::Footprint<acc_t>& fp, const scalar_t* image,
                                           const scalar_t* zero_pixel, const Geometry& geo, int64_t channels) {
  Corners<scalar_t, acc_t> result;
  for (int k = 0; k < 4; ++k) {
    result.pointer[k] = dcnv3::corner_inside(geo, fp.y0, fp.x0, k)
                            ? image + dcnv3::corner_row(geo, 0, fp.y0, fp.x0, k) * channels
                            : zero_pixel;
    result.weight[k] = fp.weight[k];
  }
  return result;
}

// Per-call constants: where each sampling point sits relative to its output pixel, offset excluded. Zero-padded to
// whole vectors of 8 points for the vectorised footprints.
template <typename acc_t>
struct PointTable {
  std::vector<acc_t> dx, dy;
  explicit PointTable(const Geometry& geo) : dx(padded(geo.num_points())), dy(padded(geo.num_points())) {
    for (int p = 0; p < geo.num_points(); ++p) dcnv3::kernel_displacement(geo, p, dx[p], dy[p]);
  }
  static int64_t padded(int points) { return (points + 7) / 8 * 8; }
};

// Corners of a sample whose four neighbours all lie inside the map (x in [0, W - 1), y in [0, H - 1)), the common
// case: fixed strides, unmasked bilinear weights, no per-corner checks. Also returns the fractional position.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline Corners<scalar_t, acc_t> interior_corners(acc_t x, acc_t y,
                                                                                const scalar_t* image,
                                                                                const Geometry& geo,
                                                                                int64_t channels, acc_t& fx,
                                                                                acc_t& fy) {
  const int64_t x0 = static_cast<int64_t>(x), y0 = static_cast<int64_t>(y);
  fx = x - static_cast<acc_t>(x0);
  fy = y - static_cast<acc_t>(y0);
  const scalar_t* top_left = image + (y0 * geo.width_in + x0) * channels;
  const int64_t row = geo.width_in * channels;
  Corners<scalar_t, acc_t> corners;
  corners.pointer[0] = top_left;
  corners.pointer[1] = top_left + channels;
  corners.pointer[2] = top_left + row;
  corners.pointer[3] = top_left + row + channels;
  corners.weight[0] = (1 - fy) * (1 - fx);
  corners.weight[1] = (1 - fy) * fx;
  corners.weight[2] = fy * (1 - fx);
  corners.weight[3] = fy * fx;
  return corners;
}

// Softmax of one item's point logits into `weights`, by the PyTorch formula exp(l - max) / sum: a NaN logit, or an
// infinite largest one, makes every weight of the item NaN, as there.
template <typename scalar_t, typename acc_t>
inline void softmax_points(const scalar_t* logits, int points, acc_t* weights) {
  acc_t peak = static_cast<acc_t>(logits[0]);
  for (int p = 1; p < points; ++p) {
    const acc_t logit = static_cast<acc_t>(logits[p]);
    if (logit > peak || logit != logit) peak = logit;  // a NaN, once taken, compares false and stays
  }
  acc_t total = 0;
  for (int p = 0; p < points; ++p) total += weights[p] = std::exp(static_cast<acc_t>(logits[p]) - peak);
  for (int p = 0; p < points; ++p) weights[p] /= total;
}

// Points of one item whose footprints are computed eight at a time (kernels up to 5x5).
constexpr int kMaxVectorPoints = 32;

// Footprints of one item's points: each corner's element offset in the image and weight (bilinear weight times the
// point's mask weight; zero for a corner outside the map), so that every point with a corner in the map takes the
// same branch-free multiply-adds in the forward. A corner outside the map points at another corner of the same
// footprint inside it, a pixel the PyTorch operator reads too, so a non-finite value there spreads exactly as it
// does there. Points with no corner in the map (`outside`) read nothing and add `outside_add`: mask * 0, or NaN for
// a non-finite location. For the backward also the fractional position and whether all four corners lie inside.
struct ItemFootprints {
  alignas(32) int corner[4][kMaxVectorPoints];
  alignas(32) float weight[4][kMaxVectorPoints];
  alignas(32) int outside[kMaxVectorPoints];
  alignas(32) float outside_add[kMaxVectorPoints];
  alignas(32) float fx[kMaxVectorPoints], fy[kMaxVectorPoints];
  alignas(32) int interior[kMaxVectorPoints];
};

// Whether `item_footprints` serves this call: element offsets must fit in int.
inline bool vector_footprints_fit(const Geometry& geo) {
  return geo.num_points() <= kMaxVectorPoints && geo.height_in * geo.width_in * geo.channels() < (int64_t(1) << 31);
}

#if defined(__GNUC__)
// Eight floats as one value: one AVX register in the AVX2 build, two SSE registers otherwise.
typedef float Float8 __attribute__((vector_size(32)));
typedef int Int8 __attribute__((vector_size(32)));

inline Float8 load8(const float* pointer) {
  Float8 vector;
  __builtin_memcpy(&vector, pointer, sizeof(vector));
  return vector;
}

inline void store8(float* pointer, Float8 vector) { __builtin_memcpy(pointer, &vector, sizeof(vector)); }

// The four horizontal sums of a, b, c, d by a pairwise-add tree (as vhaddps does), instead of four serial chains.
__attribute__((always_inline)) inline void horizontal_sums(Float8 a, Float8 b, Float8 c, Float8 d, float sums[4]) {
  const Int8 even = {0, 2, 8, 10, 4, 6, 12, 14}, odd = {1, 3, 9, 11, 5, 7, 13, 15};
  const Float8 ab = __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
  const Float8 cd = __builtin_shuffle(c, d, even) + __builtin_shuffle(c, d, odd);
  const Float8 abcd = __builtin_shuffle(ab, cd, even) + __builtin_shuffle(ab, cd, odd);
  for (int k = 0; k < 4; ++k) sums[k] = abcd[k] + abcd[k + 4];
}

inline void store8(int* pointer, Int8 vector) { __builtin_memcpy(pointer, &vector, sizeof(vector)); }

// Fills `footprints` for the item's `points` points (offsets interleaved x, y), eight per step: per-point scalar work
// (location, floor, bounds, weights) otherwise costs more than the point's vector multiply-adds. The points' weights
// are `point_mask` times `mask_scale`; without `point_mask` the weights are the plain bilinear ones.
__attribute__((always_inline)) inline void item_footprints(const float* point_offset, const float* point_mask,
                                                           float mask_scale, int points, float center_x,
                                                           float center_y,
                                                           const PointTable<float>& table, const Geometry& geo,
                                                           ItemFootprints& footprints) {
  const Int8 even = {0, 2, 4, 6, 8, 10, 12, 14}, odd = {1, 3, 5, 7, 9, 11, 13, 15};
  const Float8 zero = {}, one = zero + 1.0f, minus_one = zero - 1.0f, nan = zero + dcnv3::quiet_nan<float>();
  const Int8 zero_index = {};
  const float scale = geo.offset_scale, width_f = geo.width_in, height_f = geo.height_in;
  const float last_x = width_f - 1, last_y = height_f - 1;
  const int width = static_cast<int>(geo.width_in), height = static_cast<int>(geo.height_in);
  const int channels = static_cast<int>(geo.channels());
  for (int first = 0; first < points; first += 8) {
    const int count = points - first < 8 ? points - first : 8;
    float offsets[16] = {}, masks[8] = {};  // a short last step reads from here, not past the item
    const float* offset_source = point_offset + 2 * first;
    const float* mask_source = point_mask + first;
    if (count < 8) {
      __builtin_memcpy(offsets, offset_source, sizeof(float) * 2 * count);
      if (point_mask) __builtin_memcpy(masks, mask_source, sizeof(float) * count);
      offset_source = offsets;
      mask_source = masks;
    }
    const Float8 low = load8(offset_source), high = load8(offset_source + 8);
    Float8 x = center_x + load8(table.dx.data() + first) + scale * __builtin_shuffle(low, high, even);
    Float8 y = center_y + load8(table.dy.data() + first) + scale * __builtin_shuffle(low, high, odd);
    // Points with no corner in the map (and non-finite locations) are reset to keep the integer conversion defined.
    const Int8 finite = (x - x == zero) & (y - y == zero);
    const Int8 inside = (x > minus_one) & (y > minus_one) & (x < width_f) & (y < height_f);
    store8(footprints.interior + first, (x >= zero) & (y >= zero) & (x < last_x) & (y < last_y));
    x = inside ? x : zero;
    y = inside ? y : zero;
    const Int8 x0 = __builtin_convertvector(x, Int8) + (x < zero), y0 = __builtin_convertvector(y, Int8) + (y < zero);
    const Float8 fx = x - __builtin_convertvector(x0, Float8), fy = y - __builtin_convertvector(y0, Float8);
    const Int8 x0_in = x0 >= 0, x1_in = x0 + 1 < width, y0_in = (y0 >= 0) & inside, y1_in = (y0 + 1 < height) & inside;
    store8(footprints.fx + first, fx);
    store8(footprints.fy + first, fy);
    const Float8 mask = point_mask ? load8(mask_source) * mask_scale : one;
    store8(footprints.outside + first, ~inside);
    store8(footprints.outside_add + first, finite ? mask * zero : nan);
    const Float8 lower_mask = mask * fy;
    const Float8 upper = y0_in ? mask - lower_mask : zero, lower = y1_in ? lower_mask : zero;
    const Float8 left = x0_in ? one - fx : zero, right = x1_in ? fx : zero;
    const Int8 column0 = x0_in ? x0 : zero_index, column1 = x1_in ? x0 + 1 : column0;
    const Int8 row0 = (y0_in ? y0 : zero_index) * width, row1 = y1_in ? (y0 + 1) * width : row0;
    store8(footprints.corner[0] + first, (row0 + column0) * channels);
    store8(footprints.corner[1] + first, (row0 + column1) * channels);
    store8(footprints.corner[2] + first, (row1 + column0) * channels);
    store8(footprints.corner[3] + first, (row1 + column1) * channels);
    store8(footprints.weight[0] + first, upper * left);
    store8(footprints.weight[1] + first, upper * right);
    store8(footprints.weight[2] + first, lower * left);
    store8(footprints.weight[3] + first, lower * right);
  }
}
// Largest |logit| whose exponential the softmax takes as it is, unshifted: P * exp(80) stays far below float's range
// and exp(-80) above its smallest normal number, so exp(l) / sum exp(l) rounds as well as the max-shifted formula.
constexpr float kDirectExpBound = 80.0f;

// exp(x) for |x| <= kDirectExpBound (other values are clamped to it), eight at a time: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by its Taylor series to degree 7 (truncation below 1e-8 relative, under float's rounding),
// 2^n put into the exponent bits.
__attribute__((always_inline)) inline Float8 exp_bounded(Float8 x) {
  const Float8 zero = {}, bound = zero + kDirectExpBound, shifter = zero + 12582912.0f;
  x = x >= -bound ? x : -bound;  // NaN too: the caller takes the exact path for such items
  x = x <= bound ? x : bound;
  const Float8 n = (x * 1.44269504f + shifter) - shifter;  // round(x / ln2) by the 1.5 * 2^23 shift
  const Float8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two: the first product is exact
  Float8 series = zero + 1.0f / 5040;
  series = series * r + 1.0f / 720;
  series = series * r + 1.0f / 120;
  series = series * r + 1.0f / 24;
  series = series * r + 1.0f / 6;
  series = series * r + 0.5f;
  series = series * r + 1.0f;
  series = series * r + 1.0f;
  const Int8 exponent = (__builtin_convertvector(n, Int8) + 127) << 23;
  Float8 power;
  __builtin_memcpy(&power, &exponent, sizeof(power));
  return series * power;
}

// Softmax of one output pixel's items (`groups` x `points` logits, contiguous) for the vectorised forward: the
// exponentials into `weights` eight at a time, and per item the reciprocal of their sum into `scales`. Where a logit
// of the pixel lies beyond +-kDirectExpBound or is not finite, every item of the pixel takes `softmax_points`
// instead (scale 1), with the PyTorch formula's NaN behaviour. `weights` holds groups * points rounded up to 8.
__attribute__((always_inline)) inline void pixel_softmax(const float* logits, int groups, int points, float* weights,
                                                         float* scales) {
  const int count = groups * points;
  const Float8 zero = {}, bound = zero + kDirectExpBound;
  Int8 in_range = (zero == zero);
  for (int first = 0; first < count; first += 8) {
    Float8 logit8 = zero;
    if (first + 8 <= count) {
      logit8 = load8(logits + first);
    } else {
      __builtin_memcpy(&logit8, logits + first, sizeof(float) * (count - first));
    }
    in_range &= (logit8 <= bound) & (logit8 >= -bound);
    store8(weights + first, exp_bounded(logit8));
  }
  bool direct = true;
  for (int k = 0; k < 8; ++k) direct = direct && in_range[k];
  for (int g = 0; g < groups; ++g) {
    if (!direct) {
      softmax_points(logits + g * points, points, weights + g * points);
      scales[g] = 1.0f;
      continue;
    }
    float total = 0;
    for (int p = 0; p < points; ++p) total += weights[g * points + p];
    scales[g] = 1.0f / total;
  }
}
#define DCNV3_VECTOR_EXTENSIONS 1
#else
#define DCNV3_VECTOR_EXTENSIONS 0
#endif

// Whether this instantiation can take the vectorised footprints (`item_footprints`): float, group width a multiple
// of 8; `vector_footprints_fit` then decides per call.
template <typename scalar_t, int DEPTH>
constexpr bool kVectorFootprints = DCNV3_VECTOR_EXTENSIONS && std::is_same_v<scalar_t, float> && DEPTH > 0 &&
                                   DEPTH % 8 == 0;

// Dots of the upstream gradient with the four corners' channels.
template <int DEPTH, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void corner_dots(const acc_t* __restrict__ upstream,
                                                       const Corners<scalar_t, acc_t>& corners, int64_t depth,
                                                       acc_t dots[4]) {
#if DCNV3_VECTOR_EXTENSIONS
  if constexpr (std::is_same_v<scalar_t, float> && DEPTH > 0 && DEPTH % 8 == 0) {
    Float8 sum[4] = {};
    for (int c = 0; c < DEPTH; c += 8) {
      const Float8 g = load8(upstream + c);
      for (int k = 0; k < 4; ++k) sum[k] += g * load8(corners.pointer[k] + c);
    }
    horizontal_sums(sum[0], sum[1], sum[2], sum[3], dots);
    return;
  }
#endif
  for (int k = 0; k < 4; ++k) {
    acc_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t c = 0; c < depth; ++c) total += upstream[c] * static_cast<acc_t>(corners.pointer[k][c]);
    dots[k] = total;
  }
}

// Gradient sums of one sampling point over its group's channels, from the corner dots d_k of the upstream gradient
// with the corner values (zero padding outside the map): the sample's dot (-> mask gradient) and the dots with the
// sample's derivatives along x and y (-> offset gradient).
template <int DEPTH, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void point_gradient_sums(const acc_t* __restrict__ upstream,
                                                               const Corners<scalar_t, acc_t>& corners, acc_t fx,
                                                               acc_t fy, int64_t depth, acc_t& sample_dot,
                                                               acc_t& x_dot, acc_t& y_dot) {
  acc_t d[4];
  corner_dots<DEPTH>(upstream, corners, depth, d);
  sample_dot = corners.weight[0] * d[0] + corners.weight[1] * d[1] + corners.weight[2] * d[2] +
               corners.weight[3] * d[3];
  dcnv3::location_gradient(fx, fy, d[0], d[1], d[2], d[3], x_dot, y_dot);
}

// value_grad[corner k] += scale_k * upstream, for the four (distinct) corners of an interior sample.
template <typename grad_t, typename acc_t>
__attribute__((always_inline)) inline void scatter_interior(const acc_t* __restrict__ upstream,
                                                            grad_t* __restrict__ g00, grad_t* __restrict__ g01,
                                                            grad_t* __restrict__ g10, grad_t* __restrict__ g11,
                                                            const acc_t scale[4], int64_t depth) {
#pragma omp simd
  for (int64_t c = 0; c < depth; ++c) {
    g00[c] += scale[0] * upstream[c];
    g01[c] += scale[1] * upstream[c];
    g10[c] += scale[2] * upstream[c];
    g11[c] += scale[3] * upstream[c];
  }
}

#if DCNV3_VECTOR_EXTENSIONS
// One item of the forward for float and a group width that is a multiple of 8: footprints eight points at a time
// (`item_footprints`), the group's channels accumulated in registers, eight at a time.
template <int DEPTH>
__attribute__((always_inline)) inline void forward_item_vector(const float* __restrict__ image,
                                                               const float* point_offset, const float* point_mask,
                                                               float mask_scale, float* __restrict__ out,
                                                               float center_x,
                                                               float center_y, const Geometry& geo,
                                                               const PointTable<float>& table,
                                                               ItemFootprints& footprints) {
  constexpr int kVectors = DEPTH / 8;
  const int points = geo.num_points();
  item_footprints(point_offset, point_mask, mask_scale, points, center_x, center_y, table, geo, footprints);
  Float8 acc[kVectors] = {};
  for (int p = 0; p < points; ++p) {
    if (footprints.outside[p]) {
      for (int v = 0; v < kVectors; ++v) acc[v] += footprints.outside_add[p];
      continue;
    }
    for (int v = 0; v < kVectors; ++v) {
      acc[v] += footprints.weight[0][p] * load8(image + footprints.corner[0][p] + 8 * v) +
                footprints.weight[1][p] * load8(image + footprints.corner[1][p] + 8 * v) +
                footprints.weight[2][p] * load8(image + footprints.corner[2][p] + 8 * v) +
                footprints.weight[3][p] * load8(image + footprints.corner[3][p] + 8 * v);
    }
  }
  __builtin_memcpy(out, acc, sizeof(acc));
}
#endif

template <typename scalar_t, int DEPTH>
__attribute__((always_inline)) inline void forward_range(const scalar_t* __restrict__ value,
                                                         const scalar_t* __restrict__ offset,
                                                         const scalar_t* __restrict__ mask,
                                                         scalar_t* __restrict__ output, const Geometry& geo,
                                                         const PointTable<at::opmath_type<scalar_t>>& table,
                                                         bool softmax, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t depth = ChannelBuffer<acc_t, DEPTH>::size(geo.group_channels);
  const int points = geo.num_points();
  const int64_t channels = geo.channels();
  const acc_t scale = static_cast<acc_t>(geo.offset_scale);
  // Samples with x in [0, W - 1) and y in [0, H - 1) have all four neighbours inside the map.
  const acc_t interior_x = static_cast<acc_t>(geo.width_in - 1), interior_y = static_cast<acc_t>(geo.height_in - 1);
  ChannelBuffer<acc_t, DEPTH> acc(depth);
  const std::vector<scalar_t> zero_pixel(depth, scalar_t(0));
  const bool vector_footprints = kVectorFootprints<scalar_t, DEPTH> && vector_footprints_fit(geo);
  [[maybe_unused]] ItemFootprints footprints;
  // Softmax weights of the current pixel's items, unnormalised where `softmax_scales` holds 1 / sum.
  std::vector<acc_t> softmax_weights(softmax ? PointTable<acc_t>::padded(geo.group * points) : 0);
  std::vector<acc_t> softmax_scales(softmax ? geo.group : 0);
  for (int64_t pixel = begin; pixel < end; ++pixel) {
    const int64_t w = pixel % geo.width_out, h = (pixel / geo.width_out) % geo.height_out;
    const int64_t n = pixel / (geo.width_out * geo.height_out);
    acc_t center_x, center_y;
    dcnv3::pixel_center(geo, h, w, center_x, center_y);
#if DCNV3_VECTOR_EXTENSIONS
    if constexpr (kVectorFootprints<scalar_t, DEPTH>) {
      if (softmax && vector_footprints) {
        pixel_softmax(mask + pixel * geo.group * points, static_cast<int>(geo.group), points, softmax_weights.data(),
                      softmax_scales.data());
      }
    }
#endif
    for (int64_t g = 0; g < geo.group; ++g) {
      const scalar_t* image = value + n * geo.height_in * geo.width_in * channels + g * depth;
      const int64_t item = pixel * geo.group + g;
      const scalar_t* point_offset = offset + item * points * 2;
      const scalar_t* point_mask = mask + item * points;
#if DCNV3_VECTOR_EXTENSIONS
      if constexpr (kVectorFootprints<scalar_t, DEPTH>) {
        if (vector_footprints) {
          const float* weights = softmax ? softmax_weights.data() + g * points : point_mask;
          forward_item_vector<DEPTH>(image, point_offset, weights, softmax ? softmax_scales[g] : 1.0f,
                                     output + item * depth, center_x, center_y, geo, table, footprints);
          continue;
        }
      }
#endif
      if (softmax) softmax_points(point_mask, points, softmax_weights.data());
      for (int64_t c = 0; c < depth; ++c) acc.data[c] = 0;
      for (int p = 0; p < points; ++p) {
        const acc_t x = center_x + table.dx[p] + scale * static_cast<acc_t>(point_offset[2 * p]);
        const acc_t y = center_y + table.dy[p] + scale * static_cast<acc_t>(point_offset[2 * p + 1]);
        const acc_t m = softmax ? softmax_weights[p] : static_cast<acc_t>(point_mask[p]);
        Corners<scalar_t, acc_t> corners;
        if (x >= acc_t(0) && y >= acc_t(0) && x < interior_x && y < interior_y) {
          acc_t fx, fy;
          corners = interior_corners(x, y, image, geo, channels, fx, fy);
          for (int k = 0; k < 4; ++k) corners.weight[k] *= m;
        } else {
          const auto fp = dcnv3::footprint_at<acc_t>(geo, x, y, m);
          if (!fp.inside) {  // zero, or NaN for a non-finite location or mask weight
            for (int64_t c = 0; c < depth; ++c) acc.data[c] += fp.weight[0];
            continue;
          }
          corners = corners_of(fp, image, zero_pixel.data(), geo, channels);
        }
        for (int64_t c = 0; c < depth; ++c) {
          acc.data[c] += corners.weight[0] * static_cast<acc_t>(corners.pointer[0][c]) +
                         corners.weight[1] * static_cast<acc_t>(corners.pointer[1][c]) +
                         corners.weight[2] * static_cast<acc_t>(corners.pointer[2][c]) +
                         corners.weight[3] * static_cast<acc_t>(corners.pointer[3][c]);
        }
      }
      scalar_t* out = output + item * depth;
      for (int64_t c = 0; c < depth; ++c) out[c] = static_cast<scalar_t>(acc.data[c]);
    }
  }
}

template <typename scalar_t, typename grad_t, int DEPTH>
__attribute__((always_inline)) inline void backward_range(
    const scalar_t* __restrict__ value, const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
    const scalar_t* __restrict__ grad_output, grad_t* __restrict__ grad_value, scalar_t* __restrict__ grad_offset,
    scalar_t* __restrict__ grad_mask, const Geometry& geo, const PointTable<at::opmath_type<scalar_t>>& table,
    int64_t group_block, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t depth = ChannelBuffer<acc_t, DEPTH>::size(geo.group_channels);
  const int points = geo.num_points();
  const int64_t channels = geo.channels();
  const acc_t scale = static_cast<acc_t>(geo.offset_scale);
  const acc_t interior_x = static_cast<acc_t>(geo.width_in - 1), interior_y = static_cast<acc_t>(geo.height_in - 1);
  ChannelBuffer<acc_t, DEPTH> upstream(depth);
  const std::vector<scalar_t> zero_pixel(depth, scalar_t(0));
  const bool vector_footprints = kVectorFootprints<scalar_t, DEPTH> && vector_footprints_fit(geo);
  [[maybe_unused]] ItemFootprints footprints;
  const int64_t blocks = (geo.group + group_block - 1) / group_block;
  // task = (image, block of groups): owns grad_value[n, :, :, block]. All groups of a block at each pixel in turn,
  // so that consecutive reads and writes share cache lines.
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / blocks, first_group = (task % blocks) * group_block;
    const int64_t groups_in_block = std::min<int64_t>(group_block, geo.group - first_group);
    const int64_t steps = geo.height_out * geo.width_out * groups_in_block;
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t g = first_group + step % groups_in_block, w = (step / groups_in_block) % geo.width_out;
      const int64_t h = step / (groups_in_block * geo.width_out);
      const int64_t image_offset = n * geo.height_in * geo.width_in * channels + g * depth;
      const scalar_t* image = value + image_offset;
      grad_t* image_grad = grad_value + image_offset;
      const int64_t pixel = (n * geo.height_out + h) * geo.width_out + w;
      const scalar_t* grad_out = grad_output + pixel * channels + g * depth;
      for (int64_t c = 0; c < depth; ++c) upstream.data[c] = static_cast<acc_t>(grad_out[c]);
      acc_t center_x, center_y;
      dcnv3::pixel_center(geo, h, w, center_x, center_y);
      const int64_t row = (pixel * geo.group + g) * points;
#if DCNV3_VECTOR_EXTENSIONS
      if constexpr (kVectorFootprints<scalar_t, DEPTH>) {
        if (vector_footprints) {
          item_footprints(offset + row * 2, nullptr, 1.0f, points, center_x, center_y, table, geo, footprints);
        }
      }
#endif
      for (int p = 0; p < points; ++p) {
        const acc_t m = static_cast<acc_t>(mask[row + p]);
        const acc_t x = center_x + table.dx[p] + scale * static_cast<acc_t>(offset[(row + p) * 2]);
        const acc_t y = center_y + table.dy[p] + scale * static_cast<acc_t>(offset[(row + p) * 2 + 1]);
        // Unmasked bilinear weights: the mask scales the value gradient and the location gradient.
        Corners<scalar_t, acc_t> corners;
        acc_t fx, fy, sampled_dot, d_x, d_y;
        bool interior;
#if DCNV3_VECTOR_EXTENSIONS
        if constexpr (kVectorFootprints<scalar_t, DEPTH>) {
          if (vector_footprints) {
            interior = footprints.interior[p];
            if (interior) {
              for (int k = 0; k < 4; ++k) {
                corners.pointer[k] = image + footprints.corner[k][p];
                corners.weight[k] = footprints.weight[k][p];
              }
              fx = footprints.fx[p];
              fy = footprints.fy[p];
            }
          }
        }
#endif
        if (!vector_footprints) {
          interior = x >= acc_t(0) && y >= acc_t(0) && x < interior_x && y < interior_y;
          if (interior) corners = interior_corners(x, y, image, geo, channels, fx, fy);
        }
        if (interior) {
          const acc_t scatter_scale[4] = {m * corners.weight[0], m * corners.weight[1], m * corners.weight[2],
                                          m * corners.weight[3]};
          point_gradient_sums<DEPTH>(upstream.data, corners, fx, fy, depth, sampled_dot, d_x, d_y);
          grad_t* corner_grad[4];
          for (int k = 0; k < 4; ++k) corner_grad[k] = image_grad + (corners.pointer[k] - image);
          scatter_interior(upstream.data, corner_grad[0], corner_grad[1], corner_grad[2], corner_grad[3],
                           scatter_scale, depth);
        } else {
          // Unmasked bilinear weights: the mask scales the value gradient and the location gradient.
          const auto fp = dcnv3::footprint_at<acc_t>(geo, x, y, acc_t(1));
          if (!fp.inside) {  // zero; NaN for a non-finite location; the offset's also for a non-finite mask
            const acc_t offset_grad = scale * m * fp.weight[0];
            grad_mask[row + p] = static_cast<scalar_t>(fp.weight[0]);
            grad_offset[(row + p) * 2] = grad_offset[(row + p) * 2 + 1] = static_cast<scalar_t>(offset_grad);
            continue;
          }
          corners = corners_of(fp, image, zero_pixel.data(), geo, channels);
          point_gradient_sums<DEPTH>(upstream.data, corners, fp.fx, fp.fy, depth, sampled_dot, d_x, d_y);
          for (int k = 0; k < 4; ++k) {  // one corner at a time: outside ones have no gradient to receive
            if (!dcnv3::corner_inside(geo, fp.y0, fp.x0, k)) continue;
            grad_t* corner_grad = image_grad + dcnv3::corner_row(geo, 0, fp.y0, fp.x0, k) * channels;
            const acc_t corner_scale = m * fp.weight[k];
            for (int64_t c = 0; c < depth; ++c) corner_grad[c] += corner_scale * upstream.data[c];
          }
        }
        grad_mask[row + p] = static_cast<scalar_t>(sampled_dot);
        grad_offset[(row + p) * 2] = static_cast<scalar_t>(scale * m * d_x);
        grad_offset[(row + p) * 2 + 1] = static_cast<scalar_t>(scale * m * d_y);
      }
    }
  }
}

// One function per (dtype, width, instruction set): the generic body inlined into each.
template <typename scalar_t>
using Table = PointTable<at::opmath_type<scalar_t>>;

template <typename scalar_t, int DEPTH>
void forward_default(const scalar_t* v, const scalar_t* o, const scalar_t* m, scalar_t* out, const Geometry& geo,
                     const Table<scalar_t>& table, bool softmax, int64_t begin, int64_t end) {
  forward_range<scalar_t, DEPTH>(v, o, m, out, geo, table, softmax, begin, end);
}

template <typename scalar_t, typename grad_t, int DEPTH>
void backward_default(const scalar_t* v, const scalar_t* o, const scalar_t* m, const scalar_t* go, grad_t* gv,
                      scalar_t* goff, scalar_t* gm, const Geometry& geo, const Table<scalar_t>& table,
                      int64_t group_block, int64_t begin, int64_t end) {
  backward_range<scalar_t, grad_t, DEPTH>(v, o, m, go, gv, goff, gm, geo, table, group_block, begin, end);
}

#if DCNV3_X86_DISPATCH
template <typename scalar_t, int DEPTH>
DCNV3_AVX2 void forward_avx2(const scalar_t* v, const scalar_t* o, const scalar_t* m, scalar_t* out,
                             const Geometry& geo, const Table<scalar_t>& table, bool softmax, int64_t begin,
                             int64_t end) {
  forward_range<scalar_t, DEPTH>(v, o, m, out, geo, table, softmax, begin, end);
}

template <typename scalar_t, typename grad_t, int DEPTH>
DCNV3_AVX2 void backward_avx2(const scalar_t* v, const scalar_t* o, const scalar_t* m, const scalar_t* go,
                              grad_t* gv, scalar_t* goff, scalar_t* gm, const Geometry& geo,
                              const Table<scalar_t>& table, int64_t group_block, int64_t begin, int64_t end) {
  backward_range<scalar_t, grad_t, DEPTH>(v, o, m, go, gv, goff, gm, geo, table, group_block, begin, end);
}

bool has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}
#endif

template <typename scalar_t, int DEPTH>
void forward_pixels(const scalar_t* v, const scalar_t* o, const scalar_t* m, scalar_t* out, const Geometry& geo,
                    const Table<scalar_t>& table, bool softmax, int64_t begin, int64_t end) {
#if DCNV3_X86_DISPATCH
  if (has_avx2()) return forward_avx2<scalar_t, DEPTH>(v, o, m, out, geo, table, softmax, begin, end);
#endif
  forward_default<scalar_t, DEPTH>(v, o, m, out, geo, table, softmax, begin, end);
}

template <typename scalar_t, typename grad_t, int DEPTH>
void backward_tasks(const scalar_t* v, const scalar_t* o, const scalar_t* m, const scalar_t* go, grad_t* gv,
                    scalar_t* goff, scalar_t* gm, const Geometry& geo, const Table<scalar_t>& table,
                    int64_t group_block, int64_t begin, int64_t end) {
#if DCNV3_X86_DISPATCH
  if (has_avx2()) {
    return backward_avx2<scalar_t, grad_t, DEPTH>(v, o, m, go, gv, goff, gm, geo, table, group_block, begin, end);
  }
#endif
  backward_default<scalar_t, grad_t, DEPTH>(v, o, m, go, gv, goff, gm, geo, table, group_block, begin, end);
}

// Groups per backward task: as many as still leave each thread four tasks. A task sweeps its groups pixel by pixel,
// so that it reads and writes whole cache lines of the channels-last maps instead of one group's slice of each.
int64_t backward_group_block(const Geometry& geo) {
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t block = geo.group;
  while (block > 1 && geo.batch * ((geo.group + block - 1) / block) < wanted_tasks) block = (block + 1) / 2;
  return block;
}

// Calls `body` with the group width as a compile-time constant where it is a common one, else with 0.
template <typename Body>
void with_depth(int64_t depth, Body&& body) {
  switch (depth) {
    case 8: return body(std::integral_constant<int, 8>{});
    case 16: return body(std::integral_constant<int, 16>{});
    case 32: return body(std::integral_constant<int, 32>{});
    case 64: return body(std::integral_constant<int, 64>{});
    default: return body(std::integral_constant<int, 0>{});
  }
}

torch::Tensor forward_cpu(const torch::Tensor& input, const torch::Tensor& offset, const torch::Tensor& mask,
                          int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                          int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                          double offset_scale, bool remove_center, bool softmax) {
  const Geometry geo = dcnv3::check_arguments(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                              pad_w, dilation_h, dilation_w, group, group_channels, offset_scale,
                                              remove_center);
  TORCH_CHECK(input.device().is_cpu(), "dcnv3_forward_cpu: tensors must be on the CPU");
  const auto value = input.contiguous(), offsets = offset.contiguous(), masks = mask.contiguous();
  auto output = torch::empty({geo.batch, geo.height_out, geo.width_out, geo.channels()}, input.options());
  const int64_t pixels = geo.batch * geo.height_out * geo.width_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_forward_cpu", [&] {
    const scalar_t *v = value.data_ptr<scalar_t>(), *o = offsets.data_ptr<scalar_t>(), *m = masks.data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    const Table<scalar_t> table(geo);
    with_depth(geo.group_channels, [&](auto depth) {
      at::parallel_for(0, pixels, 16, [&](int64_t begin, int64_t end) {
        forward_pixels<scalar_t, decltype(depth)::value>(v, o, m, out, geo, table, softmax, begin, end);
      });
    });
  });
  return output;
}

}  // namespace

torch::Tensor dcnv3_forward_cpu(const torch::Tensor& input, const torch::Tensor& offset, const torch::Tensor& mask,
                                int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                                int64_t group_channels, double offset_scale, bool remove_center) {
  return forward_cpu(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                     dilation_w, group, group_channels, offset_scale, remove_center, false);
}

torch::Tensor dcnv3_softmax_forward_cpu(const torch::Tensor& input, const torch::Tensor& offset,
                                        const torch::Tensor& mask_logits, int64_t kernel_h, int64_t kernel_w,
                                        int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                        int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels,
                                        double offset_scale, bool remove_center) {
  return forward_cpu(input, offset, mask_logits, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                     dilation_w, group, group_channels, offset_scale, remove_center, true);
}

std::vector<torch::Tensor> dcnv3_backward_cpu(const torch::Tensor& input, const torch::Tensor& offset,
                                              const torch::Tensor& mask, const torch::Tensor& grad_output,
                                              int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                              int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
                                              int64_t group, int64_t group_channels, double offset_scale,
                                              bool remove_center) {
  const Geometry geo = dcnv3::check_arguments(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
                                              pad_w, dilation_h, dilation_w, group, group_channels, offset_scale,
                                              remove_center);
  dcnv3::check_grad_output(grad_output, input, geo);
  TORCH_CHECK(input.device().is_cpu(), "dcnv3_backward_cpu: tensors must be on the CPU");
  const auto value = input.contiguous(), offsets = offset.contiguous(), masks = mask.contiguous();
  const auto upstream = grad_output.contiguous();
  // Half-precision value gradients are summed in float32, then rounded once.
  auto grad_value = torch::zeros(input.sizes(), input.options().dtype(at::toOpMathType(input.scalar_type())));
  auto grad_offset = torch::empty_like(offsets);
  auto grad_mask = torch::empty_like(masks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *v = value.data_ptr<scalar_t>(), *o = offsets.data_ptr<scalar_t>(), *m = masks.data_ptr<scalar_t>();
    const scalar_t* go = upstream.data_ptr<scalar_t>();
    acc_t* gv = grad_value.data_ptr<acc_t>();
    scalar_t *goff = grad_offset.data_ptr<scalar_t>(), *gm = grad_mask.data_ptr<scalar_t>();
    const Table<scalar_t> table(geo);
    const int64_t group_block = backward_group_block(geo);
    const int64_t tasks = geo.batch * ((geo.group + group_block - 1) / group_block);
    with_depth(geo.group_channels, [&](auto depth) {
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        backward_tasks<scalar_t, acc_t, decltype(depth)::value>(v, o, m, go, gv, goff, gm, geo, table, group_block,
                                                                begin, end);
      });
    });
  });
  return {grad_value.to(input.scalar_type()), grad_offset, grad_mask};
}
