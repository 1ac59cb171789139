"""Notifications: Slack, webhooks and Alertmanager through a durable outbox."""
