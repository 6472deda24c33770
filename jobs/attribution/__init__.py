"""Attribution maps per image and their scores: gradients, backprop rules, CAMs, occlusion."""

from jobs.core.base import import_family

# Every module of the family, imported in name order: its analyses register themselves, so a
# new analysis is its own file and nothing else.
MODULES = import_family(__name__, __path__)
