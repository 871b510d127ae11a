// The CUDA op file compiled as C++ over emulation.h (see tests/test_cuda_emulation.py).
#include "cuda/batch_norm_elemt.cu"
