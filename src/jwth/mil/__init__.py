"""Multiple-instance learning over slides and patients.

- :mod:`jwth.mil.bags`: bags from per-slide HDF5 files or from a tile token cache;
- :mod:`jwth.mil.abmil`: gated-attention ABMIL (Ilse et al. 2018, eq. 9) and mean
  pooling (:class:`~jwth.mil.abmil.MeanMIL`), padding masks, chunked scoring;
- :mod:`jwth.mil.train`: patient-level cross-validation, bag-size baseline, reports.
"""

from jwth.mil.abmil import ABMIL, MeanMIL, MILOutput, build_mil_model
from jwth.mil.bags import Bags, bags_from_slide_h5, bags_from_token_cache, patient_from_barcode

__all__ = ["ABMIL", "MeanMIL", "MILOutput", "build_mil_model", "Bags", "bags_from_slide_h5",
           "bags_from_token_cache", "patient_from_barcode"]
