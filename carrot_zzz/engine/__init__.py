"""The engine behind train.py, validate.py and inference.py, one phase per module, grouped by who uses it:

shared by the three scripts
    errors       SettingError (named by the setting), TrainingDiverged, CheckpointWriteError
    precision    Precision: device, parameter dtype, autocast dtype
    process      join_processes (devices, torchrun, precision, seeds; train.py and validate.py), one_error_line,
                 place_model, loss_scaler, experiment_name
    data         datasets and loaders: build_training_data (train.py), evaluation_loader (every script)
    evaluate     predict: the one evaluation loop (DDP shards gathered in dataset order)
    calibration  the temperature (train.py --calibrate, validate.py --fit-temperature) and the "unknown" threshold

train.py only
    settings     check_training_settings, check_experiment_folder: what can be refused before anything is built
    models       create_training_model: `--model X` (+ head / CARROT settings -> `X_zzz`), initial checkpoint
    task         training_loss, build_task (CARROT or timm's classification task), compile_and_distribute
    optim        resolve_learning_rate, build_optimizer (head lr / weight decay groups), build_scheduler
    experiment   open_experiment (folder, lock, args.yaml), SummaryLog (summary.csv)
    checkpoints  CheckpointKeeper: last / checkpoint-N / model_best / milestones / recovery, kill-consistent
    head_init    init_head_from_data: --head-init data, the closed-form start from one feature pass
    means        running means on the device (no host sync between log lines)
    loop         Trainer.train_epoch: one epoch of steps, logging, divergence check
    preemption   StopSignals: SIGTERM / SIGINT stop training at the next update with a recovery checkpoint
    fit          resume_path, load_resume, attach_ema, continue_run, fit (the epochs), export_best_weights

validate.py and inference.py
    validation   start_validation (torchrun too), the model a checkpoint holds, the split's loader, the results
    inference    inference.py's rows: top-k labels, "unknown", unreadable images, ONNX logits

Every function takes the run's configuration `cfg` (train.py's parsed flags) and raises SettingError, named by the
setting, for what the user can fix.
"""
