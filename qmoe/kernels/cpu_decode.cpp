// qmoe's CPU inference kernels: an adapted layer's whole eval-mode adapter step in one call.
//
// At decode time (a few tokens per forward) an adapter's arithmetic is tiny and its cost is per-op overhead
// and memory traffic: every PyTorch op costs microseconds of dispatch, several times more right after
// bitsandbytes' 4-bit kernel has evicted the caches, and the adapter weights stream through the caches on
// every token. A Decoder holds one layer's fused weights and does, for the tokens of x,
//
//   z = up @ x                       (rank activations and router logits)
//   gated = routing(z)               (a plain loop over tokens: experts and ranks are few)
//   result += down_t^T @ gated       (in place, into the frozen layer's output)
//
// which is what EagerDecoder (qmoe/tuners/base.py) does with each method's eager step (qmoe/tuners/*/layer.py,
// the reference these are tested against). Up to `loop_tokens` tokens per call it runs hand-written loops over the
// weight rows (no BLAS call, no dispatch) and MoELoRA reads only the k chosen experts' A rows and B rows
// (k/n of its adapter weights: the decode-time saving the top-k router promises); more tokens (prefill,
// large batches) take one BLAS matmul each side. float32 CPU tensors only; the Python side checks.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace py = pybind11;

namespace {


enum Method : int64_t { LORA = 0, MOELORA = 1, LORAMOE = 2, LORACOE = 3 };

// The loops below are compiled for several x86 vector widths and the widest the running CPU has is chosen once
// at load time (no -march=native: the build cache may move between machines). target_clones needs ifunc
// (glibc); elsewhere (macOS, musl, ARM) the loops are compiled for the default target.
#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#define QMOE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QMOE_VECTOR_CLONES
#endif

// z[j] = <x, w[j]> for `rows` rows of w (row-major, `width` columns); several rows per pass share x's loads, and
// eight rows in flight at once wait less on memory than four (the weights come from beyond the caches at decode:
// 7-10 % less time in a standalone trial, 2026-12-07).
QMOE_VECTOR_CLONES void rows_dot(const float* x, const float* w, int64_t rows, int64_t width, float* z) {
  int64_t j = 0;
  for (; j + 8 <= rows; j += 8) {
    const float *w0 = w + j * width, *w1 = w0 + width, *w2 = w1 + width, *w3 = w2 + width;
    const float *w4 = w3 + width, *w5 = w4 + width, *w6 = w5 + width, *w7 = w6 + width;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t i = 0; i < width; ++i) {
      s0 += x[i] * w0[i];
      s1 += x[i] * w1[i];
      s2 += x[i] * w2[i];
      s3 += x[i] * w3[i];
      s4 += x[i] * w4[i];
      s5 += x[i] * w5[i];
      s6 += x[i] * w6[i];
      s7 += x[i] * w7[i];
    }
    z[j] = s0, z[j + 1] = s1, z[j + 2] = s2, z[j + 3] = s3, z[j + 4] = s4, z[j + 5] = s5, z[j + 6] = s6, z[j + 7] = s7;
  }
  for (; j + 4 <= rows; j += 4) {
    const float *w0 = w + j * width, *w1 = w0 + width, *w2 = w1 + width, *w3 = w2 + width;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < width; ++i) {
      s0 += x[i] * w0[i];
      s1 += x[i] * w1[i];
      s2 += x[i] * w2[i];
      s3 += x[i] * w3[i];
    }
    z[j] = s0, z[j + 1] = s1, z[j + 2] = s2, z[j + 3] = s3;
  }
  for (; j < rows; ++j) {
    const float* wj = w + j * width;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < width; ++i) s += x[i] * wj[i];
    z[j] = s;
  }
}

