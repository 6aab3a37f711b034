"""The floating-point types darwinlm loads, stores and exports weights in, by the names configs use."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
