// The eager adapted layer's autograd node, in C++: what `torch.autograd.Function` does for
// `ops/adapter_linear.py`'s `_AdapterLinearFn`, without its Python machinery (the ctx object,
// `save_for_backward`, `saved_tensors`, `needs_input_grad`, the Python backward frame and the
// gradient tuple's checks) and with the backward's orchestration (contiguous g, the deterministic
// switch, autocast off, the cast and split of the flat gradient buffer) here. The implementation's
// kernels stay in Python: the node calls the implementation's backward once per layer step.
//
// Python module `adalora_fast_node`, one function:
//
//   attach(out, x0, weight0, bias0, A0, E0, B0,            # the node's inputs (edges), in that order
//          x, t, A, E, B, seed,                            # saved (SavedVariable: version-checked,
//                                                          #   saved-tensor hooks apply)
//          weight, ranknum, scaling, dropout_p, fan_in_fan_out,
//          plan, aux, grad_dtype, backward_plan) -> out
//
// x0..B0 are the tensors the layer was called with, x..B what it computed with (autocast's casts;
// the same tensors otherwise). `out` (computed with grad mode off) gets the node as its grad_fn when
// grad mode is on and an input requires grad; else it is returned as it is. `plan` is
// `(name, forward, eager backward, op backward)`, `aux` what the forward hands its backward,
// `grad_dtype` the adapters' dtype (torch.dtype), `backward_plan(plan, aux) -> (plan, aux)` the
// Python function that swaps the Triton implementation for torch ops when the deterministic switch
// was turned on after the forward (called only then, on CUDA). The backward calls
//
//   plan[2](g, x, t, weight, A, E, B, scaling, ranknum, dropout_p, fan_in_fan_out, seed,
//           need_x, need_lora, aux) -> (dx or None, grads)
//
// grads: None, a flat buffer [dA | dB | dE] (cast here to grad_dtype, then handed out as views with
// the parameters' strides), or a tuple (dA, dE, dB). dW / db (a base layer someone unfroze) are
// computed here by ATen ops, as `_base_grads` does.
//
// Arguments are parsed with METH_FASTCALL and the Python call is a vectorcall: pybind11's
// per-argument dispatch would cost a good part of what the node saves.
#include <Python.h>

#include <ATen/autocast_mode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/Dtype.h>

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

struct Gil {
  PyGILState_STATE s = PyGILState_Ensure();
  ~Gil() { PyGILState_Release(s); }
};

struct AutocastOff {
  at::DeviceType dev;
  bool was;
  explicit AutocastOff(at::DeviceType d) : dev(d), was(at::autocast::is_autocast_enabled(d)) {
    if (was) at::autocast::set_autocast_enabled(dev, false);
  }
  ~AutocastOff() {
    if (was) at::autocast::set_autocast_enabled(dev, true);
  }
};

// A new reference to an optional tensor as Python (None when undefined).
PyObject* wrap(const at::Tensor& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(t);
}

// `t` from a tensor or None (left undefined); false for anything else.
bool optional_tensor(PyObject* o, at::Tensor& t) {
  if (o == Py_None) return true;
  if (!THPVariable_Check(o)) return false;
  t = THPVariable_Unpack(o);
  return true;
}

struct AdapterLinearBackward : public Node {
  SavedVariable x_, t_, a_, e_, b_, seed_;
  at::Tensor weight_, ranknum_;
  double scaling_ = 0.0, dropout_p_ = 0.0;
  bool fan_in_fan_out_ = false, has_bias_ = false;
  at::ScalarType grad_dtype_ = at::kFloat;
  // owned references, released with the GIL held (release_variables, the destructor)
  PyObject* plan_ = nullptr;
  PyObject* aux_ = nullptr;
  PyObject* backward_plan_ = nullptr;

  std::string name() const override { return "AdapterLinearBackward"; }

  void drop_python() {
    Py_CLEAR(plan_);
    Py_CLEAR(aux_);
    Py_CLEAR(backward_plan_);
  }

  void release_variables() override {
    x_.reset_data();
    t_.reset_data();
    a_.reset_data();
    e_.reset_data();
    b_.reset_data();
    seed_.reset_data();
    weight_.reset();
    ranknum_.reset();
    if ((plan_ || aux_ || backward_plan_) && Py_IsInitialized()) {
      Gil gil;
      drop_python();
    }
  }

