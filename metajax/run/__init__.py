"""The experiment runner: configs, task families, the train loop, checkpoints, the CLI.

Nothing outside this package imports it: ``import metajax`` gives the primitives alone.

| module | holds |
|---|---|
| ``config`` | the config schema (a leaf module), ``--set`` parsing, JSON round trips |
| ``config_files`` | finding config files by name (``metajax/configs/``, a user's own) |
| ``families/`` | one module per task family, found by name |
| ``setup`` | the family contract: ``Family``, ``Setup`` (for training), ``Evaluator`` |
| ``build`` | config -> experiment: the algorithm table, the outer optimizer |
| ``loop`` | the train loop, resuming |
| ``workdir`` | a workdir's config record |
| ``logs`` | metrics window, ``metrics.jsonl``, progress |
| ``checkpoint`` | orbax checkpoints carrying their config, ``restore_checkpoint`` |
| ``evaluate`` | held-out evaluation, ``eval.json``, ``evaluate_workdir`` |
| ``plots`` | learning curves and family figures |
| ``predict`` | ``load(workdir).adapt_and_predict(...)`` |
| ``cli`` | ``metajax train / eval / show / list`` |
"""