// out += sum_j c[j] * w[j] over `rows` rows of w (row-major, `width` columns), eight rows per pass where it can
// (as rows_dot); a leftover single row with c[j] == 0 is skipped.
QMOE_VECTOR_CLONES void rows_axpy(const float* c, const float* w, int64_t rows, int64_t width, float* out) {
  int64_t j = 0;
  for (; j + 8 <= rows; j += 8) {
    const float *w0 = w + j * width, *w1 = w0 + width, *w2 = w1 + width, *w3 = w2 + width;
    const float *w4 = w3 + width, *w5 = w4 + width, *w6 = w5 + width, *w7 = w6 + width;
    const float c0 = c[j], c1 = c[j + 1], c2 = c[j + 2], c3 = c[j + 3];
    const float c4 = c[j + 4], c5 = c[j + 5], c6 = c[j + 6], c7 = c[j + 7];
#pragma omp simd
    for (int64_t i = 0; i < width; ++i)
      out[i] += c0 * w0[i] + c1 * w1[i] + c2 * w2[i] + c3 * w3[i] + c4 * w4[i] + c5 * w5[i] + c6 * w6[i] + c7 * w7[i];
  }
  for (; j + 4 <= rows; j += 4) {
    const float *w0 = w + j * width, *w1 = w0 + width, *w2 = w1 + width, *w3 = w2 + width;
    const float c0 = c[j], c1 = c[j + 1], c2 = c[j + 2], c3 = c[j + 3];
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) out[i] += c0 * w0[i] + c1 * w1[i] + c2 * w2[i] + c3 * w3[i];
  }
  for (; j < rows; ++j) {
    const float* wj = w + j * width;
    const float cj = c[j];
    if (cj == 0.f) continue;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) out[i] += cj * wj[i];
  }
}

// softmax of n logits into out (max-shifted, as torch.softmax)
void softmax(const float* logits, int64_t n, float* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) top = std::max(top, logits[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(logits[i] - top);
    sum += out[i];
  }
  for (int64_t i = 0; i < n; ++i) out[i] /= sum;
}

// The top-k of n logits (descending) into ids; false when a tie touches the choice or its order, where
// torch.topk's own order (an implementation detail) decides and the caller asks it.
bool top_k(const float* logits, int64_t n, int64_t k, int64_t* ids) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < n; ++e) {
      bool taken = false;
      for (int64_t q = 0; q < j; ++q) taken |= ids[q] == e;
      if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
    }
    ids[j] = best;
  }
  for (int64_t e = 0; e < n; ++e)
    for (int64_t j = 0; j < k; ++j)
      if (e != ids[j] && logits[e] == logits[ids[j]]) return false;
  return true;
}

}  // namespace

// bitsandbytes' fused 4-bit CPU kernel (its C library's gemv_4bit_inference_cpu_{nf4,fp4}_bf16; qmoe/kernels/bnb_cpu.py
// finds it): bf16 input rows, the weight in bitsandbytes' CPU packing, bf16 absmax [in / blocksize, out], bf16 out.
using Gemv4bit = void (*)(int64_t m, int64_t n, int64_t k, const uint16_t* x, const uint8_t* w, const uint16_t* absmax,
                          uint16_t* out, int64_t blocksize, int64_t x_stride, int64_t out_stride);

