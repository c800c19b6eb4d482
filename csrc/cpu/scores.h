// The scores family: curvature-aware channel importance.
#pragma once

#include "common.h"

#include <optional>

namespace cahfp {

Tensor curvature_scores_cpu(Tensor weight, std::optional<Tensor> grad, std::optional<Tensor> hess, int64_t dim);

}  // namespace cahfp
