"""Downstream evaluation through EleutherAI's lm-evaluation-harness (`lm_eval`, the optional `.[eval]`
extra): `HarnessLM` (lm.py) runs lm_eval's task machinery on the harness's own model, and
`python -m trainer.evaluate` scores a run, a checkpoint or a Hugging Face directory with it."""
