// The C++ autograd nodes of some ops (Note [a layer's autograd in C++] in
// layer_autograd.cpp).
#pragma once

#include <ATen/core/stack.h>

#include <string>

namespace fusedrnn {

// Records the op's call on the stack (its arguments on top) as a C++ node and
// leaves its results there, returning true; false, with the stack untouched,
// where the Python kernel must run instead.
using CppAutograd = bool (*)(torch::jit::Stack* stack);

// The C++ node of op fusedrnn::name, or null where it has none.
CppAutograd cpp_autograd(const std::string& name);

}  // namespace fusedrnn
