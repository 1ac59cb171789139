"""Where everything lives in etcd, under `/sentinel/<fleet>/`.

    hosts/<host>                 HostStatus JSON, under the host's lease (gone = host down)
    members/<host>               MemberRecord JSON, no lease: every host that ever joined
    election/<lease hex>         host id, under its lease; lowest create_revision leads
                                 (the layout of etcd's own election recipe, so
                                 `etcdctl elect --listen` and /v3/election/leader agree)
    slots/holders/<pool>/<slot>  a held disruption slot (slot 000000..limit-1), under the
                                 holder's lease; one key per pool the action counts in
    slots/waiters/<holder>       a waiting request, under its lease (gives FIFO order)
    breaker/<alert>              an open (or operator-resumed) fleet breaker, no lease
    groups/<group>/lock          the group action in progress, under the initiator's lease
    groups/<group>/plan          the plan of the last group action and its phase, no lease
    groups/<group>/acks/<plan>/<step>/<member>   one member's acknowledgement of one step

Pool names and alert names may hold characters that are not safe in a key; they are
percent-quoted.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

__all__ = ["Keys"]


def _q(text: str) -> str:
    return quote(text, safe="=._-:")


class Keys:
    """The key layout of one fleet."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.hosts = self.prefix + "hosts/"
        self.members = self.prefix + "members/"
        self.election = self.prefix + "election/"
        self.slots = self.prefix + "slots/"
        self.holders = self.slots + "holders/"
        self.waiters = self.slots + "waiters/"
        self.breakers = self.prefix + "breaker/"
        self.groups = self.prefix + "groups/"

    def host(self, host: str) -> str:
        return self.hosts + host

    def member(self, host: str) -> str:
        return self.members + host

    def pool(self, pool: str) -> str:
        return f"{self.holders}{_q(pool)}/"

    def slot(self, pool: str, index: int) -> str:
        return f"{self.pool(pool)}{index:06d}"

    def slot_of(self, key: str) -> tuple[str, int] | None:
        """(pool, index) of a holder key; None for anything else."""
        if not key.startswith(self.holders):
            return None
        pool, _, index = key[len(self.holders) :].rpartition("/")
        return (unquote(pool), int(index)) if pool and index.isdigit() else None

    def waiter(self, holder: str) -> str:
        return self.waiters + holder

    def breaker(self, alert: str) -> str:
        return self.breakers + _q(alert)

    def alert_of(self, breaker_key: str) -> str:
        return unquote(breaker_key[len(self.breakers) :])

    def group_lock(self, group: str) -> str:
        return f"{self.groups}{group}/lock"

    def group_plan(self, group: str) -> str:
        return f"{self.groups}{group}/plan"

    def group_acks(self, group: str, plan_id: str = "") -> str:
        return f"{self.groups}{group}/acks/" + (f"{plan_id}/" if plan_id else "")

    def group_ack(self, group: str, plan_id: str, step: int, member: str) -> str:
        return f"{self.group_acks(group, plan_id)}{step}/{_q(member)}"

    def leaf(self, key: str) -> str:
        return unquote(key.rsplit("/", 1)[1])
