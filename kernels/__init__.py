"""Triton kernels of halrp_fast (installed as ``halrp_fast.kernels``).

Imported only by the provider that serves the ops with them (see ``halrp_fast._backend``), never at
``import halrp_fast``.
"""
