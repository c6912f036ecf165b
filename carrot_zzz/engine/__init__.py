"""The engine behind train.py, validate.py and inference.py, one phase per module:

    settings     check_training_settings, check_experiment_folder: what can be refused before anything is built
    process      start_process / join_processes (devices, torchrun, precision, seeds), one_error_line, place_model,
                 loss_scaler, experiment_name
    models       create_training_model: `--model X` (+ head / CARROT settings -> `X_zzz`), initial checkpoint
    data         build_training_data: data sets, loaders, mixup / cutmix, P x K batches
    task         training_loss, build_task (CARROT or timm's classification task), compile_and_distribute
    optim        resolve_learning_rate, build_optimizer (head lr / weight decay groups), build_scheduler
    experiment   open_experiment (folder, lock, args.yaml), SummaryLog (summary.csv)
    validation   validate.py's process (start_validation, torchrun too), model from a checkpoint, loaders, results
    checkpoints  CheckpointKeeper: last / checkpoint-N / model_best / milestones / recovery, kill-consistent
    head_init    init_head_from_data: --head-init data, the closed-form start from one feature pass
    loop         Trainer.train_epoch: one epoch of steps, logging, divergence check
    preemption   StopSignals: SIGTERM / SIGINT stop training at the next update with a recovery checkpoint
    fit          resume_path, load_resume, attach_ema, continue_run, fit (the epochs), export_best_weights
    calibration  the temperature after training (and validate.py --fit-temperature), the "unknown" threshold
    evaluate     predict: the one evaluation loop (train.py, validate.py, inference.py), DDP shards in order
    inference    inference.py's rows: top-k labels, "unknown", unreadable images, ONNX logits

Every function takes the run's configuration `cfg` (train.py's parsed flags) and raises SettingError, named by the
setting, for what the user can fix.
"""
