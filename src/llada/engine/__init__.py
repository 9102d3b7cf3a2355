"""Fast batched generation: settings, commit policies, the runtime (cache pool and CUDA graphs), the
forward passes per cache mode, a batch of rows decoding at their own pace, the ``Engine`` facade and
a scheduler that lets requests join and leave between steps (used by the server)."""
