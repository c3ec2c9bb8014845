// trimode's CPU kernels: the glue between the GEMMs of a forward, and decode attention over the paged KV cache.
//
// Built on first use by engine/cpu_kernels.py (torch.utils.cpp_extension, -O3 -march=native) and called only
// through its FusedCpuOps, which hands over contiguous rows; the runner installs it for fp32 and bf16 models only,
// and any other dtype stops here with an error naming it.
//
// Why: a CPU decode step at batch 16 spends as long in small eager ops (each a dispatch and a pass over memory)
// and in gathering the KV pages for SDPA as in its GEMMs. Each kernel here is one pass, written as plain loops over
// contiguous fp32 lanes that GCC vectorises. Rounding follows the eager ops: where eager rounds an intermediate to
// the tensor dtype, so does the kernel; math in between is fp32 as in PyTorch's CPU kernels. What differs is the
// order of fp32 sums (RMSNorm's mean, attention's dot products) and exp's last bit, i.e. ~1e-7 relative in fp32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// ---- element access: fp32 math on fp32 or bf16 storage (bf16 as raw uint16_t bits, which GCC vectorises) -------
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(p[i]) << 16);
}
inline uint32_t bf16_round_bits(float v) {  // round to nearest even, as c10::BFloat16(float)
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {
  const uint16_t h = static_cast<uint16_t>(bf16_round_bits(v) >> 16);
  p[i] = v != v ? static_cast<uint16_t>(0x7FC0) : h;  // NaN -> the canonical quiet NaN, as c10
}
// the value `v` becomes once stored as S (eager rounds every op's output to the tensor dtype)
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const uint16_t*) {
  return v != v ? v : __builtin_bit_cast(float, bf16_round_bits(v));
}

// exp for fp32 lanes, branch-free so loops over it vectorise: Cody-Waite reduction and Cephes' expf polynomial
// (~1 ulp). The argument is clamped to [-87.3, 88.7], so exp(-inf) comes out ~1e-38, not 0.
inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);  // not fmin/fmax: GCC keeps those scalar calls
  // k = round(x / ln 2) by the 1.5 * 2^23 trick: std::floor does not vectorise without -fno-trapping-math
  const float k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  return y * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
}

constexpr int64_t kRowGrain = 8;  // rows per parallel chunk (one thread at a time handles tiny batches whole)

// ---- RMSNorm, optionally fused with the residual add before it -------------------------------------------------
template <typename T>
void rms_norm_kernel(const T* x, const T* residual, const T* w, T* out, T* res_out, int64_t rows, int64_t h,
                     float eps) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> v(h);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * h;
      if (residual != nullptr) {  // res_out = x + residual, rounded to T as the eager add
        const T* rr = residual + r * h;
        T* ro = res_out + r * h;
#pragma omp simd
        for (int64_t i = 0; i < h; ++i) {
          const float s = load(xr, i) + load(rr, i);
          store(ro, i, s);
          v[i] = round_to(s, xr);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < h; ++i) v[i] = load(xr, i);
      }
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < h; ++i) acc += v[i] * v[i];
      const float inv = 1.f / std::sqrt(acc / static_cast<float>(h) + eps);
      T* o = out + r * h;
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) store(o, i, load(w, i) * round_to(v[i] * inv, xr));
    }
  });
}

// ---- RoPE (rotate-half) on the first `heads` heads of each row ---------------------------------------------------
template <typename T>
void rope_kernel(const T* x, int64_t row_stride, const T* cos, const T* sin, T* out, int64_t rows, int64_t heads,
                 int64_t d) {
  const int64_t half = d / 2;
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cos + r * d;
      const T* s = sin + r * d;  // first half negated: rotate_half(x) * sin == [x2, x1] * s
      for (int64_t hh = 0; hh < heads; ++hh) {
        const T* xi = x + r * row_stride + hh * d;
        T* o = out + (r * heads + hh) * d;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i)
          store(o, i, round_to(load(xi, i) * load(c, i), xi) + round_to(load(xi, i + half) * load(s, i), xi));
#pragma omp simd
        for (int64_t i = half; i < d; ++i)
          store(o, i, round_to(load(xi, i) * load(c, i), xi) + round_to(load(xi, i - half) * load(s, i), xi));
      }
    }
  });
}

