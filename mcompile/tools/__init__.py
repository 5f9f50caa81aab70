"""Offline tools, apart from the runtime (the compile backend never imports them): capturing a
model's Q/K/V (``capture``), the texts and needles of the evaluation (``data``, ``needle``), the
models they run on (``models``), the pattern search and allocation that write pattern databases
(``search``, ``allocate``, ``compare``, ``metrics``, ``db_commands``), the accuracy evaluation
(``eval``), plots (``plot``) and the one command line, ``mcompile`` (``cli``, ``options``)."""
