// Sampling arithmetic of DCNv3 shared by the CPU and CUDA kernels.
//
// Output pixel (h, w), group g, sampling point p (enumerated x-major: p = ix * kernel_h + iy, the centre skipped
// with remove_center) reads the value map bilinearly at
//   x = w * stride_w - pad_w + half_w + offset_scale * (ix * dilation_w - half_w + offset_x)
//   y = h * stride_h - pad_h + half_h + offset_scale * (iy * dilation_h - half_h + offset_y)
// with half = dilation * (kernel - 1) / 2 and zero outside the map, and weighs it by mask[p].
//
// Non-finite numbers propagate as in the PyTorch operator (grid_sample, then mask * sample): a corner outside the
// map contributes nothing and is never read, a non-finite location gives a NaN sample, and a non-finite mask weight
// makes the point's contribution NaN even where the sample is zero.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DCNV3_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DCNV3_HOST_DEVICE inline
#endif

namespace dcnv3 {

struct Geometry {
  int64_t batch, height_in, width_in, height_out, width_out;
  int64_t group, group_channels;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  float offset_scale;
  bool remove_center;

  DCNV3_HOST_DEVICE int64_t channels() const { return group * group_channels; }
  DCNV3_HOST_DEVICE int num_points() const { return kernel_h * kernel_w - (remove_center ? 1 : 0); }
};

// The kernel-grid position (ix, iy) of the p-th sampling point.
DCNV3_HOST_DEVICE void kernel_position(const Geometry& geo, int point, int& ix, int& iy) {
  const int center = (geo.kernel_h * geo.kernel_w - 1) / 2;
  const int full_index = (geo.remove_center && point >= center) ? point + 1 : point;
  ix = full_index / geo.kernel_h;
  iy = full_index % geo.kernel_h;
}

// Bilinear footprint of one sample: the top-left corner, the fractional position inside the cell, and the four
// corner weights (already multiplied by the sampling point's mask weight; zero for corners outside the map).
template <typename acc_t>
struct Footprint {
  int64_t x0, y0;
  acc_t fx, fy;
  acc_t weight[4];  // (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)
  bool inside;      // whether any corner lies in the map (-1 < x < width and -1 < y < height)
  bool finite;      // whether the location is finite; if not, the weights are NaN
};

template <typename acc_t>
DCNV3_HOST_DEVICE acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

// Whether x is neither infinite nor NaN, without a library call (x - x is NaN for both).
template <typename acc_t>
DCNV3_HOST_DEVICE bool is_finite(acc_t x) {
  return x - x == acc_t(0);
}

// Displacement of the p-th sampling point from its output pixel's centre, offset excluded, in input pixels:
// offset_scale * (ix * dilation_w - half_w, iy * dilation_h - half_h).
template <typename acc_t>
DCNV3_HOST_DEVICE void kernel_displacement(const Geometry& geo, int point, acc_t& dx, acc_t& dy) {
  int ix, iy;
  kernel_position(geo, point, ix, iy);
  const acc_t scale = static_cast<acc_t>(geo.offset_scale);
  dx = scale * static_cast<acc_t>(ix * geo.dilation_w - geo.dilation_w * (geo.kernel_w - 1) / 2);
  dy = scale * static_cast<acc_t>(iy * geo.dilation_h - geo.dilation_h * (geo.kernel_h - 1) / 2);
}

// Input-pixel coordinates of the centre of output pixel (h, w).
template <typename acc_t>
DCNV3_HOST_DEVICE void pixel_center(const Geometry& geo, int64_t h, int64_t w, acc_t& x, acc_t& y) {
  x = static_cast<acc_t>(w * geo.stride_w - geo.pad_w + geo.dilation_w * (geo.kernel_w - 1) / 2);
  y = static_cast<acc_t>(h * geo.stride_h - geo.pad_h + geo.dilation_h * (geo.kernel_h - 1) / 2);
}

// Footprint of a sample at (x, y) in input-pixel coordinates, weighted by `mask`. The weight of a corner outside
// the map is mask * 0: zero, or NaN for a non-finite mask, as mask * sample is in the PyTorch operator.
template <typename acc_t>
DCNV3_HOST_DEVICE Footprint<acc_t> footprint_at(const Geometry& geo, acc_t x, acc_t y, acc_t mask) {
  Footprint<acc_t> fp;
  fp.finite = is_finite(x) && is_finite(y);
  fp.inside = x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(geo.width_in) &&
              y < static_cast<acc_t>(geo.height_in);
  // floor() by truncation: inside the map x and y exceed -1, and a library call would dominate the CPU loop.
  fp.x0 = fp.inside ? static_cast<int64_t>(x) - (x < acc_t(0) ? 1 : 0) : 0;
  fp.y0 = fp.inside ? static_cast<int64_t>(y) - (y < acc_t(0) ? 1 : 0) : 0;
  fp.fx = fp.inside ? x - static_cast<acc_t>(fp.x0) : acc_t(0);
  fp.fy = fp.inside ? y - static_cast<acc_t>(fp.y0) : acc_t(0);
  const bool x0_in = fp.inside && fp.x0 >= 0, x1_in = fp.inside && fp.x0 + 1 < geo.width_in;
  const bool y0_in = fp.inside && fp.y0 >= 0, y1_in = fp.inside && fp.y0 + 1 < geo.height_in;
  const acc_t m = fp.finite ? mask : quiet_nan<acc_t>();
  fp.weight[0] = m * ((y0_in && x0_in) ? (1 - fp.fy) * (1 - fp.fx) : acc_t(0));
  fp.weight[1] = m * ((y0_in && x1_in) ? (1 - fp.fy) * fp.fx : acc_t(0));
  fp.weight[2] = m * ((y1_in && x0_in) ? fp.fy * (1 - fp.fx) : acc_t(0));
  fp.weight[3] = m * ((y1_in && x1_in) ? fp.fy * fp.fx : acc_t(0));
  return fp;
}

// Footprint of the p-th sampling point of output pixel (h, w) displaced by (offset_x, offset_y) kernel units.
template <typename acc_t>
DCNV3_HOST_DEVICE Footprint<acc_t> footprint(const Geometry& geo, int64_t h, int64_t w, int point, acc_t offset_x,
                                             acc_t offset_y, acc_t mask) {
  acc_t x, y, dx, dy;
  pixel_center(geo, h, w, x, y);
  kernel_displacement(geo, point, dx, dy);
  const acc_t scale = static_cast<acc_t>(geo.offset_scale);
  return footprint_at(geo, x + dx + scale * offset_x, y + dy + scale * offset_y, mask);
}

// Row (pixel) index in the (N * H_in * W_in) value map of corner k of a footprint (which must lie inside the map).
DCNV3_HOST_DEVICE int64_t corner_row(const Geometry& geo, int64_t n, int64_t y0, int64_t x0, int corner) {
  return (n * geo.height_in + y0 + (corner >> 1)) * geo.width_in + x0 + (corner & 1);
}

// Gradient of the sample with respect to its location, from the four corner values (0 outside the map):
// d/dx = (1 - fy) (v01 - v00) + fy (v11 - v10),  d/dy = (1 - fx) (v10 - v00) + fx (v11 - v01).
template <typename acc_t>
DCNV3_HOST_DEVICE void location_gradient(acc_t fx, acc_t fy, acc_t v00, acc_t v01, acc_t v10, acc_t v11, acc_t& d_x,
                                         acc_t& d_y) {
  d_x = (1 - fy) * (v01 - v00) + fy * (v11 - v10);
  d_y = (1 - fx) * (v10 - v00) + fx * (v11 - v01);
}

// Whether corner k of a footprint lies inside the map (its value counts; otherwise it is zero padding).
DCNV3_HOST_DEVICE bool corner_inside(const Geometry& geo, int64_t y0, int64_t x0, int corner) {
  const int64_t y = y0 + (corner >> 1), x = x0 + (corner & 1);
  return y >= 0 && y < geo.height_in && x >= 0 && x < geo.width_in;
}

}  // namespace dcnv3
