"""Every exception auditctl raises on purpose.

The CLI maps each of these to one line on stderr and an exit code; the library
raises them and never prints. Messages never contain a database password.
"""


class AuditctlError(Exception):
    """Base class: an error meant for a human, with a message that says what to do."""


class ConfigError(AuditctlError, ValueError):
    """A setting is invalid: a bad duration, a threshold that contradicts another."""


class NamedSettingError(ConfigError):
    """A refusal that names the caller's own settings (``worker``, ``since``): each front end shows them
    as its user gave them. The library's message, ``str(error)``, says the keyword a program passes
    (the dashboard's query parameters are the same words); the command line says the flag typed
    (``--worker``), through ``naming``."""

    def __init__(self, template: str, *names: str):
        #: The message with each name written ``{name}``; ``names`` are the keywords it holds.
        self.template, self.names = template, names
        super().__init__(self.naming(lambda name: name))

    def naming(self, spell) -> str:
        """The message with each setting named by ``spell(keyword)``."""
        text = self.template
        for name in self.names:
            text = text.replace("{" + name + "}", spell(name))
        return text


class DatabaseUnavailable(AuditctlError):
    """The database cannot be reached or answered with an error (URL shown masked)."""


class DatabaseRefused(DatabaseUnavailable):
    """The database answered but refused a statement (a value it cannot store, a constraint): not an outage."""


class WriteRefused(DatabaseRefused):
    """The database will not let auditctl write at all (its role lacks the privilege, a read-only
    transaction or standby, a SQLite file opened read-only): not one row's fault, so a change made
    in batches stops at once instead of trying each audit alone, and a monitor stops watching."""


class TextNotUtf8(DatabaseRefused):
    """A row holds text that is not UTF-8: SQLite keeps whatever bytes another tool gave it.

    The engine reads text with replacement characters from then on, so the same read, tried
    again, succeeds; the readers that page through many rows do that by themselves.
    """


class ConnectionSettingRefused(ConfigError, DatabaseUnavailable):
    """libpq refused a value of the database URL's options (``keepalives=abc``) on connecting: it
    will on every connection, so it is a usage error (a ``ConfigError``: exit 2, and a monitor stops
    instead of retrying), and for callers that only ask whether the database could be used, a
    ``DatabaseUnavailable`` (the dashboard shows it as the database it cannot read)."""


class DatabaseMissing(DatabaseUnavailable):
    """A read-only command was pointed at a SQLite file that does not exist (it is never created)."""


class SchemaMissing(AuditctlError):
    """The database exists but holds no auditctl schema, or an older one."""


class NotOurDatabase(SchemaMissing):
    """The database holds tables named like auditctl's that auditctl did not create."""


class SchemaTooNew(SchemaMissing):
    """The database was migrated by a newer auditctl than this one."""


class RevisionUnclear(SchemaMissing):
    """The database's record of its schema revision is not one revision (``alembic_version`` holds
    several rows, or none beside auditctl's tables): no migration can be chosen, and no change is safe."""


class NotADatabase(NotOurDatabase, DatabaseRefused):
    """SQLite's SQLITE_NOTADB: the file at the path is no database. Not an outage to retry (a
    ``SchemaMissing``), and for a worker's callers still a ``DatabaseUnavailable``."""


class AuditNotFound(AuditctlError, LookupError):
    """No audit with that id."""


class AuditNotClaimable(AuditctlError):
    """An audit was asked to run but is not pending (already running, finished or failed)."""


class LeaseLost(AuditctlError):
    """This worker's claim on an audit is gone: the audit was recovered or reset meanwhile.

    The write that raised it changed nothing. The worker must stop working on the audit.
    """

    #: When the ``lease_lost`` event could not be recorded as the write was refused: a call that
    #: records it later (the guard makes it from its heartbeat thread and at ``close()``).
    unrecorded = None

    def __init__(self, audit_id: int, message: str | None = None):
        self.audit_id = audit_id
        super().__init__(
            message
            or f"lease lost on audit {audit_id}: it was recovered or reset while this worker held it; "
            "the write was rejected and changed nothing"
        )


class RunEnded(LeaseLost):
    """A report sent after its run ended (another thread still reporting as the block exits): a
    ``LeaseLost``, since nothing may be written, but nobody took the audit: no "lease lost"
    warning is logged and no event is recorded in its history."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, which the CLI turns into one) stopped a change made in batches: the
    batches that completed hold ``done`` audits, changed as ``verb`` says; the rest are untouched.

    A ``KeyboardInterrupt``, so whatever stops on one stops on this."""

    def __init__(self, done: int, verb: str):
        self.done, self.verb = done, verb
        super().__init__(f"interrupted after {done} audits were {verb}")
