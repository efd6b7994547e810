"""
The floor: the least a TLS terminator on Twisted and pyOpenSSL does, which is
the "twisted" column of bench/compare.py.  tlsproxy's figures can be read
against it: what the stack costs, and what tlsproxy's own work adds.

    python bench/forwarder.py PORT BACKEND_PORT CERT KEY

TLS from clients on 127.0.0.1:PORT; for each client a plain TCP connection to
127.0.0.1:BACKEND_PORT, made at once; bytes relayed both ways, with flow
control; either end's close closes the other.  Session tickets on, as in
tlsproxy.  Nothing else: no log line, limit, timeout, SNI, ALPN or PROXY
header, and no half-close.
"""

from __future__ import annotations

import sys

from OpenSSL import SSL
from twisted.internet import protocol, reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

HOST = "127.0.0.1"


class Client(protocol.Protocol):
    """The client's end; holds what it sends until the backend is there."""

    def connectionMade(self) -> None:
        self.backend: protocol.Protocol | None = None
        self.pending: list[bytes] = []
        self.gone = False
        reactor.connectTCP(HOST, self.factory.backend_port, Connector(self))

    def dataReceived(self, data: bytes) -> None:
        if self.backend is None:
            self.pending.append(data)
        else:
            self.backend.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.gone = True
        if self.backend is not None:
            self.backend.transport.loseConnection()


class Backend(protocol.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connectionMade(self) -> None:
        if self.client.gone:  # the client left while we connected
            self.transport.loseConnection()
            return
        self.client.backend = self
        self.transport.registerProducer(self.client.transport, True)
        self.client.transport.registerProducer(self.transport, True)
        self.transport.writeSequence(self.client.pending)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        # Twisted's TLS sends close_notify only once no producer is registered.
        self.client.transport.unregisterProducer()
        self.client.transport.loseConnection()


class Connector(protocol.ClientFactory):
    noisy = False

    def __init__(self, client: Client) -> None:
        self.client = client

    def buildProtocol(self, addr: object) -> Backend:
        return Backend(self.client)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.client.transport.loseConnection()


@implementer(IOpenSSLServerConnectionCreator)
class Server:
    def __init__(self, cert: str, key: str) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.use_certificate_chain_file(cert)
        self.context.use_privatekey_file(key)
        self.context.set_mode(SSL.MODE_RELEASE_BUFFERS)

    def serverConnectionForTLS(self, tls_protocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def main() -> None:
    port, backend_port, cert, key = sys.argv[1:]
    clients = protocol.Factory.forProtocol(Client)
    clients.backend_port = int(backend_port)
    tls = TLSMemoryBIOFactory(Server(cert, key), False, clients)
    reactor.listenTCP(int(port), tls, backlog=1024, interface=HOST)
    reactor.run()


if __name__ == "__main__":
    main()
