"""Linear algebra of the rank-estimation step: least-squares scalings, discrepancies, layer spectra."""
from .scalings import discrepancy, fit_scalings
from .spectra import LayerSpectrum, layer_spectra

__all__ = ["LayerSpectrum", "discrepancy", "fit_scalings", "layer_spectra"]
