"""
tlsproxy: terminate TLS and relay the plain bytes to one backend.

The names here are the embedding API (see README.rst, "Embedding").
"""

from .backend import BackendTLS
from .record import ConnectionRecord, log_close
from .relay import Timeouts
from .service import Limits, ProxyConfig, proxy_service
from .tls import ConfigError, load_server_context, self_signed

__all__ = [
    "BackendTLS",
    "ConfigError",
    "ConnectionRecord",
    "Limits",
    "ProxyConfig",
    "Timeouts",
    "load_server_context",
    "log_close",
    "proxy_service",
    "self_signed",
]