  ~AdapterLinearBackward() override {
    // at interpreter exit the references are leaked, as torch's PyNode does; after a backward
    // (release_variables) there is nothing left to drop and no GIL to take
    if ((plan_ || aux_ || backward_plan_) && Py_IsInitialized()) {
      Gil gil;
      drop_python();
    }
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(6);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return out;  // the output took no part in what is differentiated
    bool need[6];
    for (int i = 0; i < 6; ++i) need[i] = should_compute_output(i);
    const bool need_lora = need[3] || need[4] || need[5];
    auto self = getptr();
    at::Tensor x = x_.unpack(self), t = t_.unpack(self), A = a_.unpack(self), E = e_.unpack(self),
               B = b_.unpack(self), seed = seed_.unpack(self);
    TORCH_CHECK(plan_ != nullptr, "adalora_fast: the layer's backward ran twice without retain_graph=True");
    at::Tensor g = grad_out.is_contiguous() ? grad_out : grad_out.contiguous();  // a .sum() gradient has stride 0
    at::Tensor dx, flat;
    {
      Gil gil;
      PyObject* plan = plan_;
      PyObject* aux = aux_;
      PyObject* swapped = nullptr;
      if (x.is_cuda() && at::globalContext().deterministicAlgorithms()) {
        swapped = PyObject_CallFunctionObjArgs(backward_plan_, plan_, aux_, nullptr);  // -> (plan, aux)
        if (!swapped) throw python_error();
        plan = PyTuple_GET_ITEM(swapped, 0);
        aux = PyTuple_GET_ITEM(swapped, 1);
      }
      PyObject* fn = PyTuple_GET_ITEM(plan, 2);
      PyObject* args[15] = {
          wrap(g), wrap(x), wrap(t), wrap(weight_), wrap(A), wrap(E), wrap(B), PyFloat_FromDouble(scaling_),
          wrap(ranknum_), PyFloat_FromDouble(dropout_p_), PyBool_FromLong(fan_in_fan_out_), wrap(seed),
          PyBool_FromLong(need[0]), PyBool_FromLong(need_lora), aux};
      Py_INCREF(aux);
      PyObject* res;
      {
        AutocastOff off(x.device().type());  // a backward run inside an autocast region
        res = PyObject_Vectorcall(fn, args, 15, nullptr);
      }
      for (PyObject* a : args) Py_DECREF(a);
      Py_XDECREF(swapped);
      if (!res) throw python_error();
      PyObject* pgrads = nullptr;
      bool ok = PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 2;
      if (ok) {
        pgrads = PyTuple_GET_ITEM(res, 1);
        ok = optional_tensor(PyTuple_GET_ITEM(res, 0), dx) &&
             (pgrads == Py_None || THPVariable_Check(pgrads) || (PyTuple_Check(pgrads) && PyTuple_GET_SIZE(pgrads) == 3));
      }
      if (ok && need_lora && pgrads != Py_None) {
        if (THPVariable_Check(pgrads)) {
          flat = THPVariable_Unpack(pgrads);
        } else {
          for (int i = 0; i < 3; ++i) ok = ok && optional_tensor(PyTuple_GET_ITEM(pgrads, i), out[3 + i]);
        }
      }
      Py_DECREF(res);
      TORCH_CHECK(ok, "adalora_fast: an adapter_linear backward must return (dx or None, None or a flat gradient "
                      "buffer or a tuple (dA, dE, dB))");
    }
    if (flat.defined()) {
      // views of one buffer [dA | dB | dE] with the parameters' strides: autograd keeps them as .grad
      if (flat.scalar_type() != grad_dtype_) flat = flat.to(grad_dtype_);
      const int64_t r = A.size(0), k = A.size(1), d = B.size(0), o = flat.storage_offset();
      out[3] = flat.as_strided({r, k}, {k, 1}, o);
      out[4] = flat.as_strided({r, 1}, {1, 1}, o + r * k + d * r);
      out[5] = flat.as_strided({d, r}, {r, 1}, o + r * k);
    }
    if (need[0]) out[0] = dx;
    if (need[1]) {  // dW of an unfrozen base layer
      at::Tensor gw = grad_out.t().matmul(x);
      out[1] = fan_in_fan_out_ ? gw.t() : gw;
    }
    if (need[2] && has_bias_) out[2] = grad_out.sum(0);
    for (int i = 3; i < 6; ++i)
      if (!need[i]) out[i] = at::Tensor();
    return out;
  }
};

