#include "tensor_io.h"

#include <cstdint>
#include <fstream>
#include <stdexcept>

namespace torchship {
namespace {

constexpr char kMagic[4] = {'T', 'S', 'I', 'O'};
constexpr uint32_t kVersion = 1;

// dtype codes, the same table as cpp/tensor_io.py
at::ScalarType dtype_of(uint32_t code) {
  switch (code) {
    case 1: return at::kFloat;
    case 2: return at::kDouble;
    case 3: return at::kLong;
    case 4: return at::kInt;
    case 5: return at::kBool;
    case 6: return at::kByte;
    default: throw std::runtime_error("unknown dtype code " + std::to_string(code));
  }
}

uint32_t code_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 1;
    case at::kDouble: return 2;
    case at::kLong: return 3;
    case at::kInt: return 4;
    case at::kBool: return 5;
    case at::kByte: return 6;
    default: throw std::runtime_error(std::string("unsupported dtype ") + c10::toString(t));
  }
}

template <typename T>
T read_pod(std::ifstream& in) {
  T value{};
  in.read(reinterpret_cast<char*>(&value), sizeof(T));
  if (!in) throw std::runtime_error("truncated tensor file");
  return value;
}

template <typename T>
void write_pod(std::ofstream& out, T value) {
  out.write(reinterpret_cast<const char*>(&value), sizeof(T));
}

}  // namespace

NamedTensors read_tensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[4];
  in.read(magic, 4);
  if (!in || std::string(magic, 4) != std::string(kMagic, 4)) throw std::runtime_error(path + " is not a TSIO file");
  if (read_pod<uint32_t>(in) != kVersion) throw std::runtime_error(path + ": unsupported TSIO version");
  const uint32_t count = read_pod<uint32_t>(in);
  NamedTensors tensors;
  for (uint32_t i = 0; i < count; ++i) {
    std::string name(read_pod<uint32_t>(in), '\0');
    in.read(name.data(), static_cast<std::streamsize>(name.size()));
    const at::ScalarType dtype = dtype_of(read_pod<uint32_t>(in));
    std::vector<int64_t> dims(read_pod<uint32_t>(in));
    for (auto& d : dims) d = read_pod<int64_t>(in);
    const uint64_t nbytes = read_pod<uint64_t>(in);
    at::Tensor t = torch::empty(dims, torch::TensorOptions().dtype(dtype));
    if (static_cast<uint64_t>(t.nbytes()) != nbytes) throw std::runtime_error(path + ": size does not match shape for " + name);
    in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes));
    if (!in) throw std::runtime_error("truncated tensor file");
    tensors.emplace_back(std::move(name), std::move(t));
  }
  return tensors;
}

void write_tensors(const std::string& path, const NamedTensors& tensors) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  out.write(kMagic, 4);
  write_pod<uint32_t>(out, kVersion);
  write_pod<uint32_t>(out, static_cast<uint32_t>(tensors.size()));
  for (const auto& [name, tensor] : tensors) {
    const at::Tensor t = tensor.contiguous().cpu();
    write_pod<uint32_t>(out, static_cast<uint32_t>(name.size()));
    out.write(name.data(), static_cast<std::streamsize>(name.size()));
    write_pod<uint32_t>(out, code_of(t.scalar_type()));
    write_pod<uint32_t>(out, static_cast<uint32_t>(t.dim()));
    for (int64_t d : t.sizes()) write_pod<int64_t>(out, d);
    write_pod<uint64_t>(out, static_cast<uint64_t>(t.nbytes()));
    out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  }
}

}  // namespace torchship
