"""Generation: batched sampling with stop strings, log-probs and hand-over (:mod:`.generate`), the
lean decode loop equal to the model's own ``generate`` (:mod:`.decode`), its one-token step for
Llama-family models (:mod:`.decode_step`) and the shared-prompt prefill both use (:mod:`.prefill`).

Imports run one way: generate -> decode -> decode_step, prefill."""
