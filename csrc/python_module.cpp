// dldna_fused._C: importing it loads the shared library, and with it the op registrations
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL run as static initializers). It also holds the helpers of
// the optimizers' eager hot path: EagerOp, FrozenTensorList, grads_of and the checks of the cached
// lists (states_match, dict_items, same_items, find_overlap). This is the only file that includes
// the pybind11/JIT headers (slow to compile); the kernels never see Python.

#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "common/adafactor_gpu_plan.h"

#include <algorithm>
#include <cstdlib>
#include <tuple>
#include <functional>
#include <sstream>
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
//   (see [Note: cached tensor lists] in dldna_fused/optim/_group_lists.py).
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
    const auto& returns = op_.schema().returns();
    TORCH_INTERNAL_ASSERT(returns.empty() || (returns.size() == 1 && returns[0].type()->kind() == c10::TypeKind::TensorType),
                          "EagerOp only calls ops returning () or one Tensor");
  }

  // The op's result: None, or its one Tensor.
  py::object call(const py::args& args, const py::kwargs& kwargs) const {
    if (at::impl::PythonTorchFunctionTLS::stack_len() > 0 || !all_plain(args) || !all_plain(kwargs)) {
      py::list plain_args;
      for (py::handle a : args) {
        plain_args.append(unfreeze(a));
      }
      py::dict plain_kwargs;
      for (auto item : kwargs) {
        plain_kwargs[item.first] = unfreeze(item.second);
      }
      return fallback_(*plain_args, **plain_kwargs);
    }
    std::vector<at::Tensor> keep_alive;
    torch::jit::Stack stack = make_stack(args, kwargs, keep_alive);
    {
      py::gil_scoped_release no_gil;
      op_.callBoxed(stack);
    }
    if (stack.empty()) {
      return py::none();
    }
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(stack.back().toTensor()));
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

// Why a param's grad cannot go into a kernel with it, or an empty string. Sparse grads are
// reported by grads_of's flag instead, so the message can say which optimizer rejects them.
// Called for every grad of every step: the common case builds no string.
std::string grad_mismatch(const at::Tensor& p, const at::Tensor& g) {
  if (g.layout() != at::kStrided ||
      (g.sizes() == p.sizes() && g.scalar_type() == p.scalar_type() && g.device() == p.device())) {
    return {};
  }
  std::ostringstream why;
  if (g.sizes() != p.sizes()) {
    why << "has shape " << g.sizes() << " but the param has shape " << p.sizes();
  } else if (g.scalar_type() != p.scalar_type()) {
    why << "has dtype " << g.scalar_type() << " but the param has " << p.scalar_type();
  } else {
    why << "is on " << g.device() << " but the param is on " << p.device();
  }
  return why.str();
}

// ([p.grad for p in params], whether any grad is not dense (sparse COO/CSR...), a bytes object
// with 3 bytes per param: 0 0 0 where it has no grad, else its dtype + 1, device type + 1 and
// device index + 1), in one pass: an optimizer step over 2000 params spent ~0.7 ms computing these
// in Python. The bytes key the optimizers' cached lists ([Note: cached tensor lists]), so a param
// whose dtype or device changed after its lists were built (model.double(), .data = ...) gets its
// lists rebuilt and checked before any group steps. Also checks every grad against its param
// (shape, dtype, device), so that a step rejects a bad grad in any group before it changes
// anything (ValueError naming the param's position).
py::tuple grads_of(const py::list& params, bool check) {
  const size_t n = params.size();
  py::list grads(n);
  std::string has_grad(3 * n, '\0');
  bool any_sparse = false;
  for (size_t i = 0; i < n; ++i) {
    PyObject* p = params[i].ptr();
    if (!THPVariable_Check(p)) {
      throw py::type_error("params[" + std::to_string(i) + "] is not a Tensor");
    }
    const at::Tensor& param = THPVariable_Unpack(p);
    const at::Tensor& grad = param.grad();
    if (grad.defined()) {
      any_sparse = any_sparse || grad.layout() != at::kStrided;
      if (std::string why = check ? grad_mismatch(param, grad) : std::string(); !why.empty()) {
        throw py::value_error("params[" + std::to_string(i) + "]: its grad " + why);
      }
      has_grad[3 * i] = static_cast<char>(static_cast<int>(param.scalar_type()) + 1);
      has_grad[3 * i + 1] = static_cast<char>(static_cast<int>(param.device().type()) + 1);
      has_grad[3 * i + 2] = static_cast<char>(param.device().index() + 1);
      grads[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(grad));
    } else {
      grads[i] = py::none();
    }
  }
  return py::make_tuple(grads, any_sparse, py::bytes(has_grad));
}

