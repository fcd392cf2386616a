"""Errors with a one-line message for the operator and an exit code.

Every failure that reaches the CLI is an :class:`XdpnetError` (or a
subclass): its ``str()`` is the one line printed, ``exit_code`` the
process exit status.  Exit codes (documented in the README):

* 1 - runtime failure (the datapath or a peer failed)
* 2 - usage: bad arguments or input (unknown interface, malformed MAC, …)
* 3 - missing privilege (not root / missing capability)
* 4 - a resource is busy (queue already bound, socket path exists, …)
* 5 - a missing system dependency (bcc, kernel headers, libxdp, …)
"""

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_PRIVILEGE = 3
EXIT_BUSY = 4
EXIT_DEPENDENCY = 5


class XdpnetError(Exception):
    """A failure with an operator-facing message."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(XdpnetError):
    """Bad arguments or input from the operator."""

    exit_code = EXIT_USAGE


class PrivilegeError(XdpnetError):
    """The process lacks a privilege it needs."""

    exit_code = EXIT_PRIVILEGE


class BusyError(XdpnetError):
    """A resource the operation needs is already in use."""

    exit_code = EXIT_BUSY


class DependencyError(XdpnetError):
    """A system component (bcc, kernel headers, libxdp) is missing."""

    exit_code = EXIT_DEPENDENCY


class VhostError(XdpnetError):
    """A vhost-user frontend sent something the backend refuses.

    The server replies with an error (when the frontend asked for a
    reply) and, for fatal ones, closes the connection.
    """

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class MemoryTableError(VhostError):
    """A memory table that cannot be mapped or registered as a UMEM."""

    def __init__(self, message: str):
        super().__init__(message, fatal=True)