// A frozen bitsandbytes Linear4bit (eval mode, no bias, weights already packed for its CPU kernel) computed the way
// its forward computes it, without the ~35 us of Python (Linear4bit.forward, matmul_4bit, gemv_4bit, the registered
// op, ctypes) around a kernel that itself takes about as long at decode: x rounded to bf16, bitsandbytes' own kernel,
// its bf16 output widened to x's dtype. The same function on the same bytes: bit-identical (self-checked).
class Frozen4bit {
 public:
  Frozen4bit(int64_t address, at::Tensor weight, at::Tensor absmax, int64_t out_features, int64_t in_features,
             int64_t blocksize)
      : kernel_(reinterpret_cast<Gemv4bit>(static_cast<intptr_t>(address))),
        weight_(weight),
        packed_(weight.detach()),
        absmax_(absmax),
        out_(out_features),
        in_(in_features),
        blocksize_(blocksize) {
    TORCH_CHECK(address != 0, "no kernel address");
    TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && weight.numel() * 2 == out_ * in_,
                "the weight must be bitsandbytes' packed uint8 [out, in / 2]");
    TORCH_CHECK(absmax.scalar_type() == at::kBFloat16 && absmax.is_contiguous() &&
                    absmax.numel() == out_ * (in_ / blocksize_),
                "absmax must be bf16 [in / blocksize, out]");
    versions_[0] = weight_._version(), versions_[1] = absmax_._version();
    pointers_[0] = weight_.data_ptr(), pointers_[1] = absmax_.data_ptr();
  }

  // False once the frozen weights changed in place or moved (bitsandbytes repacked them, a load). packed_ keeps
  // the storage this was made for alive, so new weights never reuse its address unnoticed.
  bool fresh() const {
    return weight_._version() == versions_[0] && absmax_._version() == versions_[1] &&
           weight_.data_ptr() == pointers_[0] && absmax_.data_ptr() == pointers_[1];
  }

  int64_t address() const { return static_cast<int64_t>(reinterpret_cast<intptr_t>(kernel_)); }
  int64_t blocksize() const { return blocksize_; }

  // The frozen layer's output for x, or None (nothing done) when the weights changed since
  py::object run(const at::Tensor& x) const {
    if (!fresh()) return py::none();
    at::NoGradGuard no_grad;
    return py::cast(compute(x));
  }

  // x [..., in] (float32, bf16) -> [..., out] in x's dtype
  at::Tensor compute(const at::Tensor& x) const {
    TORCH_CHECK(x.size(-1) == in_, "x has ", x.size(-1), " features, expected ", in_);
    const int64_t tokens = x.numel() / in_;
    std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
    sizes.back() = out_;
    at::Tensor result = at::empty(sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
    const uint8_t* w = packed_.data_ptr<uint8_t>();
    const auto* absmax = reinterpret_cast<const uint16_t*>(absmax_.data_ptr<at::BFloat16>());
    if (x.scalar_type() == at::kFloat && x.is_contiguous() && tokens <= kStackTokens) {
      // decode: the bf16 rounding and widening by hand, on the stack (each tensor op is a dispatch)
      std::vector<at::BFloat16> xb(tokens * in_), ob(tokens * out_);
      const float* xp = x.data_ptr<float>();
      for (int64_t i = 0; i < tokens * in_; ++i) xb[i] = at::BFloat16(xp[i]);  // round to nearest even, as .to()
      kernel_(tokens, out_, in_, reinterpret_cast<const uint16_t*>(xb.data()), w, absmax,
              reinterpret_cast<uint16_t*>(ob.data()), blocksize_, in_, out_);
      float* rp = result.data_ptr<float>();
      for (int64_t i = 0; i < tokens * out_; ++i) rp[i] = static_cast<float>(ob[i]);
      return result;
    }
    at::Tensor xb = x.reshape({tokens, in_}).to(at::kBFloat16).contiguous();
    at::Tensor ob = at::empty({tokens, out_}, xb.options());
    kernel_(tokens, out_, in_, reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), w, absmax,
            reinterpret_cast<uint16_t*>(ob.data_ptr<at::BFloat16>()), blocksize_, in_, out_);
    result.copy_(ob.view(sizes));
    return result;
  }

 private:
  static constexpr int64_t kStackTokens = 16;
  Gemv4bit kernel_;
  at::Tensor weight_, packed_, absmax_;  // the Parameter (its data may be replaced), its data then, absmax then
  int64_t out_, in_, blocksize_;
  int64_t versions_[2];
  const void* pointers_[2];
};

// One adapted layer's fused weights and its eval-mode step. The routing weights and chosen experts a one-token call
// returns (telemetry) live in buffers of the decoder that the next one-token call overwrites: each allocation is a
// dispatched op, a few percent of batch-1 decode for the routed methods; a caller that keeps them (a routing trace)
// copies them.
class Decoder {
 public:
  // up [R', in] and up_t (its contiguous transpose), down_t [R, out] (scales folded in), float32 contiguous;
  // params: the adapter parameters the weights were built from (in-place changes make this decoder stale).
  // loop_tokens: up to this many tokens per call the loops run, more take BLAS
  Decoder(int64_t method, at::Tensor up, at::Tensor up_t, at::Tensor down_t, std::vector<at::Tensor> params,
          int64_t n, int64_t r, int64_t k, int64_t loop_tokens)
      : method_(method),
        up_(up),
        up_t_(up_t),
        down_t_(down_t),
        params_(std::move(params)),
        n_(n),
        r_(r),
        k_(k),
        loop_tokens_(loop_tokens) {
    TORCH_CHECK(up.scalar_type() == at::kFloat && down_t.scalar_type() == at::kFloat, "float32 weights only");
    TORCH_CHECK(up.is_contiguous() && up_t.is_contiguous() && down_t.is_contiguous(), "contiguous weights only");
    in_ = up.size(1), out_ = down_t.size(1), up_rows_ = up.size(0), down_rows_ = down_t.size(0);
    const int64_t expected[] = {down_rows_, n + n * r, r + n, r + n * r};
    TORCH_CHECK(method >= LORA && method <= LORACOE, "unknown method ", method);
    TORCH_CHECK(up_rows_ == expected[method], "up has ", up_rows_, " rows, expected ", expected[method]);
    TORCH_CHECK(method != MOELORA || (k >= 1 && k <= n), "top_k must be in [1, num_experts]");
    TORCH_CHECK(method != LORAMOE || (r % n == 0), "the rank must split evenly over the experts");
    for (const auto& p : params_) versions_.push_back(p._version()), pointers_.push_back(p.data_ptr());
  }

