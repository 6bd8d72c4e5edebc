"""Built-in behaviour, registered by name like any plugin and ``trylast`` so a user plugin wins.

- ``signals``: the ``chars``, ``modality`` and ``multimodal_keywords`` signals;
- ``empathy``: the bilingual (Spanish/English) ``empathy`` score;
- ``heuristic``: the seed's routing rule (``select_route``);
- ``llama_cpp``: the llama-cpp-python backend;
- ``lru_ttl``: the cache policy, least recently used first, unloaded after a TTL idle.
"""
