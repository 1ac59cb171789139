"""The rule engine: Prometheus rule files evaluated over the store, and the alert state machine.

- `rulefile`: loading and validating rule files as promtool does (`load_rule_files`);
- `group`: evaluating one group (`GroupEvaluator`), `query`: the PromQL bridge;
- `state`: the alert state machine; `persist`: alert state that survives a restart;
- `manager.RuleManager`: runs the groups on their interval and at once on events, and
  tells subscribers (notifications, remediation) about alert transitions;
- `doc`: renders docs/rules.md from the default rules.

Templates live in `sentinel.gotemplate`, the promtool-compatible tools in `sentinel.promtool`.
"""

__all__ = ["doc", "group", "manager", "persist", "query", "rulefile", "state"]
