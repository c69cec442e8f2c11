"""Linear algebra of the rank-estimation step: least-squares scalings, discrepancies, layer spectra,
batched randomized SVD."""
from .rsvd import rsvd
from .scalings import discrepancy, fit_scalings
from .spectra import LayerSpectrum, layer_spectra

__all__ = ["LayerSpectrum", "discrepancy", "fit_scalings", "layer_spectra", "rsvd"]
