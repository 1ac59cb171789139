"""Log collection: worker log files and journals, and the kernel log, turned into events.

- `LogCollector`: the collector the daemon runs (readers in threads, events on the bus);
- `Catalogue` / `Matcher`: the pattern catalogue (`sentinel/data/log_patterns.yaml`
  plus the operator's patterns) and the fast matcher that applies it;
- `KernelSourceSpec`: where the host's kernel log is read from;
- `sentinel.logs.scan.main`: `sentinel logs scan`, the catalogue over files, offline.
"""

from sentinel.logs.collector import LogCollector
from sentinel.logs.kernel import KernelSourceSpec
from sentinel.logs.matcher import Match, Matcher
from sentinel.logs.patterns import BUILTIN_EVENTS, Catalogue, CatalogueError, Pattern, normalise_pci_bus_id

__all__ = [
    "BUILTIN_EVENTS",
    "Catalogue",
    "CatalogueError",
    "KernelSourceSpec",
    "LogCollector",
    "Match",
    "Matcher",
    "Pattern",
    "normalise_pci_bus_id",
]
