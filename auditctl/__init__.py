"""auditctl: detect, recover and reset stuck security audits.

Public API: ``StuckAuditPrevention`` (the worker-side guard), ``LeaseLost`` and
``__version__``. They are loaded lazily so that ``auditctl --help`` does not import
SQLAlchemy.
"""

__version__ = "0.1.0"
__all__ = ["StuckAuditPrevention", "LeaseLost", "__version__"]


def __getattr__(name):
    if name == "StuckAuditPrevention":
        from .worker import StuckAuditPrevention

        return StuckAuditPrevention
    if name == "LeaseLost":
        from .errors import LeaseLost

        return LeaseLost
    raise AttributeError(f"module 'auditctl' has no attribute {name!r}")
