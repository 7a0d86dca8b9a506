// Python bindings of metareason._C. The Python front (core/ops) validates inputs first and
// raises ValueError; the TORCH_CHECK_VALUE checks in the kernels are a second line of defence.
#include "ops.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metareason fused kernels (lru_act, mla_decode)";
  m.def("lru_act_forward", &metareason::lru_act_forward_cpu, "LRU/ACT forward with active-set compaction (CPU)");
  m.def("mla_decode", &metareason::mla_decode_cpu, "MLA decode attention over a paged latent cache (CPU)");
#ifdef METAREASON_WITH_CUDA
  m.def("lru_act_forward_cuda", &metareason::lru_act_forward_cuda, "LRU/ACT forward (CUDA)");
  m.def("mla_decode_cuda", &metareason::mla_decode_cuda, "MLA decode (CUDA)");
  m.def("has_cuda", []() { return true; });
#else
  m.def("has_cuda", []() { return false; });
#endif
}
