// A tiny tensor file format shared with Python (cpp/tensor_io.py): no pickle, no JSON library needed.
// File: "TSIO" magic, uint32 version (1), uint32 count, then per tensor:
//   uint32 name length, name bytes, uint32 dtype code, uint32 ndim, int64 dims[ndim], uint64 nbytes, raw bytes
// All integers little-endian; tensor data raw little-endian, row-major.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

namespace torchship {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

NamedTensors read_tensors(const std::string& path);
void write_tensors(const std::string& path, const NamedTensors& tensors);

}  // namespace torchship
