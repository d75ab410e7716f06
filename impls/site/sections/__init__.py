"""The front page's sections, one module each, registered in page order in :data:`SECTIONS`:
one per report section of :data:`impls.families.SECTIONS`, in that order."""
from __future__ import annotations

from .atscale import AtscaleSection
from .base import Rendered, SectionContext, SiteSection, families_with_records, table_families
from .compression import CompressionSection, compression_section
from .data_parallel import DataParallelSection, data_parallel_section
from .findings import FILTER_JS, FindingsSection
from .isoflop import IsoflopSection
from .model_parallel import ModelParallelSection, model_parallel_section
from .runs import RunsSection
from .tokens import TokensSection, tokens_section

#: The sections in page order (``tests/test_site.py`` checks their names against the families table's).
SECTIONS: list[SiteSection] = [FindingsSection(), RunsSection(), DataParallelSection(), ModelParallelSection(), AtscaleSection(),
                               CompressionSection(), TokensSection(), IsoflopSection()]

__all__ = ["FILTER_JS", "SECTIONS", "Rendered", "SectionContext", "SiteSection", "compression_section", "data_parallel_section",
           "families_with_records", "model_parallel_section", "table_families", "tokens_section"]
