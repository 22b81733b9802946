// C++ tests of the CPU kernels, run by ctest: the op through the dispatcher against an independent
// float64 loop, the portable, AVX2 and AVX-512 kernel builds against each other, and the argument
// checks.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "common/adam_math.h"
#include "common/lion_math.h"
#include "common/rounding_math.h"
#include "cpu/kernel_table.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

using AdamOp = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    at::TensorList, double, double, double, double, double, bool, bool, bool,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, std::optional<at::TensorList>,
                    at::OptionalIntArrayRef);

c10::TypedOperatorHandle<AdamOp> adam_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("dldna_fused::fused_adam_", "").typed<AdamOp>();
}

struct Case {
  at::ScalarType param;
  at::ScalarType state;
  bool amsgrad;
  bool decoupled;
  bool maximize;
};

// Three steps of the op on tensors of several sizes (a zero-size one, a vector-loop tail, more than
// one chunk), each step checked against the same step computed in float64 from the op's state
// before it, so the tolerance is one step's rounding in the storage dtype.
void test_adam_against_float64(const Case& c) {
  const std::vector<int64_t> sizes{0, 1, 17, 4097, 70001};
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.99, wd = 0.1, eps = 1e-8;
  // Storage rounding: fp32 math vs float64 leaves ~1e-6 relative; bf16/fp16 one rounding each.
  const double tol = c.state == at::kFloat && c.param == at::kFloat ? 1e-5
                     : c.param == at::kBFloat16                      ? 1e-2
                                                                     : 2e-3;
  std::vector<at::Tensor> p, m, v, vmax, steps;
  for (int64_t n : sizes) {
    p.push_back(at::randn({n}, at::kDouble).to(c.param));
    m.push_back(at::zeros({n}, c.state));
    v.push_back(at::zeros({n}, c.state));
    vmax.push_back(at::zeros({n}, c.state));
    steps.push_back(at::zeros({}, at::kFloat));
  }
  for (int t = 1; t <= 3; ++t) {
    std::vector<at::Tensor> g, p64, m64, v64, vmax64;
    for (size_t i = 0; i < sizes.size(); ++i) {
      g.push_back(at::randn({sizes[i]}, at::kDouble).to(c.param));
      auto grad = g[i].to(at::kDouble);
      auto theta = p[i].to(at::kDouble);
      if (c.maximize) grad = -grad;
      if (c.decoupled) {
        theta = theta * (1 - lr * wd);
      } else {
        grad = grad + wd * theta;
      }
      m64.push_back(beta1 * m[i].to(at::kDouble) + (1 - beta1) * grad);
      v64.push_back(beta2 * v[i].to(at::kDouble) + (1 - beta2) * grad * grad);
      vmax64.push_back(at::maximum(vmax[i].to(at::kDouble), v64[i]));
      const auto& second = c.amsgrad ? vmax64[i] : v64[i];
      const double bc1 = 1 - std::pow(beta1, t), bc2 = 1 - std::pow(beta2, t);
      p64.push_back(theta - (lr / bc1) * m64[i] / (second.sqrt() / std::sqrt(bc2) + eps));
    }
    adam_op().call(p, g, m, v, c.amsgrad ? at::TensorList(vmax) : at::TensorList(), steps, lr, beta1,
                   beta2, wd, eps, c.amsgrad, c.maximize, c.decoupled, std::nullopt, std::nullopt,
                   std::nullopt, std::nullopt, std::nullopt);
    for (size_t i = 0; i < sizes.size(); ++i) {
      const std::string where = " (size " + std::to_string(sizes[i]) + ", step " + std::to_string(t) + ")";
      expect(steps[i].item<float>() == static_cast<float>(t), "step counter" + where);
      expect(at::allclose(p[i].to(at::kDouble), p64[i], tol, tol), "param" + where);
      expect(at::allclose(m[i].to(at::kDouble), m64[i], tol, tol), "exp_avg" + where);
      expect(at::allclose(v[i].to(at::kDouble), v64[i], tol, tol), "exp_avg_sq" + where);
      if (c.amsgrad) {
        expect(at::allclose(vmax[i].to(at::kDouble), vmax64[i], tol, tol), "max_exp_avg_sq" + where);
      }
    }
  }
}

