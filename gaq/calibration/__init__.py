"""Calibration data: denoiser inputs recorded along full-precision sampler trajectories.

A calibration set holds rows ``(x_t, t, cond)`` together with the FP denoiser output
``eps_fp`` at that input, recorded while the FP sampler of a
:class:`~gaq.models.pipeline.Pipeline` runs from pure noise: exactly the inputs the
sampler feeds the denoiser, so latents for latent models and, with classifier-free
guidance, both halves of every guided batch (the conditional and the unconditional
input, as Q-Diffusion calibrates Stable Diffusion). Every
kept step of a trajectory is recorded in the same pass through the sampler (re-sampling
from ``T`` for every kept ``t`` is what made TFMQ-DM's data generation take days).

Three protocols (see :class:`CalibrationSpec`):

* ``"interval"`` (Q-Diffusion): every ``interval``-th sampler step of
  ``samples_per_step`` trajectories.
* ``"gaussian"`` (PTQ4DM): one step per trajectory, its position drawn from a normal
  distribution over the trajectory.
* a registered step selection (:data:`PROTOCOLS`), such as APQ-DM's ``"srm"``
  (``baselines/apqdm/srm.py``): as many steps as ``"interval"`` keeps, chosen by the
  protocol (structural risk minimisation on a few probe trajectories recorded at every
  step).

Sets are cached on disk under a content hash of everything that determines them (model
id, weights, scheduler config, spec with its sampler and guidance, conditioning source),
so every method of a benchmark calibrates on the identical, inspectable data (design
principle 6). Image ``i``'s noise and conditioning depend only on ``(seed, i)``
(:mod:`gaq.sampling`), so neither the recording batch size nor the device layout changes
what is recorded.

The package by responsibility: :mod:`~gaq.calibration.spec` (how a set is recorded, the
protocols), :mod:`~gaq.calibration.dataset` (the set and its forward loops),
:mod:`~gaq.calibration.recording` (running the FP sampler), :mod:`~gaq.calibration.cache`
(the disk cache). Every name is importable from ``gaq.calibration``.
"""

from gaq.calibration.cache import (
    CACHE_FORMAT,
    CalibrationCacheWarning,
    calibration_key,
    default_cache_dir,
)
from gaq.calibration.dataset import (
    CalibrationSet,
    combine_guidance,
    forward_loop,
    per_timestep_loop,
)
from gaq.calibration.recording import record_calibration, record_rows
from gaq.calibration.spec import (
    PROTOCOLS,
    CalibrationSpec,
    StepSelection,
    sampler_fields,
)

# the weights' digest lives with identity (gaq.identity); kept here for older imports
from gaq.identity import state_dict_digest

__all__ = [
    "CACHE_FORMAT",
    "PROTOCOLS",
    "CalibrationCacheWarning",
    "CalibrationSet",
    "CalibrationSpec",
    "StepSelection",
    "calibration_key",
    "combine_guidance",
    "default_cache_dir",
    "forward_loop",
    "per_timestep_loop",
    "record_calibration",
    "record_rows",
    "sampler_fields",
    "state_dict_digest",
]
