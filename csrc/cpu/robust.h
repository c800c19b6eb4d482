// The robust family: the weighted median and trimmed mean (SPEC, "Robust reducers").
#pragma once

#include "common.h"

#include <string>
#include <vector>

namespace cahfp {

Tensor robust_aggregate_cpu(Tensor weight, std::vector<Tensor> clients, Tensor rows, Tensor cols, Tensor coef,
                            std::string mode, std::string reduce, double trim);

}  // namespace cahfp
