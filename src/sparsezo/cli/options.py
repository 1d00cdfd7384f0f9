"""The option groups several commands share (model, task, mask, ZO), and the help formatter.

Each ``add_*_args`` helper adds into ``p``, a parser or one of its argument groups (:data:`Options`), so a
command with many options (``train``: 45) can file them under headings in its --help (model, data, mask,
optimisation, output, advanced) while others keep one flat list; where a helper's options belong under
two headings, a keyword names the second.

Every list of allowed values comes from its registry: ``--quant`` from :data:`QUANT_TYPES`,
``--optimizer`` from :data:`OPTIMIZERS`, ``--dtype`` from :data:`DTYPES`, ``--task`` from
:data:`TASKS`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..eval.scoring import LOSSES
from ..eval.truncation import DEFAULT_SIDE, TRUNCATION_SIDES
from ..dtypes import AUTO
from ..model.params import DTYPES
from ..quant import QUANT_TYPES
from ..tasks import TASKS
from ..training.config import FUSED_AUTO_TOKENS, FUSED_PM
from ..training.recipe import TRAIN
from ..zo.registry import OPTIMIZERS

# a parser or one of its argument groups: where an add_*_args helper adds its options
Options = argparse.ArgumentParser | argparse._ArgumentGroup
DTYPE_NAMES = list(DTYPES)
DTYPE_CHOICES = [*DTYPES, AUTO]  # auto: sparsezo.dtypes.default_dtype, resolved in main before a command runs


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help. An option without a value to show (``None``, an
    off flag) either says in its help what happens when it is left out, or reads "default: none"/"off"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == []:
            if "default" in text or action.required or not action.option_strings:
                return text
            return f"{text} (default: {'off' if action.default is False else 'none'})"
        return super()._get_help_string(action)


class DeprecatedAlias(argparse.Action):
    """A renamed option's old spelling: still works, warns on stderr, hidden from --help."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stderr.write(f"sparsezo: warning: {option_string} is deprecated, use {self.new} (same meaning)\n")
        setattr(namespace, self.dest, values)


def add_command(sub, name: str, about: str) -> argparse.ArgumentParser:
    """A (sub)command's parser, its about text as both the one-line help and the description."""
    return sub.add_parser(name, help=about, description=about, formatter_class=HelpFormatter)


def add_model_args(p: Options, quant: bool = True, from_run: bool = False, dtype: str = "bfloat16",
                   output: Options | None = None) -> None:
    """--model/--dtype/--device[/--quant]/--json; ``from_run``: eval, whose defaults come from --delta's run.

    ``dtype`` is the default --dtype: bfloat16 (what the recorded recipes use), or ``auto`` for the demo, whose
    point is a quick first run on whatever machine it lands on. ``output``: where --json goes (default ``p``),
    for a --help that files it with the command's other output options rather than with the model's."""
    run = "the base recorded in the --delta run, else " if from_run else ""
    p.add_argument("--model", default=None,
                   help=f"local Hugging Face model folder, or a .gguf file (or a folder holding one), converted once into "
                        f"$SPARSEZO_HOME/gguf (default: {run}the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None if from_run else dtype, choices=DTYPE_CHOICES,
                   help="compute dtype of the frozen weights; bfloat16 is ~3x faster than float32 on CPUs with "
                        "avx512_bf16, ~5x slower without it (auto: bfloat16 on CUDA and such CPUs, else float32)"
                        + (" (default: the --delta run's, else bfloat16)" if from_run else ""))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    if quant:
        p.add_argument("--quant", default=None, choices=list(QUANT_TYPES),
                       help="4-bit frozen base: nf4 (bitsandbytes NF4) or int4 (group-wise int4 on PyTorch's int4 "
                            "kernels, fast on CPU); the trainable entries stay exact in --dtype "
                            f"(default: {'the --delta run' + chr(39) + 's, else ' if from_run else ''}no quantization)")
    add_json_arg(p if output is None else output,
                 "print exactly one JSON object on stdout (progress and logs stay on stderr)")


def add_json_arg(p: Options, text: str = "print exactly one JSON object on stdout") -> None:
    p.add_argument("--json", action="store_true", help=text)


