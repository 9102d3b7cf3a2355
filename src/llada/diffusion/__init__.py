"""The paper's math as functions of a model: the forward (masking) process and its losses, the
reference reverse-process sampler, the Monte-Carlo likelihood bound, and the autoregressive baseline's
sampler. Slow and exact: the engine (``llada.engine``) is the fast path and is tested against these."""
