"""Evaluation: metrics that need no downloaded network, the emoji feature network, a checkpoint's evaluation.

- :mod:`jitrope.eval.metrics`: Fréchet distance, PSNR, SSIM, and the optional Inception FID;
- :mod:`jitrope.eval.featnet`: the small emoji feature network of FD-emoji and class accuracy,
  trained once on the training split and cached;
- :mod:`jitrope.eval.evaluate`: :func:`~jitrope.eval.evaluate.evaluate`, what ``python -m jitrope.evaluate``
  (:mod:`jitrope.evaluate`, ``jitrope-evaluate``) runs;
- :mod:`jitrope.eval.study`: reading a study's runs (``metrics.jsonl``, evaluation JSONs), statistics
  over seeds and the within-noise rule, the every-size study's records, FD-emoji sanity checks;
- :mod:`jitrope.eval.report`: the results page of ``scripts/ablate_posenc.py`` (tables, plots).

The modules are not imported here: ``jitrope.eval.metrics`` does not pull in the model.
"""
