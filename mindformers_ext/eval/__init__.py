"""Functional-correctness evaluation of code models: HumanEval and MBPP, execution in a
bubblewrap sandbox, unbiased pass@k, resumable sample files. CLI: ``tools/eval_code.py``."""
from mindformers_ext.eval.execution import (ExecResult, SandboxUnavailable, check_sandbox,
                                            run_program, run_programs)
from mindformers_ext.eval.harness import (GenerateFn, evaluate_samples, generate_samples,
                                          generator_to_generate_fn, run_eval)
from mindformers_ext.eval.metrics import mean_pass_at_k, pass_at_k
from mindformers_ext.eval.problems import (Problem, load_humaneval, load_mbpp,
                                           load_mbpp_fewshot)
from mindformers_ext.eval.prompts import PROMPT_STYLES, build_prompt, postprocess, stop_strings
from mindformers_ext.eval.samples import SampleStore

__all__ = [
    "ExecResult", "SandboxUnavailable", "check_sandbox", "run_program", "run_programs",
    "GenerateFn", "evaluate_samples",
    "generate_samples", "generator_to_generate_fn", "run_eval", "mean_pass_at_k", "pass_at_k",
    "Problem", "load_humaneval", "load_mbpp", "load_mbpp_fewshot", "PROMPT_STYLES",
    "build_prompt", "postprocess", "stop_strings", "SampleStore",
]
