"""CTFMLib: the logic of the CTFM Slicer module, kept apart from its widget so that it can be tested headless.

``mrml_adapters`` converts between MRML nodes (RAS) and the engine's objects (patient LPS, arrays (z, y, x)); it
needs Slicer or the PyPI package ``slicer-core`` and is imported only where one of them is present.
"""
