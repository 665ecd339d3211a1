"""The embedded demo domain's runtime: a procedural captioned world and its adherence judge.

``world`` renders and captions scenes of coloured shapes, ``judge`` reads a generated image back
(colour, shape, size, position, count) and ``evaluate`` scores a model on the world's splits
(``rapid-diffusion eval``). ``world`` and ``judge`` need only numpy and Pillow; ``evaluate`` may
import ``generation`` and the foundation modules. The recipes that train the shipped demo weights
live in the dev package (``rapid_diffusion_dev.recipes``).
"""
