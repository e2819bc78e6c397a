"""Benchmarks (``smd bench rollout|attention|sync|all``). Every figure is a ratio against a baseline
measured in the same run, or carries that baseline next to it. None of this is a timed test: the
test suite only checks that they run.

* :mod:`.rollout`: peak KV bytes and tokens/s of the reference engine per eviction policy vs ``none``;
* :mod:`.attention`: shadow-masked attention forward + backward vs plain causal SDPA, per backend;
* :mod:`.sync`: a weight sync per transport against its own floor and a plain copy;
* :mod:`.all`: all of them in one run, with the mask-bytes figures, as one flat list of figures.

Import each from its module (this package's ``__init__`` loads none of them: the attention and sync
benchmarks bring Megatron-Core with them).
"""
