"""Triton kernels, one file per op. Importing this package requires ``triton``;
the op front doors import it lazily, only when the triton backend is chosen."""
