"""tlsproxy: terminate TLS, relay to one backend; the embedding API (docs/)."""

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