// The portable and AVX2 builds of the kernel compute the same values on the same inputs.
void test_kernel_builds_agree() {
  const dldna_fused::cpu::KernelTable* avx2 = dldna_fused::cpu::kernels_avx2();
  if (avx2 == nullptr) {
    std::printf("skip: no AVX2 kernel build on this platform\n");
    return;
  }
  const int64_t n = 1037;
  std::vector<at::Tensor> results;
  for (const auto* table : {&dldna_fused::cpu::kernels_default(), avx2}) {
    at::manual_seed(0);
    auto p = at::randn({n}), g = at::randn({n}), m = at::randn({n}), v = at::rand({n});
    const auto c = dldna_fused::adam_coefficients(1e-2, 0.9, 0.999, 0.0, 1e-8, 1.0, 1.f, false, false, true);
    dldna_fused::cpu::AdamTensorArgs args{p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), nullptr, c, {}};
    dldna_fused::cpu::AdamLaunch launch{dldna_fused::cpu::Dtype::Float, dldna_fused::cpu::Dtype::Float, &args, 0.f};
    dldna_fused::cpu::Chunk chunk{0, 0, n};
    table->adam(launch, &chunk, 1);
    results.push_back(p);
  }
  // FMA contraction in the AVX2 build may change the last bit.
  expect(at::allclose(results[0], results[1], 1e-6, 1e-7), "portable and AVX2 kernels agree");

  // Lion and Sophia (with the unclipped count), including the sign of exact zeros and NaN.
  std::vector<at::Tensor> lion, sophia;
  std::vector<int64_t> unclipped;
  for (const auto* table : {&dldna_fused::cpu::kernels_default(), avx2}) {
    at::manual_seed(1);
    auto p = at::randn({n}), g = at::randn({n}), m = at::randn({n});
    g.index_put_({at::indexing::Slice(0, 5)}, 0.0);
    m.index_put_({at::indexing::Slice(0, 5)}, 0.0);
    g.index_put_({5}, std::nan(""));
    dldna_fused::cpu::LionTensorArgs largs{p.data_ptr(), g.data_ptr(), m.data_ptr(), {}};
    const dldna_fused::cpu::LionLaunch llaunch{
        dldna_fused::cpu::Dtype::Float, dldna_fused::cpu::Dtype::Float,
        dldna_fused::lion_coefficients(1e-2, 0.9, 0.99, 0.1, 1.f, false), &largs, 0.f};
    dldna_fused::cpu::Chunk chunk{0, 0, n};
    table->lion(llaunch, &chunk, 1);
    lion.push_back(p);

    auto q = at::randn({n}), gq = at::randn({n}), mq = at::randn({n}), h = at::rand({n});
    dldna_fused::cpu::SophiaTensorArgs sargs{q.data_ptr(), gq.data_ptr(), mq.data_ptr(), h.data_ptr(), {}};
    std::atomic<int64_t> count{0};
    const dldna_fused::cpu::SophiaLaunch slaunch{
        dldna_fused::cpu::Dtype::Float, dldna_fused::cpu::Dtype::Float,
        dldna_fused::sophia_coefficients(1e-2, 0.965, 0.5, 2.0, 0.1, 1.f, false), &sargs, &count, 0.f};
    table->sophia(slaunch, &chunk, 1);
    sophia.push_back(q);
    unclipped.push_back(count.load());
  }
  expect(at::allclose(lion[0], lion[1], 1e-6, 1e-7, /*equal_nan=*/true), "Lion kernels agree");
  // sign(NaN) = 0, as torch.sign computes it: the NaN gradient's coordinate only decays.
  expect(lion[0].isnan().sum().item<int64_t>() == 0, "Lion: a NaN gradient leaves no NaN in the param");
  expect(at::allclose(sophia[0], sophia[1], 1e-6, 1e-7), "Sophia kernels agree");
  expect(unclipped[0] == unclipped[1] && unclipped[0] > 0 && unclipped[0] < n,
         "Sophia kernels count the same unclipped coordinates");
}