// The CUDA AdaFactor launch plan ([Note: AdaFactor on the GPU] in common/adafactor_gpu_plan.h) of
// a call with these (numel, rows, cols) shapes (rows = cols = 0: unfactored), as a dict of block
// counts and workspace bytes: what a launch would allocate, computed on any machine.
py::dict adafactor_gpu_plan(const std::vector<std::tuple<int64_t, int64_t, int64_t>>& shapes) {
  std::vector<AdafactorShape> converted;
  for (const auto& [numel, rows, cols] : shapes) {
    converted.push_back({numel, rows, cols});
  }
  const AdafactorGpuPlan plan = plan_adafactor_gpu(converted);
  py::dict out;
  out["row_blocks"] = plan.row_blocks();
  out["column_blocks"] = plan.column_blocks();
  out["combine_blocks"] = plan.combine_blocks();
  out["mean_blocks"] = plan.mean_blocks();
  out["row_combine_blocks"] = plan.row_combine_blocks();
  out["max_block_elements"] = plan.max_block_elements;
  out["max_block_elements_bound"] = kGpuMaxBlockElements;
  out["workspace_bytes"] = plan.workspace_bytes();
  out["threads_per_block"] = kGpuThreads;
  return out;
}

// (device, dtype) of `tensors` when every one is a plain torch.Tensor/nn.Parameter, strided, on one
// device and of one dtype (the common case of a model's grads, which then take one op call),
// else None. One pass in C++: the same test in Python costs ~0.3 ms for 2000 tensors.
py::object common_device_dtype(const py::list& tensors) {
  if (tensors.empty()) {
    return py::none();
  }
  at::Device device(at::kCPU);
  at::ScalarType dtype = at::kFloat;
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyObject* obj = tensors[i].ptr();
    if (!THPVariable_Check(obj) || !FrozenTensorList::is_plain_tensor(obj)) {
      return py::none();
    }
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (t.layout() != at::kStrided) {
      return py::none();
    }
    if (i == 0) {
      device = t.device();
      dtype = t.scalar_type();
    } else if (t.device() != device || t.scalar_type() != dtype) {
      return py::none();
    }
  }
  // getTHPDtype: torch's own dtype object (dtypes compare by identity).
  return py::make_tuple(py::reinterpret_steal<py::object>(THPDevice_New(device)),
                        py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype))));
}

// The Python list of tensors behind a list argument (a list, or a FrozenTensorList).
py::list tensors_of(py::handle obj) {
  if (py::isinstance<FrozenTensorList>(obj)) {
    return obj.cast<const FrozenTensorList&>().tensors();
  }
  return py::reinterpret_borrow<py::list>(obj);
}

// Whether states[i][keys[k]] is lists[k][i] (the same object) for every i and k, where states[i]
// is the state dict of the i-th param of the lists: with dict_items/same_items below, the check
// that lets a step reuse its cached lists ([Note: cached tensor lists] in
// dldna_fused/optim/_group_lists.py). Looks up string keys only: hashing 2000 params through
// Tensor.__hash__ (a Python method) would cost more than the rest of the check.
bool states_match(const py::list& states, const py::tuple& keys, const py::list& lists) {
  const size_t n = states.size();
  if (lists.size() != keys.size()) {
    throw py::value_error("states_match: one key per list expected");
  }
  std::vector<py::list> columns;
  columns.reserve(lists.size());
  for (py::handle list : lists) {
    columns.push_back(tensors_of(list));
    if (columns.back().size() != n) {
      return false;
    }
  }
  for (size_t i = 0; i < n; ++i) {
    PyObject* entry = states[i].ptr();
    if (!PyDict_Check(entry)) {
      return false;
    }
    for (size_t k = 0; k < columns.size(); ++k) {
      PyObject* value = PyDict_GetItemWithError(entry, keys[k].ptr());
      if (value != columns[k][i].ptr()) {
        if (value == nullptr && PyErr_Occurred()) {
          throw py::error_already_set();
        }
        return false;
      }
    }
  }
  return true;
}

