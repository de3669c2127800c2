"""Model and training (imports kernels/ and pipelines/, never the reverse). Where a change belongs:

- the training loop: engine/loop.py's Loop is the one loop of every run (a step, the guard, then jobs before the log
  line, before the save and after it, the save, a stop signal), built from parts that each own their state and
  their "is it time": StepMeter (the sums, the clock, the log record), Guard (health checks, rollback), Checkpointer
  (saves, never in a bad streak), Evaluator (grids, kNN monitor), Validation (fine-tuning's scores and best), and
  StopSignals. engine/trainer.py sets a pretraining run up and its `fit` hands the Loop its jobs; a new periodic
  job is a part there and one Job in that `fit`. A part with resume state has state_dict() / load_state_dict():
  each checkpoint's meta gathers them ("parts").
- a lever (a speed or memory switch): its field and value check in engine/config.py, and one record in
  engine/levers.py (short name, fields, check, application to the model; check_levers, build_parallel_model,
  build_training and the benchmarks' lever sets in benchmarks/levers.py all read that table).
- fine-tuning and linear probing (`mae finetune`, `mae linprobe`): engine/classify.py, the same step (TrainStep with
  the classifier's forward and loss) and the same loop parts (StepMeter, Guard, Checkpointer, StopSignals) with a
  validation each task.eval_every epochs and best.pt; its config is engine/config.py's ClassifyConfig (the
  pretraining sections plus `task`) and its recipes CLASSIFY_PRESETS.
- the command line: engine/cli/ (the parser and command table in __init__.py; options, launch, mae-torchrun, data,
  finetune / linprobe (classify.py), eval and ablate in their own modules); `python -m engine.pretrain` is the torchrun entry.
- what a step computes in one place: engine/step.py (TrainStep; the gradient and parameter norms; autocast from
  engine/device.py).
"""