// AdaFactor's three passes on one factored 13 x 37 matrix (a column tail after the vector loop) and
// one unfactored vector, in both builds; the host's finalize steps are done here by hand.
void test_adafactor_kernel_builds_agree() {
  namespace cpu = dldna_fused::cpu;
  const cpu::KernelTable* avx2 = cpu::kernels_avx2();
  if (avx2 == nullptr) {
    return;
  }
  const int64_t rows = 13, cols = 37, n = 1037;
  std::vector<std::vector<at::Tensor>> results;
  for (const auto* table : {&cpu::kernels_default(), avx2}) {
    at::manual_seed(2);
    auto p = at::randn({rows, cols}), g = at::randn({rows, cols}), m = at::randn({rows, cols});
    auto row = at::rand({rows}), col = at::rand({cols});
    auto q = at::randn({n}), gq = at::randn({n}), sq = at::rand({n});
    auto col_partials = at::zeros({cols}), row_mean = at::zeros({1}), col_rsqrt = at::zeros({cols});
    std::vector<double> p2(2), u2(2);
    const dldna_fused::AdafactorDecay decay{0.5f, 0.5f};
    const dldna_fused::AdafactorApply apply{0.01f, 0.999f, 0.9f, 0.1f, true};
    cpu::AdafactorTensorArgs args[2] = {
        {p.data_ptr(), g.data_ptr(), row.data_ptr<float>(), col.data_ptr<float>(), nullptr,
         m.data_ptr<float>(), rows, cols, decay, row_mean.data_ptr<float>(),
         col_rsqrt.data_ptr<float>(), apply, {}},
        {q.data_ptr(), gq.data_ptr(), nullptr, nullptr, sq.data_ptr<float>(), nullptr, 0, 0, decay,
         nullptr, nullptr, {0.01f, 1.f, 0.f, 1.f, false}, {}}};
    const cpu::Chunk units[2] = {{0, 0, rows * cols}, {1, 0, n}};
    const int64_t col_offsets[2] = {0, -1};
    const cpu::AdafactorLaunch launch{cpu::Dtype::Float, 1e-30f, 0.5f, args, units, col_offsets,
                                      col_partials.data_ptr<float>(), p2.data(), u2.data(), 0.f};
    table->adafactor_reduce(launch, units, 2);
    row_mean.fill_(row.mean());
    col_rsqrt.copy_(col_partials.rsqrt());
    table->adafactor_update_norm(launch, units, 2);
    table->adafactor_apply(launch, units, 2);
    results.push_back({p, m, row, col_partials, q, sq, at::tensor({p2[0], p2[1], u2[0], u2[1]})});
  }
  const char* names[] = {"param", "exp_avg", "row EMA", "column sums", "vector param", "V", "sums"};
  for (size_t k = 0; k < results[0].size(); ++k) {
    expect(at::allclose(results[0][k], results[1][k], 1e-6, 1e-7),
           std::string("AdaFactor kernels agree: ") + names[k]);
  }
}

void expect_error(const std::function<void()>& call, const std::string& needle) {
  try {
    call();
    expect(false, "expected an error mentioning '" + needle + "'");
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos,
           "error mentions '" + needle + "': " + e.what());
  }
}

