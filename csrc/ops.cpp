// Every normkit operator schema, in one place. Kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu,
// each registering its own TORCH_LIBRARY_IMPL block; device-neutral compositions and C++ autograd kernels in
// csrc/autograd/<op>.cpp. Other autograd and all fake kernels are registered in Python (normkit/ops).
// Private ops (leading underscore) are the pieces public ops and their backwards are built from.
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"

// setup.py passes the CUDA code targets compiled for (e.g. sm_80,sm_90,compute_90); empty in a CPU-only build.
#ifndef NORMKIT_CUDA_ARCHS
#define NORMKIT_CUDA_ARCHS
#endif
// Variadic: the list's commas would otherwise split it into several macro arguments.
#define NORMKIT_STRINGIFY_EXPANDED(...) #__VA_ARGS__
#define NORMKIT_STRINGIFY(...) NORMKIT_STRINGIFY_EXPANDED(__VA_ARGS__)

// `import normkit._C` loads this library, which registers the ops below with the dispatcher. Its attributes tell
// bug reports (python -m normkit.collect_env) what the CUDA kernels were built for (cuda_archs) and which build of
// the CPU kernels this process runs (cpu_kernels: "avx2" or "baseline", csrc/cpu/isa.h; torch is loaded first, so
// ATEN_CPU_CAPABILITY has been read).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "normkit compiled operators", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr &&
      (PyModule_AddStringConstant(m, "cuda_archs", NORMKIT_STRINGIFY(NORMKIT_CUDA_ARCHS)) < 0 ||
       PyModule_AddStringConstant(m, "cpu_kernels", normkit::use_avx2_kernels() ? "avx2" : "baseline") < 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY(normkit, m) {
  // ---- Switchable Normalization (csrc/cpu/switch_norm.cpp, csrc/cuda/switch_norm.cu) ----
  // moments: (N, C, 2) per-(n, c) mean and sum of squared deviations, in the accumulation dtype.
  // coefficients: (N, C, 2) per-(n, c) scale and shift with y = scale * x + shift.
  // bn_stats: (3, C) batch-norm statistics used [mean, var, count]; count is the number of (n) members.
  // switch_norm follows aten::batch_norm: `training` (or no running buffers) takes the BN statistics from the batch
  // and, with running buffers, updates them in place (momentum; moving_average=False: the official batch-average
  // sums); otherwise the running statistics are used.
  m.def("switch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor mean_weight, Tensor var_weight, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, bool moving_average, "
        "bool has_instance, float eps) -> (Tensor output, Tensor moments, Tensor bn_stats)");
  m.def("_switch_norm_backward(Tensor grad_output, Tensor input, Tensor moments, Tensor bn_stats, Tensor? weight, "
        "Tensor mean_weight, Tensor var_weight, bool use_batch_stats, bool has_instance, float eps) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_mean_weight, Tensor grad_var_weight)");
  m.def("_switch_norm_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor bn_stats, "
        "float momentum, bool moving_average) -> ()");
  m.def("_switch_norm_moments(Tensor input) -> Tensor");
  m.def("_switch_norm_forward_coefficients(Tensor moments, Tensor? weight, Tensor? bias, Tensor mean_weight, "
        "Tensor var_weight, Tensor? bn_stats, int count, bool has_instance, float eps) -> (Tensor, Tensor)");
  m.def("_switch_norm_affine(Tensor input, Tensor coefficients) -> Tensor");
  m.def("_switch_norm_grad_moments(Tensor grad_output, Tensor input) -> Tensor");
  m.def("_switch_norm_backward_reduce(Tensor grad_moments, Tensor moments, Tensor bn_stats, Tensor? weight, "
        "Tensor mean_weight, Tensor var_weight, int count, bool has_instance, float eps) "
        "-> (Tensor grad_weight, Tensor grad_bias, Tensor grad_mean_weight, Tensor grad_var_weight, Tensor bn_grad)");
  m.def("_switch_norm_backward_coefficients(Tensor grad_moments, Tensor moments, Tensor bn_stats, Tensor? bn_grad, "
        "Tensor? weight, Tensor mean_weight, Tensor var_weight, int count, bool has_instance, float eps) -> Tensor");
  m.def("_switch_norm_affine_backward(Tensor grad_output, Tensor input, Tensor coefficients) -> Tensor");

  // ---- ROI ops (csrc/cpu/roi_align.cpp, roi_pool.cpp, nms.cpp and their CUDA twins) ----
  // rois: Tensor[K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates, same dtype as input.
  // Outputs keep a channels_last input's layout. `deterministic` does not change the forward: it selects the
  // backward kernel (CUDA: ordered gather instead of atomics); the Python front end sets it from
  // torch.are_deterministic_algorithms_enabled() or the caller's explicit flag.
  m.def("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "int sampling_ratio, bool aligned, bool deterministic=False) -> Tensor");
  m.def("_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
        "bool aligned, bool deterministic) -> Tensor");
  // argmax: int32 spatial index (y * W + x) of each output's source cell, -1 for empty bins.
  m.def("roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
        "-> (Tensor output, Tensor argmax)");
  m.def("_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor");
  // Indices (int64) of the kept boxes in decreasing score order. offset=1: Detectron legacy (+1 areas, IoU >=).
  m.def("nms(Tensor dets, Tensor scores, float iou_threshold, int offset=0) -> Tensor");
  // NMS within each category idxs (integer Tensor[N]): boxes of different categories never suppress each other.
  m.def("batched_nms(Tensor dets, Tensor scores, Tensor idxs, float iou_threshold, int offset=0) -> Tensor");
  // batched_nms run over groups of whole categories, each of at most max_group_boxes boxes unless one category
  // is larger (csrc/common/nms_groups.h); the CUDA batched_nms takes this path above 4096 boxes. Same result.
  m.def("_batched_nms_in_groups(Tensor dets, Tensor scores, Tensor idxs, float iou_threshold, int offset, "
        "int max_group_boxes) -> Tensor");

  // ---- Conditional classifier (csrc/cpu/cond_classifier.cpp, csrc/cuda/cond_classifier.cu) ----
  // guidance: (B, K, H, W) class logits; features: (B, C, H, W). Embedding (B, K, C):
  // E[b, k] = mean over pixels of softmax_k(guidance)[b, k, i] * features[b, :, i].
  m.def("class_embedding(Tensor guidance, Tensor features) -> Tensor");
  // Recomputes the class softmax instead of saving it, so autograd keeps only guidance and features.
  m.def("_class_embedding_backward(Tensor grad_embedding, Tensor guidance, Tensor features) "
        "-> (Tensor grad_guidance, Tensor grad_features)");
  // Per-sample 1x1 classification: out[b, k, i] = sum_c weight[b, k, c] * features[b, c, i] + bias[b, k].
  m.def("dynamic_classify(Tensor features, Tensor weight, Tensor? bias) -> Tensor");
  // grad_bias is (B, K) zeros when has_bias is false.
  m.def("_dynamic_classify_backward(Tensor grad_output, Tensor features, Tensor weight, bool has_bias) "
        "-> (Tensor grad_features, Tensor grad_weight, Tensor grad_bias)");
}
