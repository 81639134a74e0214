"""fastbn's Triton kernels (@triton.jit code only; the host side is fastbn.launch)."""
