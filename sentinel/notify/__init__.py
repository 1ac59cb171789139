"""Notifications: Slack, webhooks and Alertmanager through a durable outbox.

What it offers: `dispatcher.Notifier` (the daemon builds one, subscribes its
`on_alert` to the rule manager and hands remediation reports to `report_action`),
`actions.ActionReport` (such a report) and `settings.NotifyConfig` (its configuration).
The rest is internal: `outbox` (the SQLite queue), `delivery` (a loop per receiver with
backoff), `slack`, `webhook` and `alertmanager` (rendering and sending), `secrets`
(reading and scrubbing). Nothing is imported here: `sentinel.config` imports
`settings`, and the notifier itself imports the rules package, which imports config.
"""

__all__ = [
    "actions",
    "alertmanager",
    "delivery",
    "dispatcher",
    "metrics",
    "notices",
    "outbox",
    "secrets",
    "settings",
    "slack",
    "testing",
    "transport",
    "webhook",
]
