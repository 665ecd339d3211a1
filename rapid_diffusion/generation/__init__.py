"""Generation: one request in, timed images out.

``request`` holds what a user may ask for and its validation (``GenerationRequest``, ``Limits``,
``RequestError``, ``inspect_prompt``; no torch), ``pipeline`` the staged run of a loaded diffusers
pipeline (``generate``, ``GenerationResult``, PNG metadata), ``samplers`` the sampler
names and their diffusers schedulers, ``preview`` the cheap latent-to-RGB preview. This room sits
just above the foundation modules (``domains``, ``settings``, ``errors``) and imports nothing else of
the package: it never reaches for the registry (a model is passed in), a speed level or a face.
"""
