"""The twistd plugin: "twistd tlsproxy --help" lists the options."""

from twisted.application.service import ServiceMaker

tlsproxy = ServiceMaker(
    "tlsproxy",
    "tlsproxy.tap",
    "Terminate TLS and forward the plain bytes to one backend.",
    "tlsproxy",
)
