"""What both examples need: an engine to talk to, and checks printed one per line."""

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from bench.common import resolve_model_folder, running_engine


@contextlib.contextmanager
def engine_addresses(given: Sequence[str], num_frontends: int, model: str | None) -> Iterator[list[str]]:
    """The given frontend addresses, or those of an engine started here (and always stopped)."""
    if given:
        if len(given) != num_frontends:
            raise ValueError(f"give {num_frontends} --address options, got {len(given)}")
        yield list(given)
        return
    with running_engine(resolve_model_folder(model), [], num_frontends) as addresses:
        yield addresses


@dataclass
class Checks:
    """Each check prints PASS or FAIL and what it checked; any failure makes the exit code 1."""

    failures: int = 0

    def check(self, ok: bool, what: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}: {what}", flush=True)
        if not ok:
            self.failures += 1

    def exit_code(self) -> int:
        return 1 if self.failures else 0

