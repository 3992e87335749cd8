"""Machinery for kvmw's tests, benches and setup - not used when serving.

Child processes the tests and ``kvmw bench`` drive, with fault injection:
`vllm_engine` (an offline vLLM engine answering JSON commands: corrupt a stored
chunk, empty a tier, kill or stall a Redis), `vllm_server` (vLLM's OpenAI server
with or without kvmw) and `redis_process` (find or start a loopback
``redis-server``; ``make redis`` runs its ``ensure``, which may ``apt-get install``
it when running as root). Nothing under ``kvmw.integrations`` or
``kvmw.storage_tiers`` imports this package.
"""
