"""Test and benchmark support: fakes and file writers that the shipped packages must not import.

Not installed (``pyproject.toml`` lists only the shipped packages); tests and benchmarks
run from the repository root, which puts it on the path (a Ray actor started from there
sees it too: Ray adds the driver's working directory to its workers' path).

* :mod:`testsupport.lora`: LoRA files in every key scheme, a reference merge, CPU stand-ins
  for nunchaku's quantized layers.
* :mod:`testsupport.sleep`: the ``sleep`` backend (renders and composes by sleeping);
  importing it registers the backend.
* :mod:`testsupport.aitoolkit`: LoRA files written the way ostris/ai-toolkit writes them
  (full-weight ``.diff`` / ``.diff_b`` modules beside the low-rank pairs, its prefixes,
  dtype and header metadata).
* :mod:`testsupport.image_measures`: image-space measures of the demo LoRAs' trained
  effects, and a reading of a picture's shape and colours.
"""
