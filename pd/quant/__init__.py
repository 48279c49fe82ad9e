"""Weight quantization formats: how quantized weights are stored and the reference compute that dequantizes them."""
