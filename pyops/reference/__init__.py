"""Plain-PyTorch fp32 references: the specification every backend must match bit for bit."""