// The norm kernels of both builds: partial sums of squares and |x| against float64, and the inf
// norm letting a NaN through; the scale kernel against a plain multiply.
void test_grad_norm_and_scale_kernels() {
  namespace cpu = dldna_fused::cpu;
  const int64_t n = 5037;  // a flush boundary (4096) and a scalar tail
  for (const auto* table : {&cpu::kernels_default(), cpu::kernels_avx2()}) {
    if (table == nullptr) {
      continue;
    }
    at::manual_seed(3);
    auto x = at::randn({n});
    const void* pointers[1] = {x.data_ptr()};
    const cpu::Chunk chunk{0, 0, n};
    double partial = 0.0;
    const cpu::GradNormLaunch l2{cpu::Dtype::Float, cpu::NormKind::L2, pointers, &chunk, &partial};
    table->grad_norm(l2, &chunk, 1);
    const double exact = x.to(at::kDouble).square().sum().item<double>();
    expect(std::abs(partial - exact) / exact < 1e-6, "grad_norm L2 partial matches float64");
    const cpu::GradNormLaunch l1{cpu::Dtype::Float, cpu::NormKind::L1, pointers, &chunk, &partial};
    table->grad_norm(l1, &chunk, 1);
    expect(std::abs(partial - x.to(at::kDouble).abs().sum().item<double>()) < 1e-3, "grad_norm L1 partial");
    x.index_put_({4099}, std::nan(""));
    const cpu::GradNormLaunch inf{cpu::Dtype::Float, cpu::NormKind::Inf, pointers, &chunk, &partial};
    table->grad_norm(inf, &chunk, 1);
    expect(std::isnan(partial), "grad_norm inf lets a NaN through");

    auto y = at::randn({n});
    const auto expected = y * 0.25f;
    void* targets[1] = {y.data_ptr()};
    table->scale({cpu::Dtype::Float, 0.25f, targets}, &chunk, 1);
    expect(at::equal(y, expected), "scale kernel multiplies every element");
  }
}

void test_argument_checks() {
  auto p = at::zeros({4}), g = at::zeros({4}), m = at::zeros({4}), v = at::zeros({4});
  auto step = at::zeros({});
  std::vector<at::Tensor> ps{p}, gs{g}, ms{m}, vs{v}, steps{step}, none{};
  expect_error([&] { adam_op().call(ps, none, ms, vs, none, steps, 1e-3, 0.9, 0.999, 0., 1e-8, false, false, false, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt); }, "grads");
  expect_error([&] { adam_op().call(ps, gs, ms, vs, none, steps, -1., 0.9, 0.999, 0., 1e-8, false, false, false, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt); }, "lr");
  expect_error([&] { adam_op().call(ps, gs, ms, vs, none, steps, 1e-3, 1.0, 0.999, 0., 1e-8, false, false, false, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt); }, "beta1");
  std::vector<at::Tensor> bad_g{at::zeros({5})};
  expect_error([&] { adam_op().call(ps, bad_g, ms, vs, none, steps, 1e-3, 0.9, 0.999, 0., 1e-8, false, false, false, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt); }, "grads[0] has shape");
  std::vector<at::Tensor> p64{at::zeros({4}, at::kDouble)}, g64{at::zeros({4}, at::kDouble)};
  expect_error([&] { adam_op().call(p64, g64, ms, vs, none, steps, 1e-3, 0.9, 0.999, 0., 1e-8, false, false, false, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt); }, "float32, bfloat16 or float16");
  expect(step.item<float>() == 0.f && p.abs().sum().item<float>() == 0.f, "rejected calls change nothing");
}

}  // namespace

// The kernel builds this CPU can run: the portable one first, then AVX2 and AVX-512 where present.
std::vector<const dldna_fused::cpu::KernelTable*> kernel_builds() {
  namespace cpu = dldna_fused::cpu;
  std::vector<const cpu::KernelTable*> tables{&cpu::kernels_default()};
  for (const cpu::KernelTable* table : {cpu::kernels_avx2(), cpu::kernels_avx512()}) {
    if (table != nullptr) {
      tables.push_back(table);
    }
  }
  return tables;
}

