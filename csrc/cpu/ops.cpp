// Operator schemas and CPU registrations of the private _cahfp_cpp namespace.
//
// These are the compiled CPU kernels behind the public torch.ops.cahfp.*
// operators; they take the canonical forms produced by the Python layer
// (-1 padded int64 keep sets, normalised float64 coefficients) and view N-D
// tensors as (rows, cols, trailing elements) themselves.
#include "common.h"

#include <torch/library.h>

#include <optional>
#include <tuple>

namespace cahfp {

at::Tensor reconstruct_aggregate_cpu(const at::Tensor& weight, at::TensorList clients, const at::Tensor& rows,
                                     const at::Tensor& cols, const at::Tensor& coef, c10::string_view mode);
at::Tensor reconstruct_aggregate_many_cpu(at::TensorList weights, at::TensorList clients, at::TensorList rows,
                                          at::TensorList cols, const at::Tensor& coef, c10::string_view mode);
at::Tensor slice_channels_cpu(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& cols,
                              int64_t total);
at::Tensor slice_channels_many_cpu(at::TensorList weights, at::TensorList rows, at::TensorList cols, int64_t total);
std::tuple<at::Tensor, at::Tensor> topk_channel_masks_cpu(const at::Tensor& scores, const at::Tensor& keep,
                                                          int64_t max_keep);
at::Tensor curvature_scores_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& grad,
                                const std::optional<at::Tensor>& hess, int64_t dim);

// Debug switch used by the tests (see poison_outputs in common.h).
void set_poison_outputs(bool enabled) { poison_outputs().store(enabled); }

TORCH_LIBRARY(_cahfp_cpp, m) {
  m.def("set_poison_outputs(bool enabled) -> ()", &set_poison_outputs);
  m.def("curvature_scores(Tensor weight, Tensor? grad, Tensor? hess, int dim) -> Tensor");
  m.def("topk_channel_masks(Tensor scores, Tensor keep, int max_keep) -> (Tensor, Tensor)");
  m.def("slice_channels(Tensor weight, Tensor rows, Tensor cols, int total) -> Tensor");
  m.def(
      "reconstruct_aggregate(Tensor weight, Tensor[] clients, Tensor rows, Tensor cols, Tensor coef, str mode) "
      "-> Tensor");
  m.def(
      "reconstruct_aggregate_many(Tensor[] weights, Tensor[] clients, Tensor[] rows, Tensor[] cols, Tensor coef, "
      "str mode) -> Tensor");
  m.def("slice_channels_many(Tensor[] weights, Tensor[] rows, Tensor[] cols, int total) -> Tensor");
}

TORCH_LIBRARY_IMPL(_cahfp_cpp, CPU, m) {
  m.impl("curvature_scores", &curvature_scores_cpu);
  m.impl("topk_channel_masks", &topk_channel_masks_cpu);
  m.impl("slice_channels", &slice_channels_cpu);
  m.impl("reconstruct_aggregate", &reconstruct_aggregate_cpu);
  m.impl("reconstruct_aggregate_many", &reconstruct_aggregate_many_cpu);
  m.impl("slice_channels_many", &slice_channels_many_cpu);
}

}  // namespace cahfp
