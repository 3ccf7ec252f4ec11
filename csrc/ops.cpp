// Op schemas of the mvloss C++ backends and the Python module mvloss._C.
//
// mvloss::neg_forward / neg_backward (/ neg_backward_w) implement the negatives contract of mvloss/negatives.py; kernels are
// registered per dispatch key in csrc/cpu (CPU) and csrc/cuda (CUDA); fake (meta) kernels come from
// mvloss/backends/cpp.py.  `chunk` is the number of classes per chunk (0: from the workspace size).
#include <torch/library.h>

#include <string>

#ifndef MVLOSS_NO_PYTHON_MODULE
#include <Python.h>
#endif

TORCH_LIBRARY(mvloss, m) {
  m.def(
      "neg_forward(Tensor x, Tensor w, Tensor x_inv, Tensor w_inv, Tensor labels, Tensor thr, Tensor scale, "
      "Tensor? bias, int treatment, float param, bool clamp, int chunk=0) -> (Tensor, Tensor)");
  m.def(
      "neg_backward(Tensor x, Tensor w, Tensor x_inv, Tensor w_inv, Tensor labels, Tensor thr, Tensor scale, "
      "Tensor? bias, Tensor lse, Tensor g_lse, Tensor g_sum, int treatment, float param, bool clamp, "
      "bool need_dscale, bool need_dbias, int chunk=0) -> (Tensor, Tensor, Tensor, Tensor)");
  // the training step's backward: W's gradient in W's dtype, through the normalisation backward per class chunk,
  // the target column's gradient g_cos included in dxhat and in it
  m.def(
      "neg_backward_w(Tensor x, Tensor w, Tensor x_inv, Tensor w_inv, Tensor labels, Tensor thr, Tensor scale, "
      "Tensor? bias, Tensor lse, Tensor g_lse, Tensor g_sum, Tensor g_cos, int treatment, float param, bool clamp, "
      "bool need_dscale, bool need_dbias, bool normalize_w, float eps, int chunk=0) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
}

#ifndef MVLOSS_NO_PYTHON_MODULE
namespace mvloss {
namespace cpu {
std::string cpu_isa();        // csrc/cpu/negatives_cpu.cpp
std::string cpu_bf16_gemm();  // csrc/cpu/bf16_gemm.cpp
}  // namespace cpu
}  // namespace mvloss

// A tiny Python module (no pybind11: faster to build).  Importing it registers the ops above.
namespace {
PyObject* cpu_isa(PyObject*, PyObject*) {
  const std::string isa = mvloss::cpu::cpu_isa();
  return PyUnicode_FromString(isa.c_str());
}

PyObject* cpu_bf16_gemm(PyObject*, PyObject*) {
  try {  // a misspelt MVLOSS_CPU_BF16_GEMM throws: a Python RuntimeError, not a terminate
    const std::string mode = mvloss::cpu::cpu_bf16_gemm();
    return PyUnicode_FromString(mode.c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef MVLOSS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU epilogue kernels in use (MVLOSS_CPU_ISA caps it)."},
    {"cpu_bf16_gemm", cpu_bf16_gemm, METH_NOARGS,
     "How the CPU backend multiplies bf16 operands: packed, unpacked (brgemm micro-kernel) or upcast (fp32 GEMMs); "
     "MVLOSS_CPU_BF16_GEMM sets it."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mvloss C++/CUDA backends (ops under torch.ops.mvloss)", -1,
                          methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
#endif  // MVLOSS_NO_PYTHON_MODULE
