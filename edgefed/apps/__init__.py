"""Programs built on the library: the ``edgefed`` command, the demo, the simulation CLI,
the plots and the quantize bench. Nothing in the library imports from here."""
