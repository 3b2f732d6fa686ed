"""The raw side of the whole-process measure: ``scan --format json`` written by hand.

    python rawscan.py URL MODULES

First imports every module ``auditctl scan`` imports (the list in MODULES, written by
``imports.py capture``) except auditctl's own, so both processes pay the same import bill.
Then runs the lean stuck query with the columns the JSON needs and prints the same records
as ``auditctl scan --format json`` (same keys, same order, same framing), streamed.
"""

from __future__ import annotations

import sys


def main() -> int:
    url, modules = sys.argv[1], sys.argv[2]
    from imports import load

    load(modules, without=("auditctl",))
    import json

    import raw

    postgres = raw.is_postgres(url)
    connection = raw.connect(url)
    out = sys.stdout
    count = 0
    out.write("[")
    for row in raw.scan_rows(connection, url):
        out.write(",\n  " if count else "\n  ")
        out.write(json.dumps(raw.scan_record(row, postgres), ensure_ascii=False))
        count += 1
    out.write("\n]\n" if count else "]\n")
    out.flush()
    connection.close()
    print(f"{count} stuck audits", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
