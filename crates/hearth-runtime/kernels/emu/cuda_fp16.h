// Stand-in for CUDA's <cuda_fp16.h> when a kernel is compiled for the CPU emulator.
#pragma once
#include "cuda_emu.h"
