// Stand-in for CUDA's <cuda_bf16.h> when a kernel is compiled for the CPU emulator.
#pragma once
#include "cuda_emu.h"
