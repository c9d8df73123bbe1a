// qmoe's CPU inference kernels: one call per adapted layer instead of ~15 eager PyTorch ops.
//
// At decode time (a few tokens per forward) an adapter's arithmetic is tiny and its cost is per-op
// overhead: every PyTorch op costs microseconds of dispatch, more right after bitsandbytes' 4-bit kernel
// has evicted the caches. Each function here does what AdapterLayer.forward_inference does in eager
// PyTorch for one method (qmoe/tuners/*/layer.py, the reference these are tested against):
//
//   z = flat @ up_t                  (one matmul: rank activations and router logits)
//   gated = routing(z)               (a plain loop over tokens: experts and ranks are few)
//   result2d += gated @ down_t       (in place, into the frozen layer's output)
//
// and returns what the routing telemetry records. float32 CPU tensors only; the caller checks.
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

at::Tensor up_matmul(const at::Tensor& flat, const at::Tensor& up_t) {
  TORCH_CHECK(flat.scalar_type() == at::kFloat && up_t.scalar_type() == at::kFloat, "float32 tensors only");
  return at::mm(flat, up_t).contiguous();
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

}  // namespace

// LoRA (and LoRACoE's warm-up stage): result2d += (flat @ A^T) @ (s B)^T
void lora(at::Tensor result2d, const at::Tensor& flat, const at::Tensor& up_t, const at::Tensor& down_t) {
  at::NoGradGuard no_grad;
  result2d.addmm_(up_matmul(flat, up_t), down_t);
}

// MoELoRA: z = [router logits (n) | expert e's ranks (n blocks of r)]; the top-k experts by logit (at::topk), weighted by
// the softmax of their logits (= renormalised top-k of the softmax). Returns (dense gate [T, n], top ids [T, k]).
std::vector<at::Tensor> moelora(at::Tensor result2d, const at::Tensor& flat, const at::Tensor& up_t,
                                const at::Tensor& down_t, int64_t n, int64_t r, int64_t k) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(k >= 1 && k <= n, "top_k must be in [1, num_experts]");
  at::Tensor z = up_matmul(flat, up_t);
  const int64_t tokens = z.size(0), width = z.size(1);
  TORCH_CHECK(width == n + n * r, "z has ", width, " columns, expected n + n*r = ", n + n * r);
  // torch's own top-k: the same experts as the eager path, ties (e.g. an all-zero input row) included
  auto top = at::topk(z.narrow(1, 0, n), k, /*dim=*/1);
  at::Tensor values = std::get<0>(top).contiguous(), ids = std::get<1>(top).contiguous();
  at::Tensor gate = at::zeros({tokens, n}, z.options());
  at::Tensor gated = at::empty({tokens, n * r}, z.options());
  const float* zp = z.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  float* gp = gate.data_ptr<float>();
  float* out = gated.data_ptr<float>();
  std::vector<float> weights(k);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = zp + t * width;
    softmax(vp + t * k, k, weights.data());
    for (int64_t j = 0; j < k; ++j) gp[t * n + ip[t * k + j]] = weights[j];
    for (int64_t e = 0; e < n; ++e) {
      const float g = gp[t * n + e];
      for (int64_t i = 0; i < r; ++i) out[t * n * r + e * r + i] = row[n + e * r + i] * g;
    }
  }
  result2d.addmm_(gated, down_t);
  return {gate, ids};
}

// LoRAMoE: z = [ranks (n experts x r/n) | router logits (n)]; dense softmax gate. Returns probabilities [T, n].
at::Tensor loramoe(at::Tensor result2d, const at::Tensor& flat, const at::Tensor& up_t, const at::Tensor& down_t,
                   int64_t n, int64_t r) {
  at::NoGradGuard no_grad;
  at::Tensor z = up_matmul(flat, up_t);
  const int64_t tokens = z.size(0), width = z.size(1), per = r / n;
  TORCH_CHECK(width == r + n && per * n == r, "z has ", width, " columns, expected r + n = ", r + n);
  at::Tensor probs = at::empty({tokens, n}, z.options());
  at::Tensor gated = at::empty({tokens, r}, z.options());
  const float* zp = z.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  float* out = gated.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = zp + t * width;
    float* p = pp + t * n;
    softmax(row + r, n, p);
    for (int64_t e = 0; e < n; ++e)
      for (int64_t i = 0; i < per; ++i) out[t * r + e * per + i] = row[e * per + i] * p[e];
  }
  result2d.addmm_(gated, down_t);
  return probs;
}

// LoRACoE (joint stage): z = [ranks (r) | router (e experts x r)]; rank weights = mean over experts of each
// expert's softmax over the ranks (the composition factor is folded into down_t). Returns weights [T, r].
at::Tensor loracoe(at::Tensor result2d, const at::Tensor& flat, const at::Tensor& up_t, const at::Tensor& down_t,
                   int64_t e, int64_t r) {
  at::NoGradGuard no_grad;
  at::Tensor z = up_matmul(flat, up_t);
  const int64_t tokens = z.size(0), width = z.size(1);
  TORCH_CHECK(width == r + e * r, "z has ", width, " columns, expected r + e*r = ", r + e * r);
  at::Tensor weights = at::zeros({tokens, r}, z.options());
  at::Tensor gated = at::empty({tokens, r}, z.options());
  const float* zp = z.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  float* out = gated.data_ptr<float>();
  std::vector<float> p(r);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = zp + t * width;
    float* w = wp + t * r;
    for (int64_t i = 0; i < e; ++i) {
      softmax(row + r + i * r, r, p.data());
      for (int64_t j = 0; j < r; ++j) w[j] += p[j];
    }
    for (int64_t j = 0; j < r; ++j) {
      w[j] /= static_cast<float>(e);
      out[t * r + j] = row[j] * w[j];
    }
  }
  result2d.addmm_(gated, down_t);
  return weights;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora", &lora, "LoRA decode: result2d += (flat @ up_t) @ down_t");
  m.def("moelora", &moelora, "MoELoRA decode (top-k routing); returns (gate, top ids)");
  m.def("loramoe", &loramoe, "LoRAMoE decode (dense softmax gate); returns probabilities");
  m.def("loracoe", &loracoe, "LoRACoE decode (rank composition); returns rank weights");
}
