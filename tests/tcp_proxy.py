"""The TCP proxy of the partition tests lives in the package (the fleet demo cuts one too)."""

from sentinel.demo.tcp_proxy import TcpProxy

__all__ = ["TcpProxy"]
