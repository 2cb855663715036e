// Note [Autograd kernel in C++ where nothing needs grad]
// Each op's autograd is a Python kernel (fusedrnn/_autograd.py). Under
// torch.no_grad, or with no input requiring grad, that kernel only
// redispatches below autograd, yet the dispatcher still converted the call
// to Python and back: at batch 1 H=256 an LSTMCell took 125 us under no_grad
// and 95 us under inference_mode (which skips autograd) on a 2-core Xeon.
// The Autograd kernel is therefore this C++ one: it makes the Python
// kernel's own test (grad mode on and an input requiring grad) and
// redispatches below autograd itself when the test fails; otherwise it hands
// the call to the Python kernel, with the same keyset and arguments.
#include <torch/extension.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <string>

#include "layer_autograd.h"

namespace {

bool any_requires_grad(const torch::jit::Stack& stack, size_t first) {
  for (size_t i = first; i < stack.size(); ++i) {
    const c10::IValue& v = stack[i];
    if (v.isTensor() && v.toTensor().requires_grad()) return true;
  }
  return false;
}

// The kernel of one op; `python` is the Python kernel, called as
// python(keyset, *args), which returns the op's result (a tuple where it has
// several); `node`, where the op has one, its C++ node, tried first (Note [a
// layer's autograd in C++]). It lives as long as the process: the
// registration is never undone.
struct AutogradKernel final : c10::OperatorKernel {
  AutogradKernel(PyObject* fn, fusedrnn::CppAutograd cpp) : python(fn), node(cpp) {
    Py_INCREF(python);
  }

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                  torch::jit::Stack* stack) {
    const size_t n_args = op.schema().arguments().size();
    if (!c10::GradMode::is_enabled() || !any_requires_grad(*stack, stack->size() - n_args)) {
      at::AutoDispatchBelowAutograd guard;
      op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
      return;
    }
    if (node && node(stack)) return;
    py::gil_scoped_acquire gil;
    py::tuple args(n_args + 1);
    args[0] = py::cast(ks);
    for (size_t i = 0; i < n_args; ++i) {
      args[i + 1] = torch::jit::toPyObject(std::move((*stack)[stack->size() - n_args + i]));
    }
    torch::jit::drop(*stack, n_args);
    py::object out = py::reinterpret_borrow<py::object>(python)(*args);
    const auto& returns = op.schema().returns();
    if (returns.size() == 1) {
      stack->push_back(torch::jit::toIValue(out, returns[0].type()));
      return;
    }
    const py::tuple outs = out.cast<py::tuple>();
    TORCH_INTERNAL_ASSERT(outs.size() == returns.size(), op.schema().name(), ": ", outs.size(),
                          " results from its autograd kernel, ", returns.size(), " expected");
    for (size_t i = 0; i < returns.size(); ++i) {
      stack->push_back(torch::jit::toIValue(outs[i], returns[i].type()));
    }
  }

  PyObject* python;
  fusedrnn::CppAutograd node;
};

}  // namespace

namespace fusedrnn {

// _C._set_autograd_kernel(name, fn): fn, the Python autograd kernel of op
// fusedrnn::name, behind the C++ one above. Once per op and process.
PyObject* set_autograd_kernel(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  const char* name = nullptr;
  PyObject* fn = nullptr;
  if (!PyArg_ParseTuple(args, "sO", &name, &fn)) return nullptr;
  TORCH_CHECK(PyCallable_Check(fn), "_set_autograd_kernel: the kernel must be callable");
  // Never destroyed: the registrations must outlive the interpreter's last call.
  static auto* lib = new torch::Library(torch::Library::IMPL, "fusedrnn",
                                        c10::DispatchKey::Autograd, __FILE__, __LINE__);
  lib->impl(name, torch::CppFunction::makeFromBoxedFunctor(
                      std::make_unique<AutogradKernel>(fn, cpp_autograd(name))));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace fusedrnn
