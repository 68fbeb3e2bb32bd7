// tokdistill_fast._mkl_dispatch: MKL's CPU-vendor check, answered "yes" on every CPU.
//
// MKL (statically linked into libtorch_cpu.so) asks mkl_serv_intel_cpu_true() before it picks its kernels; on
// other vendors' x86 CPUs the answer sends its sgemm down a slower path, though the CPU has the same instruction
// sets. control/process.py loads this library into the global symbol scope before torch loads, so libtorch_cpu's
// reference binds here and MKL chooses by the CPU's instruction sets alone (docs/cpu-speed.md, "MKL's vendor
// check"). Never imported as a module; the init function only keeps it a well-formed extension.
#include <Python.h>

extern "C" __attribute__((visibility("default"))) int mkl_serv_intel_cpu_true() { return 1; }

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mkl_dispatch",
                                    "MKL's vendor check answered yes (csrc/mkl_dispatch.cpp)", -1, nullptr};

PyMODINIT_FUNC PyInit__mkl_dispatch() { return PyModule_Create(&module); }
