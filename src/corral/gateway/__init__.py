"""The JSON-RPC 2.0 gateway: zerotask's broker methods served by a corral broker.

``rpc`` (envelope), ``zerotask`` (codes, statuses, task bodies), ``nodes``
(nodes as workers, no I/O), ``callers`` (which node makes a call, no I/O),
``service`` (the methods), ``link`` (the broker connection), ``http`` and
``server`` (the shells), ``command`` (the CLI).
"""

#: Where the gateway listens by default (zerotask's ports, and the next one for HTTP).
DEFAULT_RPC = "tcp://127.0.0.1:5555"
DEFAULT_PUB = "tcp://127.0.0.1:5556"
DEFAULT_HTTP = "127.0.0.1:5557"
