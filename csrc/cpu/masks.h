// The masks family: top-k channel masks.
#pragma once

#include "common.h"

#include <tuple>

namespace cahfp {

std::tuple<Tensor, Tensor> topk_channel_masks_cpu(Tensor scores, Tensor keep, int64_t max_keep);

}  // namespace cahfp