// The (key, value) pairs of a dict in its order, flattened: [k0, v0, k1, v1, ...].
py::list dict_items(const py::dict& d) {
  py::list items;
  PyObject *key = nullptr, *value = nullptr;
  Py_ssize_t pos = 0;
  while (PyDict_Next(d.ptr(), &pos, &key, &value)) {
    items.append(py::handle(key));
    items.append(py::handle(value));
  }
  return items;
}

// Whether d holds exactly the pairs `items` (from dict_items) as the same objects, in the same
// order: one walk over the table and pointer compares, no hashing. Any assignment, deletion,
// insertion or clear() since dict_items makes it false (a value re-assigned to itself aside).
bool same_items(const py::dict& d, const py::list& items) {
  if (static_cast<size_t>(PyDict_Size(d.ptr())) * 2 != items.size()) {
    return false;
  }
  PyObject *key = nullptr, *value = nullptr;
  Py_ssize_t pos = 0;
  size_t i = 0;
  while (PyDict_Next(d.ptr(), &pos, &key, &value)) {
    if (key != items[i].ptr() || value != items[i + 1].ptr()) {
      return false;
    }
    i += 2;
  }
  return true;
}

// The first pair (i, j) of tensors in `tensors` whose memory overlaps, (i, i) for a tensor that
// overlaps itself (an expanded view), or None. Tensors are compared by the byte ranges they span
// in their storage, which is exact for dense tensors and conservative for strided views that
// interleave. One sort, so cheap enough to run whenever the cached lists are rebuilt.
py::object find_overlap(const py::list& tensors) {
  struct Span {
    const void* storage;
    int64_t begin;
    int64_t end;
    size_t index;
  };
  std::vector<Span> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyObject* obj = tensors[i].ptr();
    if (!THPVariable_Check(obj)) {
      throw py::type_error("find_overlap: element " + std::to_string(i) + " is not a Tensor");
    }
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (t.numel() == 0 || t.layout() != at::kStrided || !t.has_storage() ||
        t.device().type() == c10::DeviceType::Meta || t.storage().data() == nullptr) {
      continue;
    }
    if (at::has_internal_overlap(t) == at::MemOverlap::Yes) {
      return py::make_tuple(i, i);
    }
    int64_t extent = 1;
    for (int64_t d = 0; d < t.dim(); ++d) {
      extent += (t.size(d) - 1) * std::abs(t.stride(d));
    }
    const int64_t item = static_cast<int64_t>(t.element_size());
    const int64_t begin = t.storage_offset() * item;
    spans.push_back({t.storage().data(), begin, begin + extent * item, i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.storage != b.storage ? std::less<const void*>()(a.storage, b.storage) : a.begin < b.begin;
  });
  for (size_t s = 1, reach = 0; s < spans.size(); ++s) {
    if (spans[s].storage != spans[reach].storage) {
      reach = s;
      continue;
    }
    if (spans[s].begin < spans[reach].end) {
      const size_t a = std::min(spans[s].index, spans[reach].index);
      const size_t b = std::max(spans[s].index, spans[reach].index);
      return py::make_tuple(a, b);
    }
    if (spans[s].end > spans[reach].end) {
      reach = s;
    }
  }
  return py::none();
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
  m.def("grads_of", &dldna_fused::grads_of, py::arg("params"), py::arg("check") = true);
  m.def("common_device_dtype", &dldna_fused::common_device_dtype, py::arg("tensors"));
  m.def("states_match", &dldna_fused::states_match, py::arg("states"), py::arg("keys"),
        py::arg("lists"));
  m.def("dict_items", &dldna_fused::dict_items, py::arg("d"));
  m.def("same_items", &dldna_fused::same_items, py::arg("d"), py::arg("items"));
  m.def("find_overlap", &dldna_fused::find_overlap, py::arg("tensors"));
  m.def("adafactor_gpu_plan", &dldna_fused::adafactor_gpu_plan, py::arg("shapes"));
}
