"""The benchmark suite: ``python -m loadtest.suite``. One run, one machine, the same weights throughout.

Four parts (``--parts``, all by default), each started on its own so one failing part does not stop the others:

1. ``overhead``: the server against the offline engine at one concurrency C (default 8). Offline is
   ``LLM(max_num_seqs=C).generate`` of all N prompts at once (the scheduler keeps at most C in flight); the
   server is ``trimode serve`` under :func:`loadtest.run_benchmark` with ``max_concurrency=C``. Same prompts
   (token for token), ``ignore_eos`` so every request makes exactly ``--output-len`` tokens, greedy. Figure:
   server output tok/s / offline output tok/s (target >= 0.9). Offline and server runs alternate
   (``--overhead-repeats``) and the best of each is compared, which damps other load on a shared machine.
2. ``modes``: ar, diffusion and self_spec on the built-in model (or ``--model``) at concurrency 1, 2, 4, 8, 16:
   output tok/s, TTFT, TPOT, tokens per forward (from the server's ``/metrics``), plotted to ``modes.png``;
   the crossover is the first concurrency where ar's output tok/s >= self_spec's. ``--mode-rounds`` rounds, each
   running every level with the three modes back to back; a cell is its median round. Every level sends the same
   prompts.
2b. ``mixed`` (loadtest/suite/mixed.py): a 1:1:1 mix of the three modes at concurrency 3, 6 and 12 against each mode
   alone at a third of it, on the same server and prompts: output tok/s, TPOT per mode, weight passes (engine
   forwards) per generated token, greedy texts compared; and the same mix's engine forwards counted offline.
3. ``transformers``: SmolLM2-135M-Instruct in ar mode, trimode's server against
   ``transformers serve --continuous-batching`` (``--dtype``, fp32 by default, CPU, same local weights, prompts and
   concurrency levels).
   When that server cannot be started or serves nothing, the error text is recorded and transformers'
   batched offline ``generate`` is measured instead, labelled as such.

Every server is a subprocess on a free 127.0.0.1 port, stopped in ``finally`` (SIGTERM, then SIGKILL). Torch
threads: ``--threads`` (default 1) for the offline engine in this process and, through ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS``, for both servers, so both sides of every comparison use the same number of cores. CPU
placement: ``--engine-cpus`` (default auto) is passed to the trimode servers (``[server] engine_cpus``); the load
generator then runs on the HTTP CPUs and part 1's offline engine on the engine's CPUs.

Output (``--out-dir``, default ``bench-results/``): ``suite.json`` (every figure and every raw load-generator
result), ``modes.png``, ``summary.md`` (tables), ``prompts-*.jsonl`` and ``logs/`` (server logs).

Layout: ``settings`` (flags and defaults), ``machine`` (machine description, load sampling, /proc CPU seconds, CPU
placement), ``servers`` (server subprocesses), ``prompts``, ``measure`` (one load-generator run and its figures),
``overhead``, ``modes``, ``mixed`` and ``vs_transformers`` (the parts), ``report`` (summary.md, modes.png, suite.json)
and ``run`` (the run itself; ``__main__`` calls it).
"""
