"""Log collection: worker log files and journals, and the kernel log, turned into events.

- `LogCollector`: the collector the daemon runs (readers in threads, events on the bus);
- `Catalogue` / `LogMatcher`: the pattern catalogue (`sentinel/data/log_patterns.yaml`
  plus the operator's patterns) and the fast, linear-time matcher that applies it;
- `KernelLog` / `KernelSourceSpec`: the host's one kernel-log reader, whose matches the
  log collector and the NVML collector (Xids) both subscribe to;
- `sentinel.logs.scan.main`: `sentinel logs scan`, the catalogue over files, offline.
"""

from sentinel.logs.collector import LogCollector
from sentinel.logs.kernel import KernelLog, KernelSourceSpec
from sentinel.logs.matcher import LogMatcher, Match
from sentinel.logs.patterns import BUILTIN_EVENTS, Catalogue, CatalogueError, Pattern, normalise_pci_bus_id

__all__ = [
    "BUILTIN_EVENTS",
    "Catalogue",
    "CatalogueError",
    "KernelLog",
    "KernelSourceSpec",
    "LogCollector",
    "LogMatcher",
    "Match",
    "Pattern",
    "normalise_pci_bus_id",
]
