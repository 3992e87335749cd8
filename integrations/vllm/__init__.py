"""kvmw's vLLM integration: the `KVMWConnector` KV connector (prefix reuse, and RAG
blending for requests that carry their documents: `rag_request`).

``pip install kvmw[vllm]`` registers it through vLLM's ``vllm.general_plugins``
entry point (`register`), so ``--kv-transfer-config
'{"kv_connector":"KVMWConnector","kv_role":"kv_both"}'`` is all it takes. Without
the plugin, add ``"kv_connector_module_path":"kvmw.integrations.vllm"``.
Importing this package does not import vLLM; `KVMWConnector` does.
"""

from __future__ import annotations

from typing import Any

CONNECTOR_NAME = "KVMWConnector"
CONNECTOR_MODULE = "kvmw.integrations.vllm.connector"


def kv_transfer_config(**kvmw: Any) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` that switches kvmw on, with `KVMWConfig` overrides:
    ``LLM(model, kv_transfer_config=KVTransferConfig(**kv_transfer_config(codec="int8")))``,
    or ``json.dumps`` of it for ``--kv-transfer-config``."""
    cfg: dict[str, Any] = {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both"}
    if kvmw:
        cfg["kv_connector_extra_config"] = {"kvmw": kvmw}
    return cfg


def register() -> None:
    """vLLM plugin entry point: make ``kv_connector="KVMWConnector"`` resolvable.
    vLLM loads plugins in every process, possibly more than once: idempotent."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:  # vLLM not installed: nothing to register with
        return
    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)


def __getattr__(name: str) -> Any:
    if name in ("rag_request", "RAGRequest"):
        from kvmw.integrations.vllm import rag

        return getattr(rag, name)
    if name in ("KVMWConnector", "KVMWConnectorMetadata", "KVMWWorkerMetadata"):
        from kvmw.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(name)


__all__ = ["CONNECTOR_NAME", "kv_transfer_config", "register", "KVMWConnector", "rag_request", "RAGRequest"]