// ---- SwiGLU: silu(gate) * up over [gate | up] rows ---------------------------------------------------------------
template <typename T>
void silu_mul_kernel(const T* gu, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> e(inter);
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      // two loops: fused into one, GCC turns the division into a conditional one it cannot vectorise
      float* ep = e.data();
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) ep[i] = vexp(-load(g, i));
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) store(o, i, round_to(load(g, i) / (1.f + ep[i]), g) * load(u, i));
    }
  });
}

// ---- decode attention: one query per sequence, keys and values read from their pages in place ------------------
// Sequence b's only query is row rows[b] of q and its result goes to the same row of out, so the one-token rows of
// a ragged forward (decodes of any kind) are read and written in place among the others' rows. A sequence's
// result depends on nothing else in the call: the same bits whatever shares the forward.
constexpr int64_t kPrefetchRows = 4;  // cache slots ahead: the pages of a sequence are not adjacent in the pool

template <typename T>
inline void prefetch_row(const T* base, int64_t slot, int64_t row) {
  const char* p = reinterpret_cast<const char*>(base + slot * row);
  for (int64_t off = 0; off < row * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

template <typename T>
void decode_attention_kernel(const T* q, int64_t q_row_stride, int64_t q_head_stride, const T* kc, const T* vc,
                             const int64_t* tables, int64_t max_blocks, const int64_t* rows, const int64_t* lens,
                             T* out, int64_t out_row_stride, int64_t b, int64_t hq, int64_t hkv, int64_t d,
                             int64_t block_size, float scale) {
  const int64_t group = hq / hkv;
  const int64_t row = hkv * d;  // elements per cache slot: every KV head of one position
  // One sequence per work item, its slots read in order, every head at once: the cache rows stream from DRAM
  // (at decode they were last touched a whole forward ago) instead of being revisited once per KV head.
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(hq * d), acc(hq * d), kv(row), scores, inv_sum(hq);
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t n = lens[seq];
      const int64_t* table = tables + seq * max_blocks;
      auto slot = [&](int64_t j) { return table[j / block_size] * block_size + j % block_size; };
      for (int64_t h = 0; h < hq; ++h) {
        const T* qh = q + rows[seq] * q_row_stride + h * q_head_stride;
        float* qd = qf.data() + h * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) qd[i] = load(qh, i) * scale;
      }
      scores.resize(hq * n);
      float* sc = scores.data();
      float* kd = kv.data();
      for (int64_t j = 0; j < n; ++j) {  // scores[h][j] = q_h . k_j * scale
        if (j + kPrefetchRows < n) prefetch_row(kc, slot(j + kPrefetchRows), row);
        const T* kj = kc + slot(j) * row;
#pragma omp simd
        for (int64_t i = 0; i < row; ++i) kd[i] = load(kj, i);
        for (int64_t h = 0; h < hq; ++h) {
          const float* qh = qf.data() + h * d;
          const float* kh = kd + (h / group) * d;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < d; ++i) s += qh[i] * kh[i];
          sc[h * n + j] = s;
        }
      }
      for (int64_t h = 0; h < hq; ++h) {  // softmax numerators in place, fp32
        float* sh = sc + h * n;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; ++j) m = sh[j] > m ? sh[j] : m;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          sh[j] = vexp(sh[j] - m);
          sum += sh[j];
        }
        inv_sum[h] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {  // acc[h] += p[h][j] * v_j
        if (j + kPrefetchRows < n) prefetch_row(vc, slot(j + kPrefetchRows), row);
        const T* vj = vc + slot(j) * row;
#pragma omp simd
        for (int64_t i = 0; i < row; ++i) kd[i] = load(vj, i);
        for (int64_t h = 0; h < hq; ++h) {
          const float p = sc[h * n + j];
          const float* vh = kd + (h / group) * d;
          float* a = acc.data() + h * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += p * vh[i];
        }
      }
      for (int64_t h = 0; h < hq; ++h) {
        T* o = out + rows[seq] * out_row_stride + h * d;
        const float* a = acc.data() + h * d;
        const float inv = inv_sum[h];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) store(o, i, a[i] * inv);
      }
    }
  });
}