  // False once a parameter was changed in place or given new storage since the weights were fused.
  bool fresh() const {
    for (size_t i = 0; i < params_.size(); ++i)
      if (params_[i]._version() != versions_[i] || params_[i].data_ptr() != pointers_[i]) return false;
    return true;
  }

  // Computes the frozen layer itself from now on (run_frozen).
  void attach_frozen(const Frozen4bit& frozen) { frozen_ = frozen; }

  // The frozen layer's output plus the adapter's, in one call (attach_frozen first); None when either is stale.
  py::object run_frozen(const at::Tensor& x) {
    TORCH_CHECK(frozen_.has_value(), "no frozen layer attached");
    if (!frozen_->fresh() || !fresh()) return py::none();
    at::NoGradGuard no_grad;
    return run(frozen_->compute(x), x);
  }

  // result [..., out] += the adapter's output for x [..., in]. Returns None when stale (nothing done), else
  // (result, routing weights or None, chosen experts or None) for the routing telemetry.
  py::object run(at::Tensor result, const at::Tensor& x) {
    if (!fresh()) return py::none();
    at::NoGradGuard no_grad;
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_, "x has ", x.size(-1), " features, expected ", in_);
    const int64_t tokens = x.numel() / in_;
    at::Tensor weights, ids;
    if (method_ != LORA) {
      const int64_t width = method_ == LORACOE ? r_ : n_;  // (LoRACoE's "experts" in telemetry are its ranks)
      if (tokens == 1) {  // batch-1 decode: this decoder's own buffers, no allocation per call (see the class)
        if (!one_weights_.defined()) {
          one_weights_ = at::empty({1, width}, at::kFloat);
          if (method_ == MOELORA) one_ids_ = at::empty({1, k_}, at::kLong);
        }
        weights = one_weights_, ids = one_ids_;
        std::fill_n(weights.data_ptr<float>(), width, 0.f);  // (MoELoRA sets its chosen, LoRACoE accumulates)
      } else {
        weights = at::zeros({tokens, width}, at::kFloat);
        if (method_ == MOELORA) ids = at::empty({tokens, k_}, at::kLong);
      }
    }
    const bool in_place = result.scalar_type() == at::kFloat && result.is_contiguous();
    if (in_place && tokens <= loop_tokens_ && x.scalar_type() == at::kFloat && x.is_contiguous()) {
      // decode's common case: straight to the loops on raw pointers (no views: each is a dispatched op)
      loops(x.data_ptr<float>(), result.data_ptr<float>(), tokens, weights, ids);
    } else {
      at::Tensor flat = x.reshape({-1, in_}).to(at::kFloat).contiguous();
      at::Tensor out = in_place ? result.view({-1, out_}) : at::zeros({tokens, out_}, flat.options());
      if (tokens <= loop_tokens_)
        loops(flat.data_ptr<float>(), out.data_ptr<float>(), tokens, weights, ids);
      else
        blas(flat, out, weights, ids);
      if (!in_place) result = result + out.view(result.sizes()).to(result.scalar_type());
    }
    return py::make_tuple(result, weights.defined() ? py::cast(weights) : py::none(),
                          ids.defined() ? py::cast(ids) : py::none());
  }

 private:
  void loops(const float* x, float* out, int64_t tokens, at::Tensor& weights, at::Tensor& ids) const {
    std::vector<float> z(up_rows_), c(down_rows_), scratch(2 * std::max(k_, r_));
    float* wp = weights.defined() ? weights.data_ptr<float>() : nullptr;
    int64_t* ip = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
    const int64_t width = weights.defined() ? weights.size(1) : 0;
    for (int64_t t = 0; t < tokens; ++t)
      token_loop(x + t * in_, out + t * out_, z.data(), c.data(), scratch.data(), wp ? wp + t * width : nullptr,
                 ip ? ip + t * k_ : nullptr);
  }

  void blas(const at::Tensor& flat, at::Tensor& out, at::Tensor& weights, at::Tensor& ids) const {
    const int64_t tokens = flat.size(0);
    at::Tensor z = at::mm(flat, up_t_).contiguous();
    if (method_ == LORA) {
      out.addmm_(z, down_t_);
      return;
    }
    at::Tensor gated = at::empty({tokens, down_rows_}, flat.options());
    const float* zp = z.data_ptr<float>();
    float* gp = gated.data_ptr<float>();
    if (method_ == MOELORA) {  // torch's own top-k for many tokens: the eager path's experts, ties included
      auto top = at::topk(z.narrow(1, 0, n_), k_, /*dim=*/1);
      ids = std::get<1>(top).contiguous();
    }
    float* wp = weights.data_ptr<float>();
    const int64_t* ip = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
    std::vector<float> scratch(2 * std::max(k_, r_));
    for (int64_t t = 0; t < tokens; ++t)
      gate_token(zp + t * up_rows_, gp + t * down_rows_, wp + t * weights.size(1), ip ? ip + t * k_ : nullptr,
                 scratch.data());
    out.addmm_(gated, down_t_);
  }

  // gated rank activations c [R] from z [R'] for one token, writing its routing weights (and, MoELoRA, using
  // the chosen ids already in `chosen`)
  // (scratch: 2 * max(k, r) floats)
  void gate_token(const float* z, float* c, float* weights, const int64_t* chosen, float* scratch) const {
    switch (method_) {
      case LORA:
        std::copy(z, z + down_rows_, c);
        break;
      case MOELORA: {  // z = [router logits (n) | expert e's ranks (n blocks of r)]
        chosen_weights(z, chosen, weights, scratch);
        for (int64_t e = 0; e < n_; ++e)
          for (int64_t i = 0; i < r_; ++i) c[e * r_ + i] = z[n_ + e * r_ + i] * weights[e];
        break;
      }
      case LORAMOE: {  // z = [ranks (n experts x r/n) | router logits (n)]; dense softmax gate
        const int64_t per = r_ / n_;
        softmax(z + r_, n_, weights);
        for (int64_t e = 0; e < n_; ++e)
          for (int64_t i = 0; i < per; ++i) c[e * per + i] = z[e * per + i] * weights[e];
        break;
      }
      case LORACOE: {  // z = [ranks (r) | router (e experts x r)]; mean over experts of the softmax over ranks
        float* p = scratch;
        for (int64_t i = 0; i < n_; ++i) {
          softmax(z + r_ + i * r_, r_, p);
          for (int64_t j = 0; j < r_; ++j) weights[j] += p[j];
        }
        for (int64_t j = 0; j < r_; ++j) {
          weights[j] /= static_cast<float>(n_);
          c[j] = z[j] * weights[j];
        }
        break;
      }
    }
  }

  // MoELoRA's gate for one token: weights[chosen[j]] = softmax of the chosen experts' logits (the renormalised
  // top-k of the softmax); the others stay 0. (scratch: 2k floats)
  void chosen_weights(const float* logits, const int64_t* chosen, float* weights, float* scratch) const {
    float *top = scratch, *w = scratch + k_;
    for (int64_t j = 0; j < k_; ++j) top[j] = logits[chosen[j]];
    softmax(top, k_, w);
    for (int64_t j = 0; j < k_; ++j) weights[chosen[j]] = w[j];
  }

  // one token without BLAS: MoELoRA routes first and then reads only its chosen experts' rows
  void token_loop(const float* x, float* out, float* z, float* c, float* scratch, float* weights,
                  int64_t* chosen) const {
    const float* up = up_.data_ptr<float>();
    const float* down = down_t_.data_ptr<float>();
    if (method_ != MOELORA) {
      rows_dot(x, up, up_rows_, in_, z);
      gate_token(z, c, weights, chosen, scratch);
      rows_axpy(c, down, down_rows_, out_, out);
      return;
    }
    rows_dot(x, up, n_, in_, z);  // the router's n logits
    if (!top_k(z, n_, k_, chosen)) {
      auto top = at::topk(at::from_blob(z, {n_}, at::kFloat), k_);
      const int64_t* ip = std::get<1>(top).data_ptr<int64_t>();
      std::copy(ip, ip + k_, chosen);
    }
    chosen_weights(z, chosen, weights, scratch);
    for (int64_t j = 0; j < k_; ++j) {
      const int64_t e = chosen[j];
      float* ze = z + n_ + e * r_;
      rows_dot(x, up + (n_ + e * r_) * in_, r_, in_, ze);
      for (int64_t i = 0; i < r_; ++i) ze[i] *= weights[e];
      rows_axpy(ze, down + e * r_ * out_, r_, out_, out);
    }
  }

  int64_t method_;
  at::Tensor up_, up_t_, down_t_;
  std::vector<at::Tensor> params_;
  std::vector<int64_t> versions_;
  std::vector<const void*> pointers_;
  int64_t n_, r_, k_, loop_tokens_, in_ = 0, out_ = 0, up_rows_ = 0, down_rows_ = 0;
  std::optional<Frozen4bit> frozen_;
  at::Tensor one_weights_, one_ids_;  // a one-token call's routing weights [1, E] and chosen experts [1, k]
};

