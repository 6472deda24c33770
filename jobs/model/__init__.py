"""Analyses of the model itself: pictures of its filters and units, gradient ascent, inversion, dreams;
and fine-tuning it on the dataset (transfer learning, on Ray Train)."""

from jobs.core.base import import_family

# Every module of the family, imported in name order: its analyses register themselves, so a
# new analysis is its own file and nothing else.
MODULES = import_family(__name__, __path__)