def add_run_base_args(p: Options) -> None:
    """replay/merge/export: the base model defaults to the one the run recorded, in the run's dtype."""
    p.add_argument("--model", default=None, help="base model folder (default: the one the run recorded)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="compute dtype (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_json_arg(p)


def add_task_args(p: Options, kind: str = "train", custom: Options | None = None) -> None:
    """Task and split options of a command ``kind``: train, eval (from_run defaults, --split/--icl/
    --max-new-tokens) or mask (the task matters only to --mask sensitive-task, which scores its
    training split: no test options).

    ``custom``: where the user-task options (--data, --template, ...) go; by default their own group
    "user task (--task custom)" of ``p``, which is then a parser (argparse shows no group nested in a
    group), or for ``mask`` the one task group.

    eval takes --num-train/--num-dev too: with the training run's values and seed it sees the
    same dev split and draws ICL demonstrations from the same training split.
    """
    run = kind == "eval"  # None = take the value recorded in the --delta run (else the train default)
    of_run = " (default: the --delta run's, else {})".format
    t = p.add_argument_group("task (only for --mask sensitive-task: the Fisher score of its training split)") \
        if kind == "mask" else p
    t.add_argument("--task", default=None if run else TRAIN.task,
                   help=f"task name: {', '.join(TASKS)}" + (of_run(TRAIN.task) if run else ""))
    t.add_argument("--data-dir", default=None,
                   help="folder with the task's official files (default: the shared assets)")
    t.add_argument("--num-train", type=int, default=None if run else TRAIN.num_train,
                   help="training examples sampled from the task's training pool"
                        + (of_run(TRAIN.num_train) if run else ""))
    t.add_argument("--num-dev", type=int, default=None if run else TRAIN.num_dev,
                   help="dev examples (disjoint from train) for model selection"
                        + (of_run(TRAIN.num_dev) if run else "; as in the train run, so the training split is the same"
                           if kind == "mask" else ""))
    if kind != "mask":
        t.add_argument("--num-test", type=int, default=None if run else TRAIN.num_test,
                       help="test examples (capped by the task's validation file)"
                            + (of_run(TRAIN.num_test) if run else ""))
        t.add_argument("--truncation-side", default=None if run else DEFAULT_SIDE, choices=TRUNCATION_SIDES,
                       help="which end of a prompt too long for 1,024 tokens with its answer is dropped (the answer "
                            "never is; each cut is reported): left keeps the end, where the question and the answer "
                            "cue are; right keeps the start" + (of_run(DEFAULT_SIDE) if run else ""))
    else:
        p.set_defaults(num_test=TRAIN.num_test)
    seeds = {"eval": "data sampling and ICL demonstrations" + of_run(TRAIN.seed), "mask": "data sampling and "
             "random masks", "train": "data sampling, random masks and the ZO noise"}[kind]
    p.add_argument("--seed", type=int, default=None if run else TRAIN.seed, help=f"seeds {seeds}")
    g = custom if custom is not None else p.add_argument_group("user task (--task custom)") if kind != "mask" else t
    g.add_argument("--data", default=None, help="labelled examples: .jsonl, .csv or .tsv")
    g.add_argument("--template", default=None,
                   help='prompt with {field} placeholders, e.g. "{text} It was"; \\n and \\t are a newline and '
                        "a tab, \\\\ a backslash")
    g.add_argument("--labels", default=None,
                   help='JSON label -> words map, e.g. \'{"pos": " great", "neg": " terrible"}\'')
    g.add_argument("--label-field", default=None, help="column/key holding the label (default: label)")
    g.add_argument("--test-data", default=None, help="test file (default: a fixed 20%% holdout of --data)")
    g.add_argument("--task-file", default=None, help="JSON (or YAML) file with keys data, template, labels, "
                                                      "label_field, test_data; flags override it")
    if run:
        p.add_argument("--split", default="test", choices=["dev", "test"], help="which split to score")
        p.add_argument("--icl", type=int, default=0, metavar="K",
                       help="prepend K seeded demonstrations from the training split (0: zero-shot)")
        p.add_argument("--max-new-tokens", type=int, default=50, help="answer length limit of generation tasks")


def add_mask_args(p: Options, selection: bool = True) -> None:
    """Mask rule/file and calibration options; ``selection=False`` (mask mass) drops --density/--scope."""
    p.add_argument("--mask", default=TRAIN.mask,
                   help="a mask file (mask.safetensors) or a rule: sensitive (Fisher on calibration text), "
                        "sensitive-task (Fisher on the task's training split), magnitude-small, magnitude-large, "
                        "random, full (every eligible weight: MeZO)")
    if selection:
        p.add_argument("--density", type=float, default=TRAIN.density,
                       help="fraction of eligible weights to train, in (0, 1]")
        add_scope_arg(p)
    p.add_argument("--calib", default=None,
                   help="calibration text or JSONL for --mask sensitive (default: WikiText-2 from the assets)")
    p.add_argument("--calib-tokens", type=int, default=TRAIN.calib_tokens,
                   help="calibration tokens the Fisher score is estimated on")
    p.add_argument("--calib-seq-len", type=int, default=TRAIN.calib_seq_len,
                   help="tokens per calibration row of the Fisher score (not the task's prompt length)")
    p.add_argument("--seq-len", dest="calib_seq_len", type=int, action=DeprecatedAlias, new="--calib-seq-len")
    p.add_argument("--include", default=None,
                   help="regex of parameter names that may be trained (default: the attention and MLP linear "
                        "weights of the decoder layers)")
    p.add_argument("--exclude", default=None, help="regex of parameter names never trained (default: none)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the Fisher score may use, e.g. 4.5G (default: what the machine or its cgroup has "
                        "left); below what all score buffers need, the calibration data is run once per group of "
                        "tensors")


def add_mask_command_args(p: argparse.ArgumentParser, quant: bool, selection: bool) -> tuple[Options, Options]:
    """mask compute/mass and quantize: model, mask and task options under the headings model, mask, task and
    output, as train's --help files them; returns the model and output groups for the command's own options."""
    model, masks = p.add_argument_group("model"), p.add_argument_group("mask")
    add_mask_args(masks, selection=selection), add_task_args(p, kind="mask")
    output = p.add_argument_group("output")
    add_model_args(model, quant=quant, output=output)
    return model, output


def add_scope_arg(p: Options) -> None:
    p.add_argument("--scope", default="global", choices=["global", "per-tensor"],
                   help="top-k over all eligible tensors at once, or the same fraction of each tensor")


def lr_value(text: str) -> float | None:
    """``--lr``: a number, or ``auto`` (held as None, which also travels through --resume's type check)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


# the whole story (grid, fallback to its centre, what config.json records) is docs/method.md's "lr probe"
LR_HELP = ("learning rate of the ZO update, or 'auto': probe a grid of lrs on 32 dev examples first (at most "
           "10%% of the run's forwards) and train with the best / 10 (docs/method.md: the lr probe)")


def add_zo_args(p: Options, advanced: Options | None = None) -> None:
    """The ZO recipe's options; ``advanced``: where the rarely changed ones go (--dist, --direction,
    --fused-pm, --cuda-graphs, --eval-batch-size: numerics and speed, not what is learned; default ``p``)."""
    a = p if advanced is None else advanced
    p.add_argument("--steps", type=int, default=TRAIN.steps, help="ZO steps (each: two forward passes per query)")
    p.add_argument("--lr", type=lr_value, default=TRAIN.lr,  # None is auto: say so, not "default: none"
                   help=LR_HELP + (" (default: auto)" if TRAIN.lr is None else ""))
    p.add_argument("--eps", type=float, default=TRAIN.eps,
                   help="perturbation scale (>= 1e-2 survives bf16 rounding)")
    p.add_argument("--batch-size", type=int, default=TRAIN.batch_size, help="training examples per step")
    p.add_argument("--q", type=int, default=1, help="SPSA queries per step (n-SPSA)")
    p.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                   help="how the projected gradient moves θ: ZO-SGD, momentum, Adam, sign-SGD, hizoo (HiZOO-style: "
                        "+1 forward a step, curvature-scaled; lr ~0.01-1) or fzoo (FZOO-style: q+1 forwards a step; "
                        "needs --q >= 2, e.g. 8); docs/method.md: optimisers")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay: adds this times θ to the update")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"],
                   help="learning-rate schedule over the steps after warm-up")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up from 0")
    p.add_argument("--loss", default="ce", choices=list(LOSSES),
                   help="ce: cross-entropy over candidates; lm: NLL of the gold candidate (generation tasks); "
                        "acc: 1 - batch accuracy (non-differentiable, ZO optimises it directly)")
    p.add_argument("--eval-every", type=int, default=TRAIN.eval_every,
                   help="steps between dev evaluations (also at step 0 and the last step)")
    p.add_argument("--keep-last", action="store_true",
                   help="keep the final θ (default: the θ of the best dev evaluation, as MeZO)")
    add_dist_arg(a, "distribution of the perturbation z (rademacher: device-independent integer hash)")
    a.add_argument("--direction", default="applied", choices=["applied", "sampled"],
                   help="update along the perturbation the rounded weights received (applied) or along z (sampled)")
    a.add_argument("--fused-pm", nargs="?", const="on", default="auto", choices=FUSED_PM,
                   help="score θ+εz and θ−εz in one forward over the batch stacked on itself (same losses to float "
                        "rounding): on (also plain --fused-pm), off, or auto = on for batches of at most "
                        f"{FUSED_AUTO_TOKENS} tokens on a 4-bit base, where it measured faster")
    a.add_argument("--cuda-graphs", action="store_true",
                   help="capture the unfused ZO forward per bucketed shape as CUDA graphs on a CUDA device (a "
                        "forward's kernels replayed with one launch); no effect elsewhere; losses may differ from "
                        "eager in the last bits, replay unaffected because it reads the recorded gradients")
    a.add_argument("--eval-batch-size", type=int, default=TRAIN.eval_batch_size,
                   help="examples per forward when evaluating")


def add_dist_arg(p: Options, text: str) -> None:
    p.add_argument("--dist", default="gaussian", choices=["gaussian", "rademacher"], help=text)
