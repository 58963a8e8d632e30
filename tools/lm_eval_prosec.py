"""lm-evaluation-harness with the ``prosec`` model registered: lm-eval's own command line.

    # a checkpoint (or run dir) with the paper's block sampler and corrector loops
    python tools/lm_eval_prosec.py --model prosec \\
        --model_args checkpoint=runs/sft,sampler=blocks,gen_length=256,steps=256,block_length=32,corrector_steps=1,corrector_every=4 \\
        --tasks gsm8k --batch_size 8 --output_path results/
    # an exported Hugging Face folder; multiple-choice tasks use the ELBO with mc_num draws
    python tools/lm_eval_prosec.py --model prosec --model_args hf=hf/my-model,mc_num=64 \\
        --tasks arc_easy --include_path my_tasks/

Every argument is lm-eval's (``lm_eval --help``); the model options are listed in
prosec_mcore/evaluation/prompted_model.py (ModelOptions) and docs/sft.md. A wrong model option,
path or file is one line and exit code 2.
"""

import sys

from prosec_mcore.cli_errors import exits_on_user_error


@exits_on_user_error
def main(argv=None) -> int:
    from prosec_mcore import quiet_known_warnings

    quiet_known_warnings()
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: lm-eval is not installed: pip install -e '.[eval]'", file=sys.stderr)
        return 2
    import prosec_mcore.evaluation.lm_eval_adapter  # noqa: F401 - registers the "prosec" model

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
