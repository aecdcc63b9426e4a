"""The C++ loader (CMake project beside this file) and its Python side: TSIO tensor files, build and parity check."""
