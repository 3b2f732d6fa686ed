"""Shell completion: click's own, with two repairs to its bash and fish scripts.

* bash splits the words it hands over at ``:`` (``COMP_WORDBREAKS``), and every database URL
  holds one: after ``--database-url sqlite:///a.db`` click read ``:`` as the command's name and
  offered nothing. The script also hands over the line itself (``COMP_LINE`` up to
  ``COMP_POINT``), which is split here as the shell would split it. (No value auditctl
  completes holds a ``:``, so bash's splitting of the word being completed never matters.)
* fish split each answer at every comma, cutting the help text ("Recover stuck audits: mark
  them failed, or ...") at its first one; the script now splits once.
"""

from __future__ import annotations

import os

from click.shell_completion import BashComplete, FishComplete, add_completion_class, split_arg_string

_BASH_ENV = 'env COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" COMP_WORDS='


class Bash(BashComplete):
    source_template = BashComplete.source_template.replace("env COMP_WORDS=", _BASH_ENV, 1)

    def get_completion_args(self) -> tuple[list[str], str]:
        line, point = os.environ.get("COMP_LINE"), os.environ.get("COMP_POINT", "")
        if line is None or not point.isdigit():  # an older script: the words as bash split them
            return super().get_completion_args()
        typed = line[:int(point)]
        words = split_arg_string(typed)
        finished = typed[-1:].isspace() and not typed.endswith("\\ ")
        incomplete = "" if finished or not words else words.pop()
        return words[1:], incomplete


class Fish(FishComplete):
    source_template = FishComplete.source_template.replace('string split "," $completion',
                                                           'string split -m 1 "," $completion', 1)


def register() -> None:
    """Make these the classes ``auditctl completion`` prints and ``_AUDITCTL_COMPLETE`` answers with."""
    add_completion_class(Bash, "bash")
    add_completion_class(Fish, "fish")
