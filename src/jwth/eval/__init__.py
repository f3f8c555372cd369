"""Evaluation protocol: patient-level splits, head training on caches, metrics, reports."""
