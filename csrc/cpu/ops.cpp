// Operator schemas and CPU registrations of the private _cahfp_cpp namespace,
// on PyTorch's LibTorch stable ABI (STABLE_TORCH_LIBRARY, TORCH_BOX).
//
// These are the compiled CPU kernels behind the public torch.ops.cahfp.*
// operators; they take the canonical forms produced by the Python layer
// (-1 padded int64 keep sets, normalised float64 coefficients) and view N-D
// tensors as (rows, cols, trailing elements) themselves. The control ops
// (poison switch, ISA cap) take a CPU tensor argument only so that the
// dispatcher has a key to route them by.
// Python.h first, as CPython asks; only the limited API is used (the wheel is abi3).
#include <Python.h>

#include "aggregate.h"
#include "common.h"
#include "isa.h"
#include "masks.h"
#include "packed.h"
#include "robust.h"
#include "scores.h"
#include "slice.h"

#include <optional>
#include <tuple>

namespace cahfp {

namespace {

// Debug switch used by the tests (see poison_outputs in common.h). Returns the old value.
bool set_poison_outputs(Tensor /*device*/, bool enabled) { return poison_outputs().exchange(enabled); }

// CPU variant in use: 0 baseline, 1 AVX2, 2 AVX-512 (isa.h). level >= 0 caps the variant,
// -1 removes the cap, -2 only asks; returns {variant in use, best variant this CPU supports}.
std::tuple<int64_t, int64_t> cap_isa(Tensor /*device*/, int64_t level) {
  const int64_t active = level == -2 ? active_isa() : set_isa(level);
  return {active, detected_isa()};
}

}  // namespace

STABLE_TORCH_LIBRARY(_cahfp_cpp, m) {
  m.def("set_poison_outputs(Tensor device, bool enabled) -> bool");
  m.def("cap_isa(Tensor device, int level) -> (int, int)");
  m.def("curvature_scores(Tensor weight, Tensor? grad, Tensor? hess, int dim) -> Tensor");
  m.def("topk_channel_masks(Tensor scores, Tensor keep, int max_keep) -> (Tensor, Tensor)");
  m.def("slice_channels(Tensor weight, Tensor rows, Tensor cols, int total) -> Tensor");
  m.def(
      "reconstruct_aggregate(Tensor weight, Tensor[] clients, Tensor rows, Tensor cols, Tensor coef, str mode) "
      "-> Tensor");
  m.def(
      "reconstruct_aggregate_many(Tensor[] weights, Tensor[] clients, Tensor[] rows, Tensor[] cols, Tensor coef, "
      "str mode) -> Tensor");
  m.def(
      "robust_aggregate(Tensor weight, Tensor[] clients, Tensor rows, Tensor cols, Tensor coef, str mode, "
      "str reduce, float trim) -> Tensor");
  m.def("slice_channels_many(Tensor[] weights, Tensor[] rows, Tensor[] cols, int total) -> Tensor");
  m.def(
      "slice_packed(Tensor[] weights, Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor starts, "
      "Tensor(a!) out) -> ()");
  m.def(
      "aggregate_packed(Tensor[] weights, Tensor[] clients, int[] parts, Tensor meta, Tensor row_inv, "
      "Tensor col_keep, Tensor counts, Tensor offsets, Tensor coef, str mode, Tensor(a!) out, Tensor(b!) stats, "
      "int plan) -> ()");
  m.def(
      "accumulate_packed(Tensor[] weights, Tensor[] client, int[] parts, Tensor meta, Tensor row_inv, Tensor col_keep, "
      "Tensor counts, Tensor offsets, float weight, float max_ssq, str mode, Tensor(a!) sums, Tensor(b!) cover, "
      "Tensor(c!) stats) -> ()");
  m.def(
      "fold_packed(Tensor[] weights, Tensor[] clients, int[] parts, Tensor meta, Tensor row_inv, Tensor col_keep, "
      "Tensor counts, Tensor offsets, Tensor coef, str mode, Tensor sums_in, Tensor cover_in, Tensor(a!) sums_out, "
      "Tensor(b!) cover_out, Tensor(c!) stats, int plan) -> ()");
  m.def("plan_layout(Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets) -> int");
  m.def("plan_subset(Tensor device, int plan, Tensor clients) -> int");
  m.def("release_layout_plan(Tensor device, int plan) -> ()");
  m.def(
      "finish_partials(Tensor[] weights, Tensor sums, Tensor cover, float weight_sum, str mode, Tensor(a!) out) "
      "-> ()");
}

STABLE_TORCH_LIBRARY_IMPL(_cahfp_cpp, CPU, m) {
  m.impl("set_poison_outputs", TORCH_BOX(&set_poison_outputs));
  m.impl("cap_isa", TORCH_BOX(&cap_isa));
  m.impl("curvature_scores", TORCH_BOX(&curvature_scores_cpu));
  m.impl("topk_channel_masks", TORCH_BOX(&topk_channel_masks_cpu));
  m.impl("slice_channels", TORCH_BOX(&slice_channels_cpu));
  m.impl("reconstruct_aggregate", TORCH_BOX(&reconstruct_aggregate_cpu));
  m.impl("reconstruct_aggregate_many", TORCH_BOX(&reconstruct_aggregate_many_cpu));
  m.impl("robust_aggregate", TORCH_BOX(&robust_aggregate_cpu));
  m.impl("slice_channels_many", TORCH_BOX(&slice_channels_many_cpu));
  m.impl("slice_packed", TORCH_BOX(&slice_packed_cpu));
  m.impl("aggregate_packed", TORCH_BOX(&aggregate_packed_cpu));
  m.impl("accumulate_packed", TORCH_BOX(&accumulate_packed_cpu));
  m.impl("fold_packed", TORCH_BOX(&fold_packed_cpu));
  m.impl("finish_partials", TORCH_BOX(&finish_partials_cpu));
  m.impl("plan_layout", TORCH_BOX(&plan_layout_cpu));
  m.impl("plan_subset", TORCH_BOX(&plan_subset_cpu));
  m.impl("release_layout_plan", TORCH_BOX(&release_layout_plan_cpu));
}

}  // namespace cahfp

// An empty Python module, so that `import cahfp_ops._C` (pkgutil, documentation tools)
// works instead of failing, and loads the kernels like torch.ops.load_library does.
// PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cahfp-ops compiled CPU kernels", -1, nullptr,
                                      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
