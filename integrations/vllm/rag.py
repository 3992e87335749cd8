"""`rag_request`: a RAG prompt and the ``kv_transfer_params`` that make kvmw blend it in vLLM.

The prompt is built the way `KVMW.generate_rag` builds it (the preamble with the
tokenizer's special tokens, each document and the question without), so the
documents' token ids appear in it verbatim and their keys are the HF hook's:
a document stored by either engine is a hit for the other.

Offline::

    req = rag_request(tokenizer, documents, question, preamble="Answer from these:\\n")
    llm.generate(req.prompt(), req.sampling_params(max_tokens=32, temperature=0))

Served (``/v1/completions`` takes token ids and ``kv_transfer_params``)::

    client.completions.create(model=..., prompt=req.prompt_token_ids, max_tokens=32,
                              extra_body={"kv_transfer_params": req.kv_transfer_params})

Documents may also be given as texts in ``kv_transfer_params`` (the connector
tokenizes them and finds them in the prompt), which suits chat templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from kvmw.integrations.vllm.blend_plan import PARAMS_KEY


@dataclass
class RAGRequest:
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any]
    #: each document's (start, end) in the prompt
    spans: list[tuple[int, int]]

    def prompt(self) -> dict[str, Any]:
        """vLLM's prompt dict (``LLM.generate``'s first argument)."""
        return {"prompt_token_ids": list(self.prompt_token_ids)}

    def sampling_params(self, **kwargs: Any) -> Any:
        """`vllm.SamplingParams(**kwargs)` carrying the blend request."""
        from vllm import SamplingParams

        extra = dict(kwargs.pop("extra_args", None) or {})
        extra["kv_transfer_params"] = self.kv_transfer_params
        return SamplingParams(extra_args=extra, **kwargs)


def _ids(tokenizer: Any, part: Any, special: bool = False) -> list[int]:
    if isinstance(part, str):
        if tokenizer is None:
            raise ValueError("text needs a tokenizer")
        return list(tokenizer(part, add_special_tokens=special).input_ids)
    ids = [int(t) for t in part]
    if not ids:
        raise ValueError("empty document or question")
    return ids


def rag_request(tokenizer: Any, documents: Sequence[Any], question: Any, preamble: Any = None,
                strategy: str = "query_aware", recompute_ratio: float = 0.15,
                document_context: str = "stand_in", stand_in: Any = None) -> RAGRequest:
    """`preamble + documents + question` as token ids, and the kvmw blend request. Parts are
    texts (tokenized with `tokenizer`) or token-id lists; see `KVMW.generate_rag` for the
    strategies, `document_context` and `stand_in` (text or ids; None: kvmw's)."""
    ids: list[int] = [] if preamble is None else _ids(tokenizer, preamble, special=True)
    docs, spans = [], []
    for doc in documents:
        d = _ids(tokenizer, doc)
        spans.append((len(ids), len(ids) + len(d)))
        docs.append(d)
        ids += d
    ids += _ids(tokenizer, question)
    params = {PARAMS_KEY: {"documents": docs, "strategy": strategy, "recompute_ratio": recompute_ratio,
                           "document_context": document_context}}
    if stand_in is not None:
        params[PARAMS_KEY]["stand_in"] = _ids(tokenizer, stand_in)
    return RAGRequest(ids, params, spans)