const at::Tensor& tensor_arg(PyObject* o, const char* what) {
  if (!THPVariable_Check(o)) {
    throw std::runtime_error(std::string("adalora_fast_node.attach: ") + what + " must be a tensor");
  }
  return THPVariable_Unpack(o);
}

at::Tensor optional_tensor_arg(PyObject* o, const char* what) {
  return o == Py_None ? at::Tensor() : tensor_arg(o, what);
}

PyObject* attach(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 22) {
    PyErr_Format(PyExc_TypeError, "adalora_fast_node.attach takes 22 arguments (%zd given)", nargs);
    return nullptr;
  }
  PyObject* out_obj = args[0];
  const at::Tensor& out = tensor_arg(out_obj, "out");
  if (!torch::autograd::GradMode::is_enabled()) {
    Py_INCREF(out_obj);
    return out_obj;
  }
  at::Tensor bias0 = optional_tensor_arg(args[3], "bias");
  auto edges = torch::autograd::collect_next_edges(
      tensor_arg(args[1], "x"), tensor_arg(args[2], "weight"), bias0, tensor_arg(args[4], "lora_A"),
      tensor_arg(args[5], "lora_E"), tensor_arg(args[6], "lora_B"));
  bool any = false;
  for (const auto& e : edges) any = any || e.is_valid();
  if (!any) {  // nothing to differentiate (frozen adapters, inputs that need no gradient)
    Py_INCREF(out_obj);
    return out_obj;
  }
  TORCH_CHECK(THPDtype_Check(args[20]), "adalora_fast_node.attach: grad_dtype must be a torch.dtype");
  TORCH_CHECK(PyTuple_Check(args[18]) && PyTuple_GET_SIZE(args[18]) == 4,
              "adalora_fast_node.attach: plan must be a 4-tuple");
  auto node = c10::make_intrusive<AdapterLinearBackward>();
  node->set_next_edges(std::move(edges));
  node->x_ = SavedVariable(tensor_arg(args[7], "x"), false);
  node->t_ = SavedVariable(tensor_arg(args[8], "t"), false);
  node->a_ = SavedVariable(tensor_arg(args[9], "lora_A"), false);
  node->e_ = SavedVariable(tensor_arg(args[10], "lora_E"), false);
  node->b_ = SavedVariable(tensor_arg(args[11], "lora_B"), false);
  at::Tensor seed = optional_tensor_arg(args[12], "seed");
  if (seed.defined()) node->seed_ = SavedVariable(seed, false);
  node->weight_ = tensor_arg(args[13], "weight");
  node->ranknum_ = tensor_arg(args[14], "ranknum");
  node->scaling_ = PyFloat_AsDouble(args[15]);
  node->dropout_p_ = PyFloat_AsDouble(args[16]);
  if (PyErr_Occurred()) return nullptr;
  node->fan_in_fan_out_ = PyObject_IsTrue(args[17]);
  node->has_bias_ = bias0.defined();
  node->grad_dtype_ = reinterpret_cast<THPDtype*>(args[20])->scalar_type;
  Py_INCREF(args[18]);
  node->plan_ = args[18];
  Py_INCREF(args[19]);
  node->aux_ = args[19];
  Py_INCREF(args[21]);
  node->backward_plan_ = args[21];
  torch::autograd::set_history(out, node);
  Py_INCREF(out_obj);
  return out_obj;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"attach", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(attach)), METH_FASTCALL,
     "Give `out` the adapted layer's C++ autograd node (see csrc/adapter_linear_node.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "adalora_fast_node", nullptr, -1, methods};

}  // namespace

#define AF_CONCAT2(a, b) a##b
#define AF_CONCAT(a, b) AF_CONCAT2(a, b)
PyMODINIT_FUNC AF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_def); }
