"""Measuring models: the lm-evaluation-harness model and offline tasks, evaluation recipes, HumanEval,
and the code grader with its sandbox."""
