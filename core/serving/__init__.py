"""The machinery behind ``metareason serve``: a continuous-batching scheduler over a model in
this process (:mod:`.scheduler`, with its KV cache in :mod:`.kv`, per-row sampling in
:mod:`.sampling` and incremental detokenisation in :mod:`.detok`), the server's limits and token
budget (:mod:`.limits`) and the OpenAI request schema and checks (:mod:`.openai_schema`)."""
