"""Plain-PyTorch references: the spec of every op, the test oracle, the CPU path and the
benchmark baseline. Math in fp32 (fp64 for fp64 inputs), chunked over rows."""
