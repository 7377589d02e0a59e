"""Where the time of one SEA step goes: now the ``steps`` part of ``sea bench`` (app/bench/steps.py).

    .venv/bin/python benchmarks/step_time.py [--chains 4] [--max-tokens 24] [--repeats 3] [--threads 2] [--out step_time.json]

is ``sea bench --parts steps`` with the same flags (see ``sea bench --help``).
"""

from __future__ import annotations

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--parts", "steps", *sys.argv[1:]]))