// One low-bit Adam and one Lion step per width, by every kernel build, on the same params, grads
// and states: 1037 elements, so blocks end in a partial block, an element-by-element tail and (at 4
// bits) an odd last element. The builds differ only by FMA contraction (the portable one has
// none), so params agree to an ulp or so, and a code may move by one where a state lands next to a
// midpoint. A slip in a block loop's packing or tails would move many codes by more.
void test_lowbit_kernel_builds_agree() {
  namespace cpu = dldna_fused::cpu;
  const std::vector<const cpu::KernelTable*> tables = kernel_builds();
  constexpr int64_t n = 1037;
  for (int bits : {8, 4}) {
    for (bool adam : {true, false}) {
      const int64_t block_size = bits == 8 ? 256 : 128;
      const int64_t blocks = (n + block_size - 1) / block_size;
      const int64_t bytes = bits == 8 ? n : (n + 1) / 2;
      std::vector<at::Tensor> params, codes_m, codes_v, absmax_m;
      for (const cpu::KernelTable* table : tables) {
        at::manual_seed(5);
        auto p = at::randn({n}), g = at::randn({n});
        auto cm = at::randint(0, 256, {bytes}, at::kByte), cv = at::randint(0, 256, {bytes}, at::kByte);
        auto am = at::rand({blocks}) * 0.1 + 0.01, av = at::rand({blocks}) * 0.01 + 0.001;
        cpu::LowbitTensorArgs args{p.data_ptr(),
                                   g.data_ptr(),
                                   {cm.data_ptr<uint8_t>(), am.data_ptr<float>()},
                                   {cv.data_ptr<uint8_t>(), av.data_ptr<float>()},
                                   dldna_fused::adam_coefficients(1e-2, 0.9, 0.999, 0.01, 1e-8, 3.0, 1.f, false, false, true),
                                   {}};
        cpu::LowbitLaunch launch{cpu::Dtype::Float,
                                 bits,
                                 block_size,
                                 &cpu::quant_lut(bits, true),
                                 adam ? &cpu::quant_lut(bits, false) : nullptr,
                                 dldna_fused::lion_coefficients(1e-2, 0.9, 0.99, 0.1, 1.f, false),
                                 &args,
                                 0.f};
        const cpu::Chunk chunk{0, 0, n};
        (adam ? table->adam_lowbit : table->lion_lowbit)(launch, &chunk, 1);
        params.push_back(p);
        codes_m.push_back(cm);
        codes_v.push_back(cv);
        absmax_m.push_back(am);
      }
      const std::string what = std::to_string(bits) + "-bit " + (adam ? "Adam" : "Lion") + ", ";
      // Nibbles at 4 bits: the low and high code of each byte.
      auto code_moves = [&](const at::Tensor& a, const at::Tensor& b) {
        auto ai = a.to(at::kInt), bi = b.to(at::kInt);
        if (bits == 4) {
          ai = at::cat({ai.bitwise_and(15), ai.bitwise_right_shift(4)});
          bi = at::cat({bi.bitwise_and(15), bi.bitwise_right_shift(4)});
        }
        const auto diff = (ai - bi).abs();
        return std::pair<int64_t, int64_t>{diff.ne(0).sum().item<int64_t>(), diff.max().item<int64_t>()};
      };
      for (size_t t = 1; t < tables.size(); ++t) {
        const std::string build = what + tables[t]->name + " against portable: ";
        expect(at::allclose(params[0], params[t], 1e-6, 1e-7), build + "params differ");
        expect(at::allclose(absmax_m[0], absmax_m[t], 1e-6, 0), build + "exp_avg absmax differs");
        for (const auto& [states, name] : {std::pair{&codes_m, "exp_avg"}, std::pair{&codes_v, "exp_avg_sq"}}) {
          if (!adam && states == &codes_v) {
            continue;
          }
          const auto [moved, most] = code_moves((*states)[0], (*states)[t]);
          expect(moved <= 4 && most <= 1, build + name + " codes: " + std::to_string(moved) + " moved, by up to " +
                                              std::to_string(most));
        }
      }
    }
  }
}