// The frozen layer as an operator, for compiled graphs (torch.compile cannot trace a Frozen4bit object):
// qmoe::gemv_4bit_cpu(x, weight, absmax, address, out_features, blocksize), what Frozen4bit.run computes.
at::Tensor gemv_4bit_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& absmax, int64_t address,
                         int64_t out_features, int64_t blocksize) {
  return Frozen4bit(address, weight, absmax, out_features, x.size(-1), blocksize).compute(x);
}

TORCH_LIBRARY_FRAGMENT(qmoe, m) {
  m.def("gemv_4bit_cpu(Tensor x, Tensor weight, Tensor absmax, int address, int out_features, int blocksize) -> Tensor");
}

TORCH_LIBRARY_IMPL(qmoe, CPU, m) { m.impl("gemv_4bit_cpu", &gemv_4bit_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Frozen4bit>(m, "Frozen4bit")
      .def(py::init<int64_t, at::Tensor, at::Tensor, int64_t, int64_t, int64_t>(), py::arg("address"),
           py::arg("weight"), py::arg("absmax"), py::arg("out_features"), py::arg("in_features"),
           py::arg("blocksize"))
      .def("fresh", &Frozen4bit::fresh, "False once the frozen weights changed or moved")
      .def_property_readonly("address", &Frozen4bit::address)
      .def_property_readonly("blocksize", &Frozen4bit::blocksize)
      .def("run", &Frozen4bit::run, py::arg("x"),
           "the frozen layer's output for x as Linear4bit.forward computes it, or None when its weights changed");
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, int64_t, int64_t,
                    int64_t, int64_t>(),
           py::arg("method"), py::arg("up"), py::arg("up_t"), py::arg("down_t"), py::arg("params"), py::arg("n"),
           py::arg("r"), py::arg("k"), py::arg("loop_tokens"))
      .def("fresh", &Decoder::fresh, "False once a parameter changed since the weights were fused")
      .def("run", &Decoder::run, py::arg("result"), py::arg("x"),
           "result += adapter(x) in place where it can; (result, routing weights, chosen) or None when stale")
      .def("attach_frozen", &Decoder::attach_frozen, py::arg("frozen"), "compute the frozen layer too (run_frozen)")
      .def("run_frozen", &Decoder::run_frozen, py::arg("x"),
           "the frozen layer's output + adapter(x): (result, routing weights, chosen) or None when stale");
}
