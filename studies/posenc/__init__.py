"""Which positional encoding should JiT use? The ablation behind docs/results.md and the README's answer.

- ``plans/*.yaml``: what a study runs (config, encodings, seeds, steps, evaluation, regimes, the measured
  step time of its config); :mod:`.plan` reads them and estimates the time they take;
- ``run.py``: the driver (``python studies/posenc/run.py --scale seed-cpu --plan``);
- :mod:`.runs`: training and evaluating the runs (``jitrope.train`` / ``jitrope.eval.evaluate``) and reading them;
- :mod:`.study`: statistics over seeds and the verdict rule, the every-size records, FD-emoji sanity checks;
- :mod:`.report`, :mod:`.everysize`, :mod:`.answer`, :mod:`.plots`: the results page and the README's answer.
"""