template <typename S>
S* ptr(const at::Tensor& t) {  // storage pointer: bf16 tensors are read and written as their uint16_t bits
  return static_cast<S*>(t.data_ptr());
}

template <typename F>
void dispatch(const at::Tensor& t, const char* name, F&& f) {
  if (t.scalar_type() == at::kFloat) {
    f(static_cast<float*>(nullptr));
  } else if (t.scalar_type() == at::kBFloat16) {
    f(static_cast<uint16_t*>(nullptr));
  } else {
    TORCH_CHECK(false, name, ": unsupported dtype ", t.scalar_type());
  }
}

}  // namespace

// x [T, H] contiguous, weight [H]; with `residual` [T, H]: r = x + residual, returns (weight * rms_norm(r), r);
// without: returns (weight * rms_norm(x), x).
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                 const at::Tensor& weight, double eps) {
  auto out = at::empty_like(x);
  at::Tensor res = residual.has_value() ? at::empty_like(x) : x;
  dispatch(x, "rms_norm", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rms_norm_kernel<T>(ptr<T>(x), residual.has_value() ? ptr<T>(*residual) : nullptr,
                       ptr<T>(weight), ptr<T>(out), residual.has_value() ? ptr<T>(res) : nullptr,
                       x.size(0), x.size(1), static_cast<float>(eps));
  });
  return {out, res};
}

// x [T, >= heads * D] (unit stride inside a row), cos / sin [T, D] or [T, 1, D], contiguous -> [T, heads, D].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  const int64_t t = x.size(0), d = cos.size(-1);
  auto out = at::empty({t, heads, d}, x.options());
  dispatch(x, "rope", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rope_kernel<T>(ptr<T>(x), x.stride(0), ptr<T>(cos), ptr<T>(sin), ptr<T>(out), t, heads,
                   d);
  });
  return out;
}

// gu [T, 2I] contiguous -> silu(gu[:, :I]) * gu[:, I:] as [T, I].
at::Tensor silu_mul(const at::Tensor& gu) {
  const int64_t t = gu.size(0), inter = gu.size(1) / 2;
  auto out = at::empty({t, inter}, gu.options());
  dispatch(gu, "silu_mul", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    silu_mul_kernel<T>(ptr<T>(gu), ptr<T>(out), t, inter);
  });
  return out;
}

// q [T, Hq, D] (unit stride in D), k / v cache [slots, Hkv, D] contiguous, tables [B, max_blocks], rows [B] and
// lens [B] int64 (lens: keys per sequence, this step's included), out [T, Hq, D] contiguous: sequence b's query is
// q[rows[b]] and its result goes to out[rows[b]] (the other rows of out are left alone).
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& tables, const at::Tensor& rows, const at::Tensor& lens, at::Tensor& out,
                      int64_t block_size, double scale) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == q.scalar_type(), "decode_attention: out must be a "
              "contiguous tensor of q's dtype");
  const int64_t b = tables.size(0), hq = q.size(1), d = q.size(2), hkv = k_cache.size(1);
  dispatch(q, "decode_attention", [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    decode_attention_kernel<T>(ptr<T>(q), q.stride(0), q.stride(1), ptr<T>(k_cache),
                               ptr<T>(v_cache), tables.data_ptr<int64_t>(), tables.size(1),
                               rows.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), ptr<T>(out), out.stride(0), b,
                               hq, hkv, d, block_size, static_cast<float>(scale));
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("rope", &rope);
  m.def("silu_mul", &silu_mul);
  m.def("decode_attention", &decode_attention);
}
