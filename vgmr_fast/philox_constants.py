"""Philox4x32-10 constants (Random123), the one Python definition.

Used by the pure-torch stream (``vgmr_fast.ops.dropout``) and the Triton kernels
(``vgmr_fast.triton.philox``); the C++/CUDA copy is ``csrc/vgmr_math.h``. No imports:
both layers may depend on this module without depending on each other.
"""
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