// Every kernel build gives every float in [-1, 1] the same code: the portable build's table lookup
// ([Note: nearest-code lookup] in cpu/kernel_table.h), and the AVX2 and AVX-512 builds' arithmetic
// ([Note: vectorized nearest code]). All 2^30 + 1 magnitudes, of both signs for signed maps, in
// blocks of 4096 whose first element is 1 (absmax 1, so y = x). Every code also dequantizes to
// the same value in every build.
void test_codes_on_every_float() {
  namespace cpu = dldna_fused::cpu;
  const std::vector<const cpu::KernelTable*> tables = kernel_builds();
  if (tables.size() < 2) {
    std::printf("skip: no vector low-bit kernels on this CPU\n");
    return;
  }
  constexpr int64_t kBlock = 4096, kBlocks = 1024, kTotal = kBlock * kBlocks;
  constexpr uint32_t kOneBits = 0x3f800000;
  std::vector<float> input(kTotal);
  std::vector<std::vector<uint8_t>> codes(tables.size(), std::vector<uint8_t>(kTotal));
  std::vector<float> absmax(kBlocks);
  for (int bits : {8, 4}) {
    for (bool is_signed : {false, true}) {
      const cpu::QuantLut* lut = &cpu::quant_lut(bits, is_signed);
      std::vector<int64_t> differ(tables.size(), 0);
      for (uint32_t sign = 0; sign < (is_signed ? 2u : 1u); ++sign) {
        for (uint32_t next = 0; next <= kOneBits;) {
          for (int64_t b = 0; b < kBlocks; ++b) {
            input[b * kBlock] = 1.f;
            for (int64_t k = 1; k < kBlock; ++k) {
              const uint32_t magnitude = next <= kOneBits ? next++ : kOneBits;
              const uint32_t pattern = magnitude | (sign << 31);
              std::memcpy(&input[b * kBlock + k], &pattern, sizeof(float));
            }
          }
          // Each hardware thread takes a share of the blocks (the portable build's lookups are slow).
          std::vector<std::thread> workers;
          const int64_t shares = std::max(1u, std::min(8u, std::thread::hardware_concurrency()));
          for (int64_t w = 0; w < shares; ++w) {
            workers.emplace_back([&, w] {
              const cpu::Chunk chunk{0, kBlocks * w / shares * kBlock, kBlocks * (w + 1) / shares * kBlock};
              for (size_t t = 0; t < tables.size(); ++t) {
                const cpu::QuantizeLaunch launch{cpu::Dtype::Float, bits, kBlock, lut, input.data(),
                                                 {codes[t].data(), absmax.data()}};
                tables[t]->quantize(launch, &chunk, 1);
              }
            });
          }
          for (std::thread& worker : workers) {
            worker.join();
          }
          for (size_t t = 1; t < tables.size(); ++t) {
            for (int64_t i = 0; i < (bits == 8 ? kTotal : kTotal / 2); ++i) {
              differ[t] += codes[0][i] != codes[t][i];
            }
          }
        }
      }
      const std::string map = std::to_string(bits) + "-bit " + (is_signed ? "signed" : "unsigned") + " map: ";
      for (size_t t = 1; t < tables.size(); ++t) {
        expect(differ[t] == 0, map + tables[t]->name + " and portable codes differ in " + std::to_string(differ[t]) + " bytes");
      }
      // Every code (every byte value) in one block, dequantized by each build; a block of 67 has a tail
      // after the vectors of every build.
      for (const int64_t n : {int64_t{256}, int64_t{67}}) {
        std::vector<uint8_t> all_codes(256);
        for (int c = 0; c < 256; ++c) {
          all_codes[c] = static_cast<uint8_t>(c);
        }
        const float block_absmax[1] = {0.37f};
        std::vector<std::vector<float>> values(tables.size(), std::vector<float>(n));
        const cpu::Chunk chunk{0, 0, n};
        for (size_t t = 0; t < tables.size(); ++t) {
          const cpu::DequantizeLaunch launch{bits, 256, lut, all_codes.data(), block_absmax, values[t].data()};
          tables[t]->dequantize(launch, &chunk, 1);
        }
        for (size_t t = 1; t < tables.size(); ++t) {
          expect(std::memcmp(values[0].data(), values[t].data(), n * sizeof(float)) == 0,
                 map + tables[t]->name + " and portable dequantized values differ (block of " + std::to_string(n) + ")");
        }
      }
    }
  }
}

