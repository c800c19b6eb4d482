// The per-round layout family: the ops that take a RoundLayout's tables (layout_tables.h):
// meta (N, 5), row_inv (K, SR), col_keep (K, SC), counts (K, N, 2), offsets / starts (K, N).
#pragma once

#include "common.h"

#include <string>
#include <vector>

namespace cahfp {

void slice_packed_cpu(std::vector<Tensor> weights, Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts,
                      Tensor starts, Tensor out);
void aggregate_packed_cpu(std::vector<Tensor> weights, std::vector<Tensor> clients, std::vector<int64_t> parts,
                          Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets, Tensor coef,
                          std::string mode, Tensor out, Tensor stats, int64_t plan);
void accumulate_packed_cpu(std::vector<Tensor> weights, std::vector<Tensor> client, std::vector<int64_t> parts,
                           Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets, double weight,
                           double max_ssq, std::string mode, Tensor sums, Tensor cover, Tensor stats);
void fold_packed_cpu(std::vector<Tensor> weights, std::vector<Tensor> clients, std::vector<int64_t> parts,
                     Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets, Tensor coef,
                     std::string mode, Tensor sums_in, Tensor cover_in, Tensor sums_out, Tensor cover_out,
                     Tensor stats, int64_t plan);
// plan: a layout plan's id (plan_layout), whose tables were checked when it was made; -1:
// the call's tables are checked and planned for this call.
int64_t plan_layout_cpu(Tensor meta, Tensor row_inv, Tensor col_keep, Tensor counts, Tensor offsets);
int64_t plan_subset_cpu(Tensor device, int64_t id, Tensor clients);
void release_layout_plan_cpu(Tensor device, int64_t id);
void finish_partials_cpu(std::vector<Tensor> weights, Tensor sums, Tensor cover, double weight_sum, std::string mode,
                         Tensor out);

}  // namespace cahfp
