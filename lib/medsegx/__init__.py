"""MedSegX (ConMoAE-SAM): SAM with a Contextual Mixture of Adapter Experts.

The package is pure model code with no MONAI Label imports; the app (``apps/medsegx``) and
the offline trainer (``training/``) build on it. Import it as ``medsegx``, never as ``lib``.
"""

__version__ = "0.1.0"
