// Op schemas. Kernels register per device in cpu/ and cuda/; fake kernels and
// autograd are registered in Python (fusedrnn/_ops.py), autograd behind the
// C++ kernel of autograd_kernel.cpp.
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "persistent/layout.h"

namespace fusedrnn {
PyObject* set_autograd_kernel(PyObject*, PyObject* args);  // autograd_kernel.cpp
}

extern "C" {
// `import fusedrnn._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"_set_autograd_kernel", fusedrnn::set_autograd_kernel, METH_VARARGS,
       "_set_autograd_kernel(name, fn): fn(keyset, *args), the Python autograd kernel of "
       "fusedrnn::name, where an input needs grad"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

namespace {

// The persistent kernel's layout for these sizes, as the ints of
// fusedrnn.PERSISTENT_LAYOUT_FIELDS (fusedrnn/_ops.py): for tests and notes.
std::vector<int64_t> persistent_layout(int64_t hidden, int64_t batch, int64_t gates, bool backward,
                                       int64_t mode, int64_t elt, int64_t acc_elt,
                                       int64_t max_blocks, int64_t smem_limit, int64_t max_chunk) {
  using namespace fusedrnn::persistent;
  const Layout L = make_layout(hidden, batch, int(gates), backward, int(mode), elt, acc_elt,
                               max_blocks, smem_limit, max_chunk);
  return {L.blocks, L.units,   L.n,       L.n_pad,    L.k,    L.k_pad, L.kc,
          L.chunks, L.buffers, L.b_pad,   L.ldw,      L.lda,  L.ldacc, L.w_off,
          L.a_off,  L.a_bytes, L.acc_off, L.part_off, L.in_off[0], L.in_bytes,
          L.bytes};
}

}  // namespace

TORCH_LIBRARY(fusedrnn, m) {
  // One layer, one direction. x_proj = x W_ih^T + b_ih for all steps:
  // [T, B, 4H], or packed [N, 4H] with batch_sizes (int64, CPU).
  // Returns (output, h_n, c_n, gates, cells); gates/cells are what backward
  // needs, empty unless train.
  m.def(
      "lstm_forward(Tensor x_proj, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, "
      "Tensor? b_hh, Tensor? batch_sizes, bool reverse, bool train) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (d_x_proj, d_h0, d_c0, d_w_hh, d_w_hr, d_b_hh).
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor output, "
      "Tensor gates, Tensor cells, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, "
      "Tensor? batch_sizes, bool reverse, bool has_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The backward of lstm_input_forward (padded input): lstm_backward, then
  // linear_backward's gradients of the input, W_ih and b_ih, those asked for
  // (Note [one product for both weight gradients] in cpu/rnn_cpu.cpp). Returns
  // (d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh); [0] where not asked for.
  m.def(
      "lstm_input_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor output, Tensor gates, Tensor cells, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, bool reverse, bool has_bias, bool input_grad, bool w_ih_grad, "
      "bool b_ih_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // x_proj [T, B, 3H] or packed [N, 3H]. Returns (output, h_n, gates).
  m.def(
      "gru_forward(Tensor x_proj, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? batch_sizes, "
      "bool reverse, bool reset_after, bool train) -> (Tensor, Tensor, Tensor)");
  // A layer with its input projection: linear, then lstm_forward /
  // gru_forward, as one op with one autograd node (Note [a layer and its
  // projection in one node], plain_ops.cpp). input [T, B, I]. Returns those
  // of lstm_forward / gru_forward.
  m.def(
      "lstm_input_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, bool reverse, bool train) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_input_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, bool reverse, bool reset_after, bool train) -> (Tensor, Tensor, Tensor)");
  // A plain cell: lstm_input_forward / gru_input_forward at T = 1
  // (plain_ops.cpp). input [B, I], hx and cx [B, H]; returns (h', c') / h'.
  m.def(
      "lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor, Tensor)");
  m.def(
      "gru_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool reset_after) -> Tensor");
  // A plain stack (no projection, no dropout between layers): per layer and
  // direction, lstm_input_forward / gru_input_forward (plain_ops.cpp). input
  // [T, B, I]; h0 (and c0) [L*D, B, H], zeros where absent; weights per layer
  // and direction in torch's order, (w_ih, w_hh, b_ih, b_hh) or (w_ih, w_hh).
  // Returns (output [T, B, D*H], h_n, c_n) / (output, h_n).
  m.def(
      "lstm_layers(Tensor input, Tensor? h0, Tensor? c0, Tensor[] weights, bool has_biases, "
      "int num_layers, bool bidirectional) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gru_layers(Tensor input, Tensor? h0, Tensor[] weights, bool has_biases, int num_layers, "
      "bool bidirectional, bool reset_after) -> (Tensor, Tensor)");
  // x [..., K] w[N, K]^T + b: the input projection of all steps at once.
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // Returns (d_input, d_weight, d_bias); each [0] when not asked for.
  m.def(
      "linear_backward(Tensor grad, Tensor input, Tensor weight, bool input_grad, "
      "bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
  // Returns (d_x_proj, d_h0, d_w_hh, d_b_hh).
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor output, Tensor gates, "
      "Tensor h0, Tensor w_hh, Tensor? batch_sizes, bool reverse, bool reset_after, "
      "bool has_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same layers with the regularisers of fusedrnn.regularisers.LayerReg
  // (reg_lstm.h, reg_gru.h): rec_mask [B, P]; zone_h, zone_c x_proj's leading
  // shape + [P] / [H]; ln_hh [G*H]; ln_c_w, ln_c_b [H]; ln_ih, b_ih [G*H]
  // (then x_proj is x W_ih^T without b_ih). What backward needs besides x_proj
  // follows h_n/c_n, in the accumulation dtype: LSTM (gates, cells, cell_new,
  // norm_hh, stats), GRU (gates, norm_hh, stats); layouts in reg_lstm.h and
  // reg_gru.h. The backward ops return a gradient for each tensor input that
  // has one ([0] where absent), none for the masks.
  m.def(
      "lstm_reg_forward(Tensor x_proj, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, "
      "Tensor? b_hh, Tensor? batch_sizes, bool reverse, bool train, Tensor? rec_mask, "
      "Tensor? zone_h, Tensor? zone_c, Tensor? ln_hh, Tensor? ln_c_w, Tensor? ln_c_b, "
      "Tensor? ln_ih, Tensor? b_ih) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (d_x_proj, d_h0, d_c0, d_w_hh, d_w_hr, d_b_hh, d_ln_hh, d_ln_c_w, d_ln_c_b,
  // d_ln_ih, d_b_ih).
  m.def(
      "lstm_reg_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x_proj, "
      "Tensor output, Tensor gates, Tensor cells, Tensor cell_new, Tensor norm_hh, "
      "Tensor stats, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, bool has_bias, Tensor? rec_mask, Tensor? zone_h, Tensor? zone_c, "
      "Tensor? ln_hh, Tensor? ln_c_w, Tensor? ln_c_b, Tensor? ln_ih, Tensor? b_ih) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "gru_reg_forward(Tensor x_proj, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? batch_sizes, "
      "bool reverse, bool reset_after, bool train, Tensor? rec_mask, Tensor? zone_h, "
      "Tensor? ln_hh, Tensor? ln_ih, Tensor? b_ih) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (d_x_proj, d_h0, d_w_hh, d_b_hh, d_ln_hh, d_ln_ih, d_b_ih).
  m.def(
      "gru_reg_backward(Tensor grad_output, Tensor grad_h_n, Tensor x_proj, Tensor output, "
      "Tensor gates, Tensor norm_hh, Tensor stats, Tensor h0, Tensor w_hh, "
      "Tensor? batch_sizes, bool reverse, bool reset_after, bool has_bias, Tensor? rec_mask, "
      "Tensor? zone_h, Tensor? ln_hh, Tensor? ln_ih, Tensor? b_ih) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The persistent kernel on its own (persistent/persistent.cu; on the CPU,
  // its emulator, persistent/emulate.cpp): the same arguments and results as the ops above, without
  // w_hr and with reset_after, plus max_blocks (<= 0: as many as the device
  // holds), max_chunk (K columns staged per pass; <= 0: as wide as fits) and
  // mode (-1 auto, 0 SIMT, 1 tensor cores). Raises where a block's slice of
  // W_hh does not fit on chip. For tests and benchmarks.
  m.def(
      "_persistent_lstm_forward(Tensor x_proj, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, "
      "Tensor? batch_sizes, bool reverse, bool train, int max_blocks, int max_chunk, int mode) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_persistent_lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor output, Tensor gates, Tensor cells, Tensor h0, Tensor c0, Tensor w_hh, "
      "Tensor? batch_sizes, bool reverse, bool has_bias, int max_blocks, int max_chunk, int mode) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_persistent_gru_forward(Tensor x_proj, Tensor h0, Tensor w_hh, Tensor? b_hh, "
      "Tensor? batch_sizes, bool reverse, bool train, int max_blocks, int max_chunk, int mode) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_persistent_gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor output, "
      "Tensor gates, Tensor h0, Tensor w_hh, Tensor? batch_sizes, bool reverse, bool has_bias, "
      "int max_blocks, int max_chunk, int mode) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_persistent_layout(int hidden, int batch, int gates, bool backward, int mode, int elt, "
      "int acc_elt, int max_blocks, int smem_limit, int max_chunk) -> int[]",
      &persistent_layout);
}
