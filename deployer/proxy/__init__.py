"""Stable endpoints through a real reverse proxy (nginx); see :mod:`deployer.proxy.nginx`."""

from deployer.proxy.nginx import (
    REVISION_HEADER,
    Backend,
    NginxProxy,
    ProxyError,
    Route,
    find_nginx,
    route_prefix,
)

__all__ = [
    "REVISION_HEADER",
    "Backend",
    "NginxProxy",
    "ProxyError",
    "Route",
    "find_nginx",
    "route_prefix",
]
