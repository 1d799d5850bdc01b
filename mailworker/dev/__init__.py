"""For development: an SMTP server that writes a maildir (:mod:`~mailworker.dev.server`)
and ``mailworker demo`` (:mod:`~mailworker.dev.demo`). Needs ``mailworker[devserver]``."""
