"""Pages of the report, one module per family of analyses; importing them registers them.

See :mod:`pipeline.report.views.base` for how a view is found for an entry.
"""

from pipeline.report.views import attribution, dataset, training  # noqa: F401  (importing registers them)
from pipeline.report.views.base import FAMILY_VIEWS, VIEWS, FamilyView, Page, View, family_view, view

__all__ = ["FAMILY_VIEWS", "VIEWS", "FamilyView", "Page", "View", "family_view", "view"]
