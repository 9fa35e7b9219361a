"""The 15 common corruptions of Hendrycks & Dietterich (ICLR 2019) at 5 severities, generated on the fly.

Parameters are the CIFAR-10-C tables of ``ImageNet-C/create_c/make_cifar_c.py`` in hendrycks/robustness
(commit ca360085d57889288c4143fddd8a707bbcae01bd), tuned for 32x32 images. Larger images get the *same*
parameters (pixel-sized noise, blur radii and offsets are not rescaled), so the corruptions are milder on
e.g. 224 px images than ImageNet-C's own tables; that is a deliberate simplification for small datasets.

The original relies on ImageMagick (wand), OpenCV and scikit-image; here everything is numpy/scipy/PIL:

* exact ports (up to floating point and the original's intermediate uint8 round trips, which are skipped):
  gaussian/shot/impulse noise, defocus blur, glass blur, zoom blur, fog, brightness, contrast, elastic,
  pixelate, JPEG.
* motion blur: ImageMagick's ``MotionBlurImage`` (one-sided Gaussian line kernel of width ``2*radius+1``
  at a random angle, edge-replicated) re-implemented in numpy.
* snow: the original recipe (thresholded zoomed Gaussian snow layer, motion-blurred, added twice), with
  the motion blur above instead of ImageMagick; a close but not bit-exact simplification.
* frost: APPROXIMATION. The original blends crops of six frost photographs that we do not ship; we blend
  a procedural icy texture (fractal haze + needle-like streaks, blue-white tint) with the same weights.

Glass blur reproduces the original's behaviour, not its intent: its tuple "swap" of numpy row views
copies ``x[h', w']`` into ``x[h, w]`` and leaves ``x[h', w']`` unchanged, and with offsets in {-1, 0}
visited bottom-right to top-left each pass equals a vectorised gather, which is what we do.

"Exact" means same recipe and distributions, not the same random numbers as the released CIFAR-10-C files.
Under the CIFAR tables the mean squared distortion grows with severity for 12 corruptions (motion blur
severities 3 and 4 are practically identical: same sigma), but NOT for glass_blur (severity 3 has more
blur and only one shuffle pass), frost (image weight 1, 1, .9, .85, .75 vs frost weight .2 ... .45) and
elastic_transform (its random affine jitter shrinks from 2.56 to 0.96 px as the elastic part grows).

Layout, grouped as in ImageNet-C: ``tables`` (names, severities, parameter tables), ``kernels`` (zoom and
motion-blur operators shared by several corruptions), ``noise``, ``blur``, ``weather``, ``digital`` (the
15 corruptions), ``apply`` (``corrupt()``) and ``dataset`` (``CorruptedDataset``). This package re-exports
all of them, so ``from advpt.data.corruptions import ...`` keeps working for every name.
"""

from __future__ import annotations

from advpt.data.corruptions.apply import _FUNCS as _FUNCS
from advpt.data.corruptions.apply import _check as _check
from advpt.data.corruptions.apply import corrupt
from advpt.data.corruptions.blur import _defocus_blur as _defocus_blur
from advpt.data.corruptions.blur import _gaussian as _gaussian
from advpt.data.corruptions.blur import _glass_blur as _glass_blur
from advpt.data.corruptions.blur import _local_shuffle as _local_shuffle
from advpt.data.corruptions.blur import _motion_blur_c as _motion_blur_c
from advpt.data.corruptions.blur import _zoom_blur as _zoom_blur
from advpt.data.corruptions.dataset import CorruptedDataset
from advpt.data.corruptions.digital import _brightness as _brightness
from advpt.data.corruptions.digital import _contrast as _contrast
from advpt.data.corruptions.digital import _elastic_transform as _elastic_transform
from advpt.data.corruptions.digital import _jpeg_compression as _jpeg_compression
from advpt.data.corruptions.digital import _pixelate as _pixelate
from advpt.data.corruptions.digital import _to_uint8 as _to_uint8
from advpt.data.corruptions.kernels import _clipped_zoom as _clipped_zoom
from advpt.data.corruptions.kernels import _motion_blur as _motion_blur
from advpt.data.corruptions.kernels import _zoom_operator as _zoom_operator
from advpt.data.corruptions.noise import _gaussian_noise as _gaussian_noise
from advpt.data.corruptions.noise import _impulse_noise as _impulse_noise
from advpt.data.corruptions.noise import _shot_noise as _shot_noise
from advpt.data.corruptions.tables import _IMSIZE as _IMSIZE
from advpt.data.corruptions.tables import CORRUPTIONS, PARAMS, SEVERITIES
from advpt.data.corruptions.weather import _fog as _fog
from advpt.data.corruptions.weather import _frost as _frost
from advpt.data.corruptions.weather import _frost_texture as _frost_texture
from advpt.data.corruptions.weather import _next_pow2 as _next_pow2
from advpt.data.corruptions.weather import _plasma_fractal as _plasma_fractal
from advpt.data.corruptions.weather import _snow as _snow

__all__ = ["CORRUPTIONS", "PARAMS", "SEVERITIES", "CorruptedDataset", "corrupt"]
