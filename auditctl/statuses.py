"""The four states of an audit (pure Python, so the command line can name them without the database layer)."""

PENDING, RUNNING, COMPLETED, FAILED = "pending", "running", "completed", "failed"
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED)
