"""The `sentinel` command line.

- `main.main`: the entry point (`run`, `check`, `test rules`, `promql test`, `logs scan`,
  `demo`, `simulate`, and the operator commands);
- `ops`: `status`, `history`, `pause`, `resume`, which talk to a running daemon.
"""

from sentinel.cli.main import main

__all__ = ["main"]
