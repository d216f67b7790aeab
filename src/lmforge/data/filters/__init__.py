"""Heuristic quality filters with their published defaults: Gopher, C4, FineWeb."""

from lmforge.data.filters.c4 import C4Filter
from lmforge.data.filters.fineweb import FineWebQualityFilter
from lmforge.data.filters.gopher import GopherQualityFilter, GopherRepetitionFilter

__all__ = ["C4Filter", "FineWebQualityFilter", "GopherQualityFilter", "GopherRepetitionFilter"]
