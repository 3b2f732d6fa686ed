"""``python -m auditctl``."""

from .cli import main

main()
