// dldna_fused._C: importing it loads the shared library, and with it the op registrations
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL run as static initializers). It also holds the helpers of
// the optimizers' eager hot path: EagerOp, FrozenTensorList and grads_of. This is the only file that includes
// the pybind11/JIT headers (slow to compile); the kernels never see Python.

#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace dldna_fused {
namespace {

// [Note: eager calls]
// An optimizer step passes ~5 tensor lists per op call, and with 2000 params the per-tensor cost
// of torch.ops.dldna_fused.<op>(...) (measured on 2 cores: ~2 ms per call) was as large as the
// kernel. Two costs, two fixes:
// - Converting every list element to an IValue, every step, although only the grads change.
//   FrozenTensorList converts a list once; the optimizers keep one per state list between steps
//   (see [Note: cached tensor lists] in dldna_fused/optim/_fused.py).
// - torch.ops frees its argument stack with the GIL released; a tensor whose last C++ reference
//   goes away while its Python object lives must re-take the GIL (PyObject preservation), so a
//   call took and dropped the GIL once per tensor (~1 ms of the 2). EagerOp keeps a reference to
//   each converted tensor until it holds the GIL again.
// EagerOp makes the same dispatcher call as torch.ops, so device selection, the profiler and
// __torch_dispatch__ subclasses behave the same. Tensors of other types than torch.Tensor and
// nn.Parameter (which may override __torch_function__), or an active torch-function mode, send
// the call to torch.ops with frozen lists turned back into Python lists. torch.compile never sees
// EagerOp: dldna_fused/ops.py calls torch.ops while compiling.

// A list of plain tensors converted once for many op calls; it holds (shares) the tensors.
class FrozenTensorList {
 public:
  explicit FrozenTensorList(py::list tensors) : tensors_(std::move(tensors)) {
    list_.reserve(tensors_.size());
    for (size_t i = 0; i < tensors_.size(); ++i) {
      PyObject* obj = tensors_[i].ptr();
      TORCH_CHECK(THPVariable_Check(obj), "FrozenTensorList: element ", i, " is not a Tensor");
      plain_ = plain_ && is_plain_tensor(obj);
      list_.push_back(THPVariable_Unpack(obj));
    }
  }
  const c10::List<at::Tensor>& list() const { return list_; }
  const py::list& tensors() const { return tensors_; }
  size_t size() const { return list_.size(); }
  bool plain() const { return plain_; }

  static bool is_plain_tensor(PyObject* obj) {
    const auto* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
    return type == THPVariableClass || type == ParameterClass;
  }

 private:
  py::list tensors_;  // the Python list, for torch.ops fallbacks
  c10::List<at::Tensor> list_;
  bool plain_ = true;
};

// Whether every tensor in obj (an argument, or a list/tuple/dict of them) is a plain
// torch.Tensor or nn.Parameter.
bool all_plain(py::handle obj) {
  if (THPVariable_Check(obj.ptr())) {
    return FrozenTensorList::is_plain_tensor(obj.ptr());
  }
  if (PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr())) {
    for (py::handle item : obj) {
      if (!all_plain(item)) {
        return false;
      }
    }
    return true;
  }
  if (PyDict_Check(obj.ptr())) {
    for (auto item : py::reinterpret_borrow<py::dict>(obj)) {
      if (!all_plain(item.second)) {
        return false;
      }
    }
    return true;
  }
  if (py::isinstance<FrozenTensorList>(obj)) {
    return obj.cast<const FrozenTensorList&>().plain();
  }
  return true;  // a number, bool or None
}

py::object unfreeze(py::handle obj) {
  if (py::isinstance<FrozenTensorList>(obj)) {
    return obj.cast<const FrozenTensorList&>().tensors();
  }
  return py::reinterpret_borrow<py::object>(obj);
}

