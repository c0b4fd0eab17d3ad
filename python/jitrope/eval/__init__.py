"""Evaluation: metrics that need no downloaded network, the emoji feature network, a checkpoint's evaluation.

- :mod:`jitrope.eval.metrics`: Fréchet distance, PSNR, SSIM, and the optional Inception FID;
- :mod:`jitrope.eval.featnet`: the small emoji feature network of FD-emoji and class accuracy,
  trained once on the training split and cached;
- :mod:`jitrope.eval.evaluate`: :func:`~jitrope.eval.evaluate.evaluate`, what ``python -m jitrope.evaluate``
  (:mod:`jitrope.evaluate`, ``jitrope-evaluate``) runs.

The modules are not imported here: ``jitrope.eval.metrics`` does not pull in the model.
"""
