// torchship_cpp: run a frozen TorchScript module or an AOTInductor package from C++ on tensors read from a TSIO file.
//   torchship_cpp torchscript model.torchscript.pt inputs.tsio outputs.tsio --inputs-per-case K
//   torchship_cpp aoti        model.aoti.pt2        inputs.tsio outputs.tsio --inputs-per-case K [--repeat N]
// Inputs are K tensors per case, in order; outputs are written as "<case>/<i>" for every output of every case.
// --repeat N runs every case N more times after its first run and prints "case <c>: p50 <ms> ms" for each.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include "tensor_io.h"

namespace {

std::vector<at::Tensor> flatten(const c10::IValue& value) {
  if (value.isTensor()) return {value.toTensor()};
  std::vector<at::Tensor> out;
  if (value.isTuple()) {
    for (const auto& v : value.toTupleRef().elements()) out.push_back(v.toTensor());
  } else if (value.isTensorList()) {
    for (const auto& t : value.toTensorVector()) out.push_back(t);
  } else {
    throw std::runtime_error("model returned something other than tensors");
  }
  return out;
}

double median_ms(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return samples.empty() ? 0.0 : samples[samples.size() / 2];
}

template <typename Run>
std::vector<at::Tensor> run_case(Run&& run, size_t repeat, size_t c) {
  std::vector<at::Tensor> result = run();
  std::vector<double> samples;
  for (size_t r = 0; r < repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    samples.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  if (repeat > 0) std::cout << "case " << c << ": p50 " << median_ms(samples) << " ms\n";
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: torchship_cpp torchscript|aoti ARTIFACT INPUTS.tsio OUTPUTS.tsio [--inputs-per-case K]\n";
    return 2;
  }
  const std::string mode = argv[1], artifact = argv[2], inputs_path = argv[3], outputs_path = argv[4];
  size_t per_case = 1, repeat = 0;
  for (int i = 5; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--inputs-per-case") per_case = std::stoul(argv[i + 1]);
    if (std::string(argv[i]) == "--repeat") repeat = std::stoul(argv[i + 1]);
  }
  try {
    const torchship::NamedTensors inputs = torchship::read_tensors(inputs_path);
    if (per_case == 0 || inputs.size() % per_case != 0) throw std::runtime_error("input count is not a multiple of --inputs-per-case");
    torch::NoGradGuard no_grad;
    torchship::NamedTensors outputs;
    auto start = std::chrono::steady_clock::now();
    if (mode == "torchscript") {
      torch::jit::script::Module module = torch::jit::load(artifact);
      module.eval();
      for (size_t c = 0; c < inputs.size() / per_case; ++c) {
        std::vector<c10::IValue> args;
        for (size_t k = 0; k < per_case; ++k) args.emplace_back(inputs[c * per_case + k].second);
        const auto result = run_case([&] { return flatten(module.forward(args)); }, repeat, c);
        for (size_t i = 0; i < result.size(); ++i) outputs.emplace_back(std::to_string(c) + "/" + std::to_string(i), result[i]);
      }
    } else if (mode == "aoti") {
      torch::inductor::AOTIModelPackageLoader loader(artifact);
      for (size_t c = 0; c < inputs.size() / per_case; ++c) {
        std::vector<at::Tensor> args;
        for (size_t k = 0; k < per_case; ++k) args.push_back(inputs[c * per_case + k].second);
        const auto result = run_case([&] { return loader.run(args); }, repeat, c);
        for (size_t i = 0; i < result.size(); ++i) outputs.emplace_back(std::to_string(c) + "/" + std::to_string(i), result[i]);
      }
    } else {
      std::cerr << "unknown mode " << mode << " (torchscript or aoti)\n";
      return 2;
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    torchship::write_tensors(outputs_path, outputs);
    std::cout << "ran " << inputs.size() / per_case << " case(s) in " << ms << " ms\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