class EagerOp {
 public:
  EagerOp(const std::string& name, const std::string& overload, py::object fallback)
      : op_(c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str())),
        fallback_(std::move(fallback)) {
    TORCH_INTERNAL_ASSERT(op_.schema().returns().empty(), "EagerOp only calls ops returning ()");
  }

  void call(const py::args& args, const py::kwargs& kwargs) const {
    if (at::impl::PythonTorchFunctionTLS::stack_len() > 0 || !all_plain(args) || !all_plain(kwargs)) {
      py::list plain_args;
      for (py::handle a : args) {
        plain_args.append(unfreeze(a));
      }
      py::dict plain_kwargs;
      for (auto item : kwargs) {
        plain_kwargs[item.first] = unfreeze(item.second);
      }
      fallback_(*plain_args, **plain_kwargs);
      return;
    }
    std::vector<at::Tensor> keep_alive;
    torch::jit::Stack stack = make_stack(args, kwargs, keep_alive);
    {
      py::gil_scoped_release no_gil;
      op_.callBoxed(stack);
    }
  }

 private:
  // torch::jit::createStackForSchema, except that FrozenTensorLists are pushed as they are and
  // that tensors converted here are also appended to keep_alive.
  torch::jit::Stack make_stack(const py::args& args, const py::kwargs& kwargs,
                               std::vector<at::Tensor>& keep_alive) const {
    const c10::FunctionSchema& schema = op_.schema();
    const auto& arguments = schema.arguments();
    TORCH_CHECK(args.size() <= arguments.size(), schema.name(), "() takes at most ",
                arguments.size(), " arguments, got ", args.size());
    torch::jit::Stack stack;
    stack.reserve(arguments.size());
    size_t used_kwargs = 0;
    for (size_t i = 0; i < arguments.size(); ++i) {
      const c10::Argument& argument = arguments[i];
      py::handle value;
      if (i < args.size()) {
        TORCH_CHECK(!argument.kwarg_only(), schema.name(), "(): '", argument.name(),
                    "' is keyword-only");
        value = args[i];
      } else if (kwargs.contains(argument.name().c_str())) {
        value = kwargs[argument.name().c_str()];
        ++used_kwargs;
      } else {
        TORCH_CHECK(argument.default_value().has_value(), schema.name(),
                    "() is missing value for argument '", argument.name(), "'");
        stack.push_back(*argument.default_value());
        continue;
      }
      if (py::isinstance<FrozenTensorList>(value)) {
        stack.emplace_back(value.cast<const FrozenTensorList&>().list());
        continue;
      }
      c10::IValue converted = torch::jit::argumentToIValue(schema, i, value);
      if (converted.isTensorList()) {
        for (const at::Tensor& t : converted.toTensorList()) {
          keep_alive.push_back(t);
        }
      } else if (converted.isTensor()) {
        keep_alive.push_back(converted.toTensor());
      }
      stack.push_back(std::move(converted));
    }
    TORCH_CHECK(used_kwargs == kwargs.size(), schema.name(),
                "() got an unexpected keyword argument; schema: ", schema);
    return stack;
  }

  c10::OperatorHandle op_;
  py::object fallback_;
};

// ([p.grad for p in params], whether any grad is not dense (sparse COO/CSR...), a bytes object
// with 1 where a param has a grad), in one pass: an optimizer step over 2000 params spent ~0.7 ms
// computing these in Python.
py::tuple grads_of(const py::list& params) {
  const size_t n = params.size();
  py::list grads(n);
  std::string has_grad(n, '\0');
  bool any_sparse = false;
  for (size_t i = 0; i < n; ++i) {
    PyObject* p = params[i].ptr();
    TORCH_CHECK(THPVariable_Check(p), "grads_of: params[", i, "] is not a Tensor");
    const at::Tensor& grad = THPVariable_Unpack(p).grad();
    if (grad.defined()) {
      any_sparse = any_sparse || grad.layout() != at::kStrided;
      has_grad[i] = 1;
      grads[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(grad));
    } else {
      grads[i] = py::none();
    }
  }
  return py::make_tuple(grads, any_sparse, py::bytes(has_grad));
}

}  // namespace
}  // namespace dldna_fused

PYBIND11_MODULE(_C, m) {
  m.doc() = "Loads the dldna_fused ops into torch.ops.dldna_fused; helpers of the eager hot path.";
  py::class_<dldna_fused::FrozenTensorList>(m, "FrozenTensorList")
      .def(py::init<py::list>(), py::arg("tensors"))
      .def("__len__", &dldna_fused::FrozenTensorList::size)
      .def_property_readonly("tensors", &dldna_fused::FrozenTensorList::tensors);
  py::class_<dldna_fused::EagerOp>(m, "EagerOp")
      .def(py::init<const std::string&, const std::string&, py::object>(), py::arg("name"),
           py::arg("overload"), py::arg("fallback"))
      .def("__call__", &dldna_fused::EagerOp::call);
  m.def("grads_of", &dldna_fused::grads_of, py::arg("params"));
}
