"""
tlsproxy: terminate TLS and relay the plain bytes to one backend.

The names here are the embedding API (see README.rst, "Embedding").
"""

from .backend import BackendTLS
from .record import ConnectionRecord, log_close
from .relay import Timeouts
from .service import Limits, ProxyConfig, proxy_service
from .tls import Certificates, ConfigError, TLSPolicy, from_files, self_signed

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