// Stochastic rounding's bits where the vector blocks meet the rare cases: a range that starts off a
// multiple of 16 (the element-by-element bits), and element indices past 2^33, whose pairs are
// numbered past 2^32 and take another pair_key ([Note: paired random bits]). Lion without weight
// decay computes p - lr sign(c) with one rounding in every build, so each build's bf16 write must
// equal stochastic_round_value of that float, bit for bit. The kernels address param + index, so
// a far range runs on a small buffer through a pointer moved back by its start.
void test_stochastic_rounding_bits_at_far_indices() {
  namespace cpu = dldna_fused::cpu;
  constexpr int64_t n = 80;
  const uint64_t salt = dldna_fused::rounding_salt(0x5eed, 3.f);
  const float lr = 1e-3f;
  for (const int64_t start : {int64_t{0}, int64_t{8}, (int64_t{1} << 33) - 32, (int64_t{1} << 33) + 8,
                              int64_t{1} << 36}) {
    for (const auto* table : {&cpu::kernels_default(), cpu::kernels_avx2(), cpu::kernels_avx512()}) {
      if (table == nullptr) {
        continue;
      }
      at::manual_seed(7);
      auto p = at::randn({n}).to(at::kBFloat16), g = at::randn({n}).to(at::kBFloat16), m = at::randn({n});
      const auto p0 = p.clone().to(at::kFloat), c = (m * 0.9 + g.to(at::kFloat) * 0.1).sign();
      cpu::LionTensorArgs args{static_cast<c10::BFloat16*>(p.data_ptr()) - start,
                               static_cast<c10::BFloat16*>(g.data_ptr()) - start,
                               static_cast<float*>(m.data_ptr()) - start, {nullptr, salt}};
      const cpu::LionLaunch launch{cpu::Dtype::BFloat16, cpu::Dtype::Float,
                                   dldna_fused::lion_coefficients(lr, 0.9, 0.99, 0.0, 1.f, false), &args, 0.f,
                                   dldna_fused::RoundMode::Stochastic};
      const cpu::Chunk chunk{0, start, start + n};
      table->lion(launch, &chunk, 1);
      int64_t wrong = 0;
      for (int64_t k = 0; k < n; ++k) {
        const float x = p0[k].item<float>() - lr * c[k].item<float>();
        const float expected = dldna_fused::stochastic_round_value(x, salt, start + k);
        wrong += p[k].item<float>() != expected;
      }
      expect(wrong == 0, "stochastic rounding from element " + std::to_string(start) + ": " +
                             std::to_string(wrong) + " of " + std::to_string(n) + " writes differ from the formula");
    }
  }
  // Past 2^33 the bits are not those of the range at 0 again.
  expect(dldna_fused::random_bits16(salt, int64_t{1} << 36) != dldna_fused::random_bits16(salt, 0) ||
             dldna_fused::random_bits16(salt, (int64_t{1} << 36) + 1) != dldna_fused::random_bits16(salt, 1),
         "pairs past 2^32 draw other bits than the first ones");
}

int main() {
  at::manual_seed(1234);
  int cases = 0;
  for (auto [param, state] : {std::pair{at::kFloat, at::kFloat}, {at::kBFloat16, at::kBFloat16},
                              {at::kBFloat16, at::kFloat}, {at::kHalf, at::kHalf}, {at::kHalf, at::kFloat}}) {
    for (bool amsgrad : {false, true}) {
      for (bool decoupled : {false, true}) {
        test_adam_against_float64({param, state, amsgrad, decoupled, /*maximize=*/decoupled});
        ++cases;
      }
    }
  }
  test_kernel_builds_agree();
  test_adafactor_kernel_builds_agree();
  test_grad_norm_and_scale_kernels();
  test_argument_checks();
  test_lowbit_kernel_builds_agree();
  test_codes_on_every_float();
  test_stochastic_rounding_bits_at_far_indices();
  std::printf("%d Adam cases, kernel builds (Adam, Lion, Sophia, AdaFactor, norm, scale), argument checks: %s\n", cases, failures == 0 ? "ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}
