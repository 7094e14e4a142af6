"""Checkpoints: a model's weights in a folder (weights.py), checkpoint-N/ and best_model/ in output_dir
(folders.py), writing a checkpoint (save.py) and resuming from one (resume.py). The best model and early
stopping are best.py's, the final model final.py's.

    save_checkpoint(engine, policy_logps, optimizer, scheduler, tokenizer, cfg, step, loop_state, running)
    folder = resume_dir(cfg)                   # before anything loads
    state = load_checkpoint(folder, engine, policy_logps, optimizer, scheduler, cfg, fingerprint)
"""

from preftune.checkpoints.folders import (RESUME_FILES, best_dir, check_output_dir, checkpoint_folders,
                                          latest_checkpoint, missing, saving)
from preftune.checkpoints.resume import (CHANGED_RUN_KEYS, DATA_KEYS, DATA_ORDER_KEYS, FREE_ON_RESUME,
                                         check_same_data, check_same_run, load_checkpoint, resume_dir)
from preftune.checkpoints.save import save_checkpoint, save_now
from preftune.checkpoints.weights import load_weights_into, read_weights, save_model, save_weights

__all__ = ["RESUME_FILES", "best_dir", "check_output_dir", "checkpoint_folders", "latest_checkpoint", "missing",
           "saving", "CHANGED_RUN_KEYS", "DATA_KEYS", "DATA_ORDER_KEYS", "FREE_ON_RESUME", "check_same_data",
           "check_same_run", "load_checkpoint", "resume_dir", "save_checkpoint", "save_now", "load_weights_into",
           "read_weights", "save_model", "save_weights"]
