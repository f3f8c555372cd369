"""jwth: Joint-Weighted Token Hierarchy toolkit for computational pathology.

Data path (one direction): tiles / slides -> encoder tokens -> token cache ->
heads -> metrics -> report.
"""

__version__ = "0.1.0"
