"""What runs in a gateway process: the composition root (resources.py), one process serving
(serve.py) or a supervisor of forked workers (supervisor.py), what they share (shared.py), the
usage journal and sink (journal.py, sink.py), journals replayed at start (replay.py), the
settler process (settler_proc.py) and the demo (demo.py)."""


class ServeError(Exception):
    """The server cannot start or stopped in failure; the message is one line for the user."""
