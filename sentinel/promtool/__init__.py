"""promtool's testing tools, with promtool's formats, verdicts and output.

- `ruletest`: `sentinel test rules` (`promtool test rules` files);
- `promqltest`: `sentinel promql test` (Prometheus's promqltest scripts, e.g. its
  conformance files);
- `testformat`: the series notation both use (`0+10x5 _ stale`) and the script parser.
"""

__all__ = ["promqltest", "ruletest", "testformat"]
