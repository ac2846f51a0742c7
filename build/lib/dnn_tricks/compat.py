"""Where this project leans on other libraries' private or undocumented behaviour: the one list.

Each entry: where, what, and why the public API does not do. Each library named here has an
upper version bound in pyproject.toml; a new version is let in after the tests pass with it.
Tested ranges: lightning 2.6.0 and 2.6.6 (2.5 lacks ``WeightAveraging``); jsonargparse 4.42
and 4.53 (4.40 returns callable factories as closures, not ``functools.partial``);
albumentations 2.0.8 (pinned). 2.6.0 and 4.42 were checked with the schedule, figure and
library-trick tests; the installed 2.6.6 / 4.53 / 2.0.8 with everything.

Lightning (``lightning>=2.6,<2.7``)

- ``app.py``, ``TrainerCLI._prepare_subcommand_parser`` (override): every subcommand gets
  ``weights_only=True`` by default and accepts ``--test_after_fit``, so a run's saved
  config.yaml is valid for validate / test / predict; LightningCLI has no per-subcommand hook.
- ``app.py``, ``TrainerCLI._instantiate_trainer`` (override): the RNG-state callback and the
  atomic CheckpointIO plugin are always added, whatever the config lists.
- ``app.py``, ``TrainerCLI._parse_ckpt_path`` (override): the config given is the config that
  runs; LightningCLI would replace the model's config by the checkpoint's hyperparameters.
- ``callbacks/lr_monitor.py``, ``LearningRateMonitor._extract_lr`` (override): logs a group's
  rate times its ``lr_scale``; the monitor has no public hook for the value it logs.
- ``cli.py``, ``quiet_lightning_tips``: drops records starting "💡 Tip" from the
  ``lightning.pytorch.utilities.rank_zero`` logger (an advertisement Lightning logs per
  Trainer; no switch turns it off). A renamed logger or message only brings the line back.
- ``loggers.py``, ``TensorBoardLogger._get_next_version`` (override): claims ``version_N``
  with an atomic mkdir, so two runs started together get distinct folders.
- ``models/classifier.py``, ``_fused_training_step``: where no callback listens to the
  per-step hooks, calls ``LightningOptimizer._on_before_step`` / ``_on_after_step`` (the
  manual loop's progress counters, so ``global_step`` advances) around the wrapped
  optimizer's own ``step``; the public ``LightningOptimizer.step`` always dispatches the hooks
  (~0.1 ms a step). Reads ``fit_loop.epoch_loop.total_batch_idx`` to log on Lightning's log
  steps (its own test, ``_LoggerConnector.should_update_logs``, is private).
- ``data/step_groups.py``, ``ModelCheckpoint._every_n_train_steps``: whether a checkpoint
  callback saves by global step (no public attribute holds it).
- ``callbacks/trainer_utils.py``, ``LightningModule._apply_batch_transfer_handler``: moves a
  batch exactly as the loop does (the DataModule's transfer hooks win over the module's).
- ``checkpoints.py``, ``lightning.fabric.utilities.types._PATH``: the path type of
  ``CheckpointIO.save_checkpoint``'s signature, kept identical.
- ``data/augment.py``, the ``PL_SEED_WORKERS`` environment variable that
  ``seed_everything(workers=True)`` sets: a custom ``worker_init_fn`` replaces Lightning's,
  so it calls ``pl_worker_init_function`` itself when that variable asks for it.

jsonargparse (``jsonargparse[signatures]>=4.42,<4.54``)

- ``schedules.py``, ``build_scheduler``: a ``class_path`` value of a callable type is
  instantiated as a ``functools.partial`` binding every init_arg, defaults included (the
  docs say "a partial function is provided"); ``total_steps`` left at None is read there.
  Not the class inside the partial: only its documented ``keywords``.
- ``cli.py``, ``_one_line``: reads jsonargparse's error text (``Parser key "a.b":`` then the
  reason) to print one line naming the key.

albumentations (``albumentations==2.0.8``)

- ``data/augment.py``: ``albumentations.core.serialization``'s ``SERIALIZABLE_REGISTRY``,
  ``register_additional_transforms`` and ``shorten_class_name`` look a serialized
  transform's class up by name, so an unknown name is an error with a close match offered
  (``A.from_dict`` raises a bare KeyError) and misspelt arguments are errors, not warnings.

Optuna: none (the search uses ``study.optimize``, ``MaxTrialsCallback``, the storage's
heartbeat and ``RetryHeartbeatStaleTrialCallback``); no upper bound.

Outside those four, noted for completeness (torch, bounded only from below):
``weight_norm.py`` recognises weight norm by ``torch.nn.utils.parametrizations._WeightNorm``
and the legacy hook in ``module._forward_pre_hooks`` (torch has no public predicate);
``app.py``, ``cpu_has_bf16``, reads ``torch.cpu._is_avx512_bf16_supported`` and
``_is_amx_tile_supported`` (no public probe; a torch without them means no warning);
``models/input_norm.py`` overrides ``nn.Module._load_from_state_dict`` to resize its fitted
buffers before loading.
"""
