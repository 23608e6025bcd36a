// Op schemas of pbp_fast: the one registry every backend implements (CPU in csrc/cpu, CUDA in
// kernels/, Triton). Fake implementations and autograd live in pbp_fast/ops/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import pbp_fast._C` loads this library so that the TORCH_LIBRARY blocks below run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

TORCH_LIBRARY(pbp_fast, m) {
  // y = base + conv(x; weight, bias) + sum_k d_scale[k] * s_k,
  // s_k = sigmoid(conv(x; d_weight[k], d_bias[k]) + sum_{j<k} d_cascade[k, j] * s_j).
  // Returns (y, s) with s the (D, N, Cout, Ho, Wo) activations when save_s, else empty.
  m.def("dendritic_conv2d_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, "
        "Tensor d_weight, Tensor? d_bias, Tensor d_scale, Tensor? d_cascade, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool save_s) -> (Tensor, Tensor)");
  // Gradients of the above (perforated: x only through the main conv), in the order
  // (x, weight, bias, d_weight, d_bias, d_scale, d_cascade); masked-off entries are empty.
  m.def("dendritic_conv2d_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor d_weight, "
        "Tensor d_scale, Tensor? d_cascade, Tensor s, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool[7] output_mask) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)");
  // One candidate, one batch: v = sigmoid(conv(x; weight, bias) + sum_j cascade[j] * s[j]),
  // per-channel sums (v, e, v*e, e*e, v*v) as float32 (5, Cout), and the gradients of
  // L = -sum sign * (e - mean_e) * v / n w.r.t. (weight, bias, cascade).
  m.def("candidate_pass(Tensor x, Tensor weight, Tensor? bias, Tensor? cascade, Tensor? s, "
        "Tensor e, Tensor mean_e, Tensor sign, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups) -> (Tensor, Tensor, Tensor, Tensor)");
  // The candidate pass after its conv, on the pre-activation z computed by the caller (a
  // candidate with a BatchNorm: conv, then the batch's normalisation): v = sigmoid(z + sum_j
  // cascade[j] * s[j]); returns the float64 per-channel sums (6 + D, Cout) of (v, e, v*e, e*e,
  // v*v, g, g*s_j) with g = dL/dz = -sign * (e - mean_e) / n * v * (1 - v), and g.
  m.def("candidate_epilogue(Tensor z, Tensor? cascade, Tensor? s, Tensor e, Tensor mean_e, "
        "Tensor sign) -> (Tensor, Tensor)");
  // From a candidate's running means (5, Cout) float64 of (v, e, v e, e e, v v):
  // (mean_e, sign(C)) in `dtype`, what candidate_pass takes (C = correlation, docs/design.md "The math").
  m.def("candidate_objective(Tensor mean, ScalarType dtype) -> (Tensor, Tensor)");
  // One batch's bookkeeping, in place: fold the batch's sums (5, Cout) over n positions into the
  // running means (cumulative for warmup_batches batches, then an EMA with momentum; skipped
  // for an empty or non-finite batch), count and batches; best_score = score = sum |C| (0-dim
  // best_score) or |C_c| per channel ((Cout,) best_score) where that beats it by more than
  // threshold after the warm-up; C is Pearson's r with pearson, else cov(v, e) / std(e).
  // Returns that decision (bool, best_score's shape): where the candidate's weights are to be
  // snapshotted.
  m.def("candidate_update(Tensor(a!) mean, Tensor(b!) count, Tensor(c!) batches, "
        "Tensor(d!) best_score, Tensor sums, Tensor n, int warmup_batches, float momentum, "
        "float threshold, bool pearson) -> Tensor");
}
