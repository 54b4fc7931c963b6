"""Patch 4, logging (inside PPOTrainer): `RunLogger` is OpenRLHF's TensorboardLogger plus
RUN_DIR/metrics.jsonl, eval_metrics.jsonl and a progress line per step.
"""
import json
import os
import time

import torch

from openrlhf_patch.config import active


def _scalar_items(status):
    for key, value in status.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, float(value)


def progress_line(step, metrics) -> str:
    def get(*keys):
        for k in keys:
            if k in metrics:
                return metrics[k]
        return float("nan")

    return (
        f"[ngrpo] step {step}: reward {get('rollout/reward_mean', 'reward'):.4f} "
        f"accuracy {get('ngrpo/accuracy'):.4f} all-wrong groups {get('ngrpo/frac_all_wrong'):.3f} "
        f"policy_loss {get('policy_loss'):.4f} ({get('timing/step_total'):.1f}s)"
    )


def _append_jsonl(run_dir, name, step, metrics) -> None:
    with open(os.path.join(run_dir, name), "a") as f:
        f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")


def make_run_logger_class(upstream_cls):
    """OpenRLHF's TensorboardLogger, also writing RUN_DIR/metrics.jsonl and a progress line. The
    trainer hands its W&B logger (--wandb) the same step metrics, ngrpo's diagnostics included."""
    class RunLogger(upstream_cls):
        def __init__(self, args):
            super().__init__(args)
            self.run_dir = active().run_dir
            self.args = args  # the trainer's own arguments object

        def log_train(self, global_step, logs_dict):
            max_steps = active().max_steps
            if max_steps is not None and global_step >= max_steps:
                # The trainer checkpoints right after it logs a step: the last step of a --max-steps
                # run always checkpoints, so that it can continue. wrap_generate_samples sets this
                # where the sample generator shares the trainer's arguments; OpenRLHF's async
                # trainer (--train.async_enable) has its generator in an actor of its own.
                self.args.ckpt.save_steps = 1
            super().log_train(global_step, logs_dict)
            metrics = dict(_scalar_items(logs_dict))
            if self.run_dir:
                _append_jsonl(self.run_dir, "metrics.jsonl", global_step, metrics)
            print(progress_line(global_step, metrics), flush=True)

        def log_eval(self, global_step, logs_dict):
            super().log_eval(global_step, logs_dict)
            if self.run_dir:
                _append_jsonl(self.run_dir, "eval_metrics.jsonl", global_step, dict(_scalar_items(logs_dict)))

    return RunLogger
