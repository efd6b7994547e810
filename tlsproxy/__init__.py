"""
tlsproxy: terminate TLS and relay the plain bytes to one backend.

The names here are the embedding API (see README.rst, "Embedding").
"""

from .backend import BackendTLS
from .context import Certificates, from_files
from .credentials import self_signed
from .record import ConnectionRecord, log_close
from .service import proxy_service
from .values import ConfigError, Limits, ProxyConfig, Timeouts, TLSPolicy

__all__ = [
    "BackendTLS",
    "Certificates",
    "ConfigError",
    "ConnectionRecord",
    "Limits",
    "ProxyConfig",
    "TLSPolicy",
    "Timeouts",
    "from_files",
    "log_close",
    "proxy_service",
    "self_signed",
]
