"""The auth service: local roles for the control socket and the CoAP command door.

`[auth]` maps users and groups (as the kernel names the caller with SO_PEERCRED) and CoAP
identities (a DTLS-PSK or OSCORE peer) to a role: `viewer` (read verbs), `operator`
(commands, sagas, adopting/forgetting devices, outbox retry, acknowledging alerts) or `admin`
(reload, db verbs, requeue, prune). Root and the daemon's own user are admin. A refusal
names the role needed and is recorded as an `auth.denied` event (who, verb). Without an
`[auth]` table the control socket keeps its plain rule (state-changing verbs for root, the
daemon's user and `[control] group`).
"""

from __future__ import annotations

import enum
import grp
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from gateway import events as ev
from gateway.config import GatewayConfig, Section
from gateway.control import ControlServer, Peer
from gateway.service import Health, Service, ServiceContext

AUTH_DENIED: Final = "auth.denied"  # data: {"verb", "role", "needs", "uid", "gid", "pid"}


class Role(enum.IntEnum):
    NONE = 0
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


ROLE_NAMES: Final = ("none", "viewer", "operator", "admin")

#: Verbs that need admin; other state-changing verbs need operator, read verbs viewer.
ADMIN_VERBS: Final = frozenset({"reload", "db.rebuild", "db.prune", "outbox.requeue"})


def role_named(name: str) -> Role:
    return Role[name.upper()]


@dataclass(frozen=True, slots=True)
class AuthConfig:
    default: str = "viewer"
    users: Mapping[str, str] = field(default_factory=dict)
    groups: Mapping[str, str] = field(default_factory=dict)
    coap: Mapping[str, str] = field(default_factory=dict)


def parse(sec: Section) -> AuthConfig:
    default = sec.str("default", "viewer", choices=ROLE_NAMES)
    tables: dict[str, dict[str, str]] = {}
    for key in ("users", "groups", "coap"):
        t = sec.table(key)
        out: dict[str, str] = {}
        for name in list(t.data):
            role = t.str(name, choices=ROLE_NAMES)
            if isinstance(role, str):
                out[name] = role
        t.done()
        tables[key] = out
    sec.done()
    return AuthConfig(default=default, users=tables["users"], groups=tables["groups"],
                      coap=tables["coap"])  # fmt: skip


def needs(verb: str, mutating: bool) -> Role:
    if verb in ADMIN_VERBS:
        return Role.ADMIN
    return Role.OPERATOR if mutating else Role.VIEWER


class Policy:
    """Who has which role. Names are resolved per request (users and groups may be added
    while the daemon runs)."""

    def __init__(self, conf: AuthConfig) -> None:
        self.conf = conf

    def role_of(self, peer: Peer) -> Role:
        if peer.uid in (0, os.geteuid()):
            return Role.ADMIN
        best = role_named(self.conf.default)
        try:
            user = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            user = None
        if user is not None and user in self.conf.users:
            return role_named(self.conf.users[user])  # a user's own entry wins
        for group, role in self.conf.groups.items():
            try:
                g = grp.getgrnam(group)
            except KeyError:
                continue
            if peer.gid == g.gr_gid or g.gr_gid in peer.groups or (user in g.gr_mem):
                best = max(best, role_named(role))
        return best

    def coap_role(self, identity: str | None) -> Role:
        if identity is None:
            return Role.NONE
        return role_named(self.conf.coap.get(identity, "none"))

    def check(self, verb: str, mutating: bool, peer: Peer | None) -> str | None:
        """None if `peer` may run `verb`, else the refusal's message."""
        need = needs(verb, mutating)
        have = Role.NONE if peer is None else self.role_of(peer)
        if have >= need:
            return None
        who = "an unknown peer" if peer is None else f"uid {peer.uid} (pid {peer.pid})"
        return (f"{verb}: permission denied: it needs role {need.label}; you are {who} with "
                f"role {have.label} (see [auth])")  # fmt: skip


def apply_policy(control: ControlServer, config: GatewayConfig) -> Policy | None:
    """Roles from `[auth]` on the control socket (None: its plain group rule)."""
    conf = config.sections.get("auth")
    policy = Policy(conf) if isinstance(conf, AuthConfig) else None
    control.policy = policy
    return policy


class AuthService(Service):
    name: ClassVar[str] = "auth"

    def __init__(self) -> None:
        self.denied = 0
        self.policy: Policy | None = None

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._apply(ctx.config)
        ctx.control.on_denied = self._denied

    def before_serving(self, control: ControlServer, config: GatewayConfig) -> None:
        apply_policy(control, config)

    async def stop(self) -> None:
        self.ctx.control.on_denied = None
        self.ctx.control.policy = None

    async def reload(self, config: GatewayConfig) -> None:
        self._apply(config)

    def _apply(self, config: GatewayConfig) -> None:
        self.policy = apply_policy(self.ctx.control, config)

    def health(self) -> Health:
        mode = "roles from [auth]" if self.policy is not None else "socket group only"
        return Health.ok(mode, denied=self.denied)

    async def coap_denied(self, identity: str, message: str) -> None:
        """An authenticated CoAP peer without the role a resource needs."""
        self.denied += 1
        role = self.policy.coap_role(identity).label if self.policy is not None else "none"
        data = {"verb": "coap.command", "identity": identity, "role": role, "needs": "operator",
                "error": message}  # fmt: skip
        await self.ctx.store.append(ev.OPERATOR_STREAM, AUTH_DENIED, data)

    async def _denied(self, verb: str, peer: Peer | None, message: str) -> None:
        self.denied += 1
        data: dict[str, Any] = {"verb": verb, "error": message}
        if peer is not None:
            data.update(peer.as_dict())
            if self.policy is not None:
                data["role"] = self.policy.role_of(peer).label
        if self.policy is not None:
            data["needs"] = needs(verb, self.ctx.control.mutating(verb)).label
        await self.ctx.store.append(ev.OPERATOR_STREAM, AUTH_DENIED, data)
